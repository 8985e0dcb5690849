"""TorchServe's management API (port 8081): same paths, parameters, JSON shapes, status codes.

The operations themselves (`load_archive`, `model_list`, `describe_versions`, `scale_workers`,
`make_default`, `remove_version`) are module functions that return the answer's document or
status text: the gRPC management API (`api.rpc.torchserve`) calls the same ones, so the two
cannot drift apart.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

from fastapi import APIRouter, Query, Request

from api.core.registry import ModelVersion, Registry
from api.core.supervision import WorkerSlot
from api.errors import BadRequest, ModelApiDisabled
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
        check_model_api(enable_model_api)

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
        status = await load_archive(
            loader,
            url,
            model_name=model_name,
            batch_size=batch_size,
            max_batch_delay=max_batch_delay,
            initial_workers=initial_workers,
            response_timeout=response_timeout,
        )
        return JsonResponse({"status": status})

    @router.get("/models")
    async def list_models(
        limit: int = Query(100, ge=1), next_page_token: int = Query(0, ge=0)
    ) -> JsonResponse:
        return JsonResponse(model_list(registry, limit, next_page_token))

    @router.get("/models/{model_name}")
    async def describe_default(model_name: str) -> JsonResponse:
        return JsonResponse(describe_versions(registry, model_name))

    @router.get("/models/{model_name}/all")
    async def describe_all(model_name: str) -> JsonResponse:
        return JsonResponse(describe_versions(registry, model_name, "all"))

    @router.get("/models/{model_name}/{version}")
    async def describe_version(model_name: str, version: str) -> JsonResponse:
        return JsonResponse(describe_versions(registry, model_name, version))

    async def scale(
        model_name: str,
        version: str | None,
        min_worker: int | None,
        max_worker: int | None,
        synchronous: bool,
        batch_size: int | None,
        max_batch_delay: float | None,
    ) -> JsonResponse:
        message = await scale_workers(
            registry, model_name, version, min_worker, max_worker, batch_size, max_batch_delay
        )
        # Workers are started before this answers either way; TorchServe's asynchronous form
        # answers 202, and clients check for it.
        if synchronous:
            return JsonResponse({"status": message})
        return JsonResponse({"status": SCALE_ACCEPTED}, status_code=202)

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
        return JsonResponse({"status": make_default(registry, model_name, version)})

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
        return JsonResponse({"status": await remove_version(registry, model_name, None)})

    @router.delete("/models/{model_name}/{version}")
    async def unregister_version(model_name: str, version: str) -> JsonResponse:
        require_model_api()
        return JsonResponse({"status": await remove_version(registry, model_name, version)})

    @router.post("/token")
    async def new_token(request: Request, type: str = Query(...)) -> JsonResponse:
        if auth is None:
            raise BadRequest("Token authorization is disabled (disable_token_authorization)")
        key = auth.regenerate(type, request.headers.get("authorization"))
        return JsonResponse({type: {"key": key}})

    return router


# TorchServe's status text for an asynchronous scale (REST answers it with 202).
SCALE_ACCEPTED = "Processing worker updates..."


def check_model_api(enabled: bool) -> None:
    """Register and unregister need `enable_model_api=true`, as in TorchServe."""
    if not enabled:
        raise ModelApiDisabled(
            "Model API is disabled: set enable_model_api=true in config.properties to "
            "register or unregister models"
        )


async def load_archive(
    loader: ModelLoader,
    url: str,
    *,
    model_name: str | None = None,
    batch_size: int | None = None,
    max_batch_delay: float | None = None,
    initial_workers: int | None = None,
    response_timeout: float | None = None,
) -> str:
    """Register an archive (None keeps config.properties' default); the status text."""
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
    version = await loader.register(
        url, settings, model_name=model_name, requested=True, origin="api", api=overrides
    )
    return (
        f'Model "{version.name}" Version: {version.version} registered with '
        f"{len(version.workers)} initial workers"
    )


def model_list(registry: Registry, limit: int, next_page_token: int) -> dict[str, Any]:
    """One page of ListModels: `{"models": [...], "nextPageToken": "..."}` (token if more)."""
    limit = min(limit, 1000)
    names = registry.names()
    page = names[next_page_token : next_page_token + limit]
    body: dict[str, Any] = {
        "models": [{"modelName": name, "modelUrl": registry.get(name).url} for name in page]
    }
    if next_page_token + limit < len(names):
        body["nextPageToken"] = str(next_page_token + limit)
    return body


def describe_versions(
    registry: Registry, model_name: str, version: str | None = None
) -> list[dict[str, Any]]:
    """DescribeModel: the default version (None), one version, or every version ("all")."""
    if version == "all":
        return [describe(registry, v) for v in registry.versions(model_name)]
    return [describe(registry, registry.get(model_name, version))]


async def scale_workers(
    registry: Registry,
    model_name: str,
    version: str | None,
    min_worker: int | None,
    max_worker: int | None,
    batch_size: int | None = None,
    max_batch_delay: float | None = None,
) -> str:
    """Apply new worker range / batching to a version (None keeps it); the status text."""
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
    return (
        f"Workers scaled to {len(model_version.workers)} for model: {model_name}, "
        f"version: {model_version.version}"
    )


def make_default(registry: Registry, model_name: str, version: str) -> str:
    registry.set_default(model_name, version)
    return f'Default version successfully updated for model "{model_name}" to "{version}"'


async def remove_version(registry: Registry, model_name: str, version: str | None) -> str:
    """Unregister a version (None: the default one); the status text."""
    model_version = await registry.unregister(model_name, version)
    return f'Model "{model_name}" Version: {model_version.version} unregistered'


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
        **({"error": model_version.unavailable} if model_version.state.value == "FAILED" else {}),
        # Whether this version can take a request now (v2's model ready), and why not: a version
        # scaled to 0 on purpose is not ready yet leaves the server healthy (see /ping).
        "ready": model_version.ready,
        **({"unavailable": model_version.unavailable} if not model_version.ready else {}),
        "backend": model_version.backend_info,
        "workers": [_describe_worker(slot) for slot in model_version.workers],
        "jobQueueStatus": {
            "remainingCapacity": max(batcher.queue_size - batcher.depth, 0),
            "pendingRequests": batcher.depth,
        },
    }


def _describe_worker(slot: WorkerSlot) -> dict[str, Any]:
    """TorchServe's worker entry, plus what torchgate knows of the process."""
    worker = slot.worker
    device = worker.device if worker is not None else "none"
    memory = getattr(worker, "memory_bytes", None)
    entry: dict[str, Any] = {
        "id": str(9000 + slot.index),
        "startTime": dt.datetime.fromtimestamp(slot.started_at, dt.UTC).isoformat(),
        "status": slot.status,
        "memoryUsage": memory() if memory is not None else 0,
        "pid": getattr(worker, "pid", os.getpid()) if worker is not None else -1,
        "gpu": device.startswith("cuda"),
        "gpuUsage": "N/A",
        "device": device,
        "restarts": slot.restarts,
    }
    if slot.last_error is not None and not slot.live:
        entry["error"] = slot.last_error
    return entry
