"""TorchServe's management API (port 8081): same paths, parameters, JSON shapes, status codes."""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

from fastapi import APIRouter, Query, Request

from api.core.registry import ModelVersion, Registry
from api.errors import BadRequest, MethodNotAllowed
from api.loader import ModelLoader
from api.rest.responses import JsonResponse
from api.rest.security import TokenAuth


def management_router(
    registry: Registry,
    loader: ModelLoader,
    *,
    enable_model_api: bool,
    auth: TokenAuth | None,
) -> APIRouter:
    router = APIRouter(tags=["management"])

    def require_model_api() -> None:
        if not enable_model_api:
            raise MethodNotAllowed(
                "Model API is disabled: set enable_model_api=true in config.properties to "
                "register or unregister models"
            )

    @router.post("/models")
    async def register_model(
        url: str = Query(..., description="a .mar file name in model_store, or an allowed path"),
        model_name: str | None = None,
        batch_size: int | None = Query(None, ge=1),
        max_batch_delay: float | None = Query(None, ge=0),
        initial_workers: int | None = Query(None, ge=0),
        synchronous: bool = True,
        response_timeout: float | None = Query(None, gt=0),
    ) -> JsonResponse:
        require_model_api()
        overrides: dict[str, Any] = {}
        if batch_size is not None:
            overrides["batchSize"] = batch_size
        if max_batch_delay is not None:
            overrides["maxBatchDelay"] = max_batch_delay
        if initial_workers is not None:
            overrides["minWorkers"] = initial_workers
            overrides["maxWorkers"] = max(initial_workers, 1)
        if response_timeout is not None:
            overrides["responseTimeout"] = response_timeout
        settings = loader.config.model_settings(overrides)
        # Loading runs the handlers' initialize(); TorchServe's synchronous=false only skips
        # waiting for workers, which here start with the model, so both wait.
        version = await loader.register(url, settings, model_name=model_name)
        workers = len(version.workers)
        return JsonResponse(
            {
                "status": f'Model "{version.name}" Version: {version.version} registered with '
                f"{workers} initial workers"
            }
        )

    @router.get("/models")
    async def list_models(
        limit: int = Query(100, ge=1), next_page_token: int = Query(0, ge=0)
    ) -> JsonResponse:
        limit = min(limit, 1000)
        names = registry.names()
        page = names[next_page_token : next_page_token + limit]
        body: dict[str, Any] = {
            "models": [{"modelName": name, "modelUrl": registry.get(name).url} for name in page]
        }
        if next_page_token + limit < len(names):
            body["nextPageToken"] = str(next_page_token + limit)
        return JsonResponse(body)

    @router.get("/models/{model_name}")
    async def describe_default(model_name: str) -> JsonResponse:
        return JsonResponse([describe(registry, registry.get(model_name))])

    @router.get("/models/{model_name}/all")
    async def describe_all(model_name: str) -> JsonResponse:
        return JsonResponse([describe(registry, v) for v in registry.versions(model_name)])

    @router.get("/models/{model_name}/{version}")
    async def describe_version(model_name: str, version: str) -> JsonResponse:
        return JsonResponse([describe(registry, registry.get(model_name, version))])

    async def scale(
        model_name: str,
        version: str | None,
        min_worker: int | None,
        max_worker: int | None,
        synchronous: bool,
        batch_size: int | None,
        max_batch_delay: float | None,
    ) -> JsonResponse:
        model_version = registry.get(model_name, version)
        if batch_size is not None or max_batch_delay is not None:
            registry.update_batching(
                model_name,
                model_version.version,
                batch_size=batch_size,
                max_batch_delay_ms=max_batch_delay,
            )
        if min_worker is not None or max_worker is not None:
            low = min_worker if min_worker is not None else model_version.settings.min_workers
            high = max_worker if max_worker is not None else max(low, 1)
            if high < low:
                high = low
            await registry.scale(model_name, model_version.version, low, high)
        message = (
            f"Workers scaled to {len(model_version.workers)} for model: {model_name}, "
            f"version: {model_version.version}"
        )
        # Workers are started before this answers either way; TorchServe's asynchronous form
        # answers 202, and clients check for it.
        if synchronous:
            return JsonResponse({"status": message})
        return JsonResponse({"status": "Processing worker updates..."}, status_code=202)

    @router.put("/models/{model_name}")
    async def scale_default(
        model_name: str,
        min_worker: int | None = Query(None, ge=0),
        max_worker: int | None = Query(None, ge=0),
        synchronous: bool = False,
        batch_size: int | None = Query(None, ge=1),
        max_batch_delay: float | None = Query(None, ge=0),
    ) -> JsonResponse:
        return await scale(
            model_name, None, min_worker, max_worker, synchronous, batch_size, max_batch_delay
        )

    @router.put("/models/{model_name}/{version}/set-default")
    async def set_default(model_name: str, version: str) -> JsonResponse:
        registry.set_default(model_name, version)
        return JsonResponse(
            {
                "status": f'Default version successfully updated for model "{model_name}" '
                f'to "{version}"'
            }
        )

    @router.put("/models/{model_name}/{version}")
    async def scale_version(
        model_name: str,
        version: str,
        min_worker: int | None = Query(None, ge=0),
        max_worker: int | None = Query(None, ge=0),
        synchronous: bool = False,
        batch_size: int | None = Query(None, ge=1),
        max_batch_delay: float | None = Query(None, ge=0),
    ) -> JsonResponse:
        return await scale(
            model_name, version, min_worker, max_worker, synchronous, batch_size, max_batch_delay
        )

    @router.delete("/models/{model_name}")
    async def unregister_default(model_name: str) -> JsonResponse:
        require_model_api()
        model_version = await registry.unregister(model_name)
        return JsonResponse(
            {"status": f'Model "{model_name}" Version: {model_version.version} unregistered'}
        )

    @router.delete("/models/{model_name}/{version}")
    async def unregister_version(model_name: str, version: str) -> JsonResponse:
        require_model_api()
        await registry.unregister(model_name, version)
        return JsonResponse({"status": f'Model "{model_name}" Version: {version} unregistered'})

    @router.post("/token")
    async def new_token(request: Request, type: str = Query(...)) -> JsonResponse:
        if auth is None:
            raise BadRequest("Token authorization is disabled (disable_token_authorization)")
        key = auth.regenerate(type, request.headers.get("authorization"))
        return JsonResponse({type: {"key": key}})

    return router


