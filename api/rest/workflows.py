"""TorchServe's workflow APIs: management on port 8081, `/wfpredict/{name}` on port 8080.

The operations are `api.core.workflow.Workflows`'; these routes only decode and encode. As in
TorchServe, registering and unregistering workflows does not depend on `enable_model_api`, and
`limit` / `next_page_token` that are not numbers fall back to their defaults.
"""

from __future__ import annotations

from fastapi import APIRouter, Query

from api.auth import TokenAuth
from api.core.workflow import RegisterOptions, Workflows
from api.encoding import JSON, Encoded
from api.errors import NotFound
from api.rest.asgi import Scope
from api.rest.endpoint import InferenceEndpoint, SizeLimits
from api.rest.predictions import request_item
from api.rest.responses import JsonResponse


def workflow_router(workflows: Workflows) -> APIRouter:
    router = APIRouter(tags=["workflows"])

    @router.post("/workflows")
    async def register_workflow(
        url: str | None = Query(None, description="a .war file name in the workflow store"),
        workflow_name: str | None = None,
        response_timeout: float | None = Query(None, gt=0),
        startup_timeout: float | None = Query(None, gt=0),
        synchronous: bool = True,
    ) -> JsonResponse:
        # Node models start their workers before this answers either way (synchronous=false
        # only skips waiting in TorchServe).
        options = RegisterOptions(response_timeout, startup_timeout)
        status = await workflows.register(url, workflow_name, options)
        return JsonResponse({"status": status})

    @router.get("/workflows")
    async def list_workflows(limit: str = "100", next_page_token: str = "0") -> JsonResponse:
        return JsonResponse(workflows.list_page(_int(limit, 100), _int(next_page_token, 0)))

    @router.get("/workflows/{workflow_name}")
    async def describe_workflow(workflow_name: str) -> JsonResponse:
        return JsonResponse(workflows.describe(workflow_name))

    @router.delete("/workflows/{workflow_name}")
    async def unregister_workflow(workflow_name: str) -> JsonResponse:
        return JsonResponse({"status": await workflows.unregister(workflow_name)})

    return router


def _int(value: str, default: int) -> int:
    """TorchServe's `getIntParameter`: a value that is not a whole number means the default."""
    try:
        return int(value)
    except ValueError:
        return default


def is_wfpredict_path(path: str) -> bool:
    return path.startswith("/wfpredict/")


class WfPredictEndpoint(InferenceEndpoint):
    """`POST /wfpredict/{name}`: the request item reaches the start node as /predictions'
    would reach a model; the answer is the workflow's JSON."""

    def __init__(
        self, workflows: Workflows, *, limits: SizeLimits, auth: TokenAuth | None = None
    ) -> None:
        super().__init__(workflows.dataplane, limits=limits, auth=auth)
        self.workflows = workflows

    def route(self, path: str) -> tuple[str, str | None]:
        parts = [p for p in path.split("/") if p]
        if len(parts) >= 2:
            return parts[1], None  # TorchServe ignores anything after the name
        raise NotFound(f"Requested resource is not found, please refer to API document: {path}")

    async def answer(
        self,
        scope: Scope,
        headers: dict[str, str],
        rid: str,
        body: bytes,
        model: str,
        version: str | None,
    ) -> Encoded:
        item = await request_item(scope, body, headers)
        payload = await self.workflows.predict(model, item.request(headers, rid))
        return Encoded(200, payload, [("content-type", JSON)])
