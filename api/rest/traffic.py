"""`/models/{model}/traffic` on the management API: read, set and clear a traffic policy.

    GET    /models/digits/traffic    {"model_name", "default_version", "policy": {...} | null}
    PUT    /models/digits/traffic    body: a policy; answers like GET
    DELETE /models/digits/traffic    back to default-version routing; answers like GET

Mounted before TorchServe's `/models/{model}/{version}` routes, which would otherwise read
"traffic" as a version. Validation lives in `api.core.routing`; the models here only describe
the JSON for OpenAPI and reject wrong types early (numbers strictly: no `true` or `"5"`).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from api.core.routing import DEFAULT_STICKY_HEADER, TrafficPolicy, TrafficRouter
from api.rest.responses import JsonResponse


class ShadowBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(description="the version that gets copies; its answers are dropped")
    percent: float = Field(
        100, ge=0, le=100, strict=True, description="share of routed requests copied"
    )


class TrafficPolicyBody(BaseModel):
    """A model's traffic policy."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "weights": {"1.0": 95, "2.0": 5},
                    "sticky_header": "X-User-Id",
                    "shadow": {"version": "3.0", "percent": 10},
                }
            ]
        },
    )

    # Strict: lax mode would read `true` as 1 and "5" as 5, and a typo would route traffic.
    weights: dict[str, Annotated[float, Field(ge=0, strict=True)]] = Field(
        min_length=1,
        description="relative weight per version (need not sum to 100); 0 sends no traffic",
    )
    sticky_header: str | None = Field(
        DEFAULT_STICKY_HEADER,
        description="request header whose value keeps a user on one version; null: no sticking",
    )
    shadow: ShadowBody | None = None


def traffic_router(router: TrafficRouter) -> APIRouter:
    api = APIRouter(tags=["traffic"])

    def answer(model: str) -> JsonResponse:
        policy = router.policy(model)
        return JsonResponse(
            {
                "model_name": model,
                "default_version": router.registry.default_version(model),
                "policy": None if policy is None else policy.to_json(),
            }
        )

    @api.get("/models/{model_name}/traffic")
    async def get_traffic(model_name: str) -> JsonResponse:
        return answer(model_name)

    @api.put("/models/{model_name}/traffic")
    async def put_traffic(model_name: str, body: TrafficPolicyBody) -> JsonResponse:
        data: dict[str, Any] = body.model_dump()
        router.set_policy(model_name, TrafficPolicy.from_json(data))
        return answer(model_name)

    @api.delete("/models/{model_name}/traffic")
    async def delete_traffic(model_name: str) -> JsonResponse:
        router.clear_policy(model_name)
        return answer(model_name)

    return api