def describe(registry: Registry, model_version: ModelVersion) -> dict[str, Any]:
    """TorchServe's DescribeModel shape for one version."""
    settings = model_version.settings
    batcher = model_version.batcher
    default = registry.default_version(model_version.name) == model_version.version
    return {
        "modelName": model_version.name,
        "modelVersion": model_version.version,
        "modelUrl": model_version.url,
        "runtime": "python",
        "minWorkers": settings.min_workers,
        "maxWorkers": settings.max_workers,
        "batchSize": settings.batch_size,
        "maxBatchDelay": settings.max_batch_delay_ms,
        "responseTimeout": settings.response_timeout_s,
        "loadedAtStartup": model_version.backend_info.get("startup", False),
        "defaultVersion": default,
        "status": model_version.state.value,
        "backend": model_version.backend_info,
        "workers": [
            {
                "id": str(9000 + slot.index),
                "startTime": dt.datetime.fromtimestamp(slot.started_at, dt.UTC).isoformat(),
                "status": "READY" if model_version.ready else model_version.state.value,
                "memoryUsage": 0,
                "pid": os.getpid(),
                "gpu": slot.worker.device.startswith("cuda"),
                "gpuUsage": "N/A",
                "device": slot.worker.device,
            }
            for slot in model_version.workers
        ],
        "jobQueueStatus": {
            "remainingCapacity": max(batcher.queue_size - batcher.depth, 0),
            "pendingRequests": batcher.depth,
        },
    }
