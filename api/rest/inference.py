"""TorchServe's inference API utilities (port 8080): /ping, OPTIONS /, /api-description.

`POST /predictions/...` itself is plain ASGI (`api.rest.predictions`), mounted in front of this
router by `api.rest.apps`; it is listed in the OpenAPI document all the same.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI

from api.core.dataplane import DataPlane
from api.rest.responses import JsonResponse


def inference_router(dataplane: DataPlane, app: FastAPI) -> APIRouter:
    router = APIRouter(tags=["inference"])

    @router.get("/ping")
    async def ping() -> JsonResponse:
        if dataplane.ready():
            return JsonResponse({"status": "Healthy"})
        return JsonResponse({"status": "Unhealthy"}, status_code=500)

    @router.options("/")
    async def api_description_options() -> JsonResponse:
        return JsonResponse(openapi_document(app))

    @router.get("/api-description")
    async def api_description() -> JsonResponse:
        return JsonResponse(openapi_document(app))

    return router


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the plain-ASGI prediction paths it cannot see."""
    document = dict(app.openapi())
    paths = dict(document.get("paths", {}))
    predict = {
        "post": {
            "tags": ["inference"],
            "summary": "Predictions entry point for a model (its default or routed version)",
            "operationId": "predictions",
            "requestBody": {
                "description": "Input data: a raw body (image, text, JSON) or multipart form",
                "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
            },
            "responses": {
                "200": {"description": "Model output"},
                "400": {"description": "Bad input"},
                "404": {"description": "Model or version not found"},
                "413": {"description": "Body larger than max_request_size"},
                "503": {"description": "Queue full (Retry-After) or model not ready"},
                "504": {"description": "responseTimeout passed"},
            },
        }
    }
    paths["/predictions/{model_name}"] = predict
    paths["/predictions/{model_name}/{model_version}"] = predict
    for path, summary in getattr(app.state, "extra_openapi_paths", {}).items():
        paths[path] = summary
    document["paths"] = paths
    return document
