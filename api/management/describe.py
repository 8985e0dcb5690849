"""DescribeModel's document for one version: TorchServe 0.12's fields in its order, then
torchgate's own (default version, state, readiness, backend, worker devices)."""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

from api.core.registry import ModelState, ModelVersion
from api.core.sequences import describe_fields
from api.core.supervision import WorkerSlot

# TorchServe's fixed answers for features torchgate has no equivalent of (model-config.yaml's
# clientTimeoutInMills, parallelType/Level, continuousBatching, useJobTicket): their defaults,
# so clients that read them see TorchServe's values.
_FIXED = {
    "clientTimeoutInMills": 0,
    "parallelType": "",
    "parallelLevel": 0,
}


def describe(
    model_version: ModelVersion,
    *,
    default: bool,
    loaded_at_startup: bool = False,
    customized: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`customized`: `{"customizedMetadata": ...}` when asked, placed where TorchServe puts it;
    `loaded_at_startup`: the model (any version of it) was loaded when the server started."""
    settings = model_version.settings
    batcher = model_version.batcher
    workers = [_worker(slot) for slot in model_version.workers]
    on_gpu = any(str(w["device"]).startswith("cuda") for w in workers)
    document: dict[str, Any] = {
        "modelName": model_version.name,
        "modelVersion": model_version.version,
        "modelUrl": model_version.url,
        "runtime": "python",
        "minWorkers": settings.min_workers,
        "maxWorkers": settings.max_workers,
        "batchSize": settings.batch_size,
        "maxBatchDelay": _number(settings.max_batch_delay_ms),
        "responseTimeout": _number(settings.response_timeout_s),
        "startupTimeout": _number(settings.startup_timeout_s),
        "maxRetryTimeoutInSec": _number(settings.max_retry_timeout_s),
        **_FIXED,
        "deviceType": "gpu" if on_gpu else "cpu",
        "continuousBatching": False,
        "useJobTicket": False,
        "useVenv": settings.use_venv,
        **describe_fields(settings),
        "loadedAtStartup": loaded_at_startup,
        "workers": workers,
        "jobQueueStatus": {
            "remainingCapacity": max(batcher.queue_size - batcher.depth, 0),
            "pendingRequests": batcher.pending,
        },
        **(customized or {}),
        # torchgate's own, after TorchServe's fields.
        "defaultVersion": default,
        "status": model_version.state.value,
    }
    if model_version.state is ModelState.FAILED:
        document["error"] = model_version.unavailable
    # Whether this version can take a request now (v2's model ready), and why not: a version
    # scaled to 0 on purpose is not ready yet leaves the server healthy (see /ping).
    document["ready"] = model_version.ready
    if not model_version.ready:
        document["unavailable"] = model_version.unavailable
    document["backend"] = model_version.backend_info
    return document


def _number(value: float) -> int | float:
    """TorchServe's integers stay integers (a whole float such as 5.0 is sent as 5)."""
    return int(value) if float(value).is_integer() else value


def _worker(slot: WorkerSlot) -> dict[str, Any]:
    """TorchServe's worker entry, then what torchgate knows of the process."""
    worker = slot.worker
    device = worker.device if worker is not None else "none"
    memory = getattr(worker, "memory_bytes", None)
    started = dt.datetime.fromtimestamp(slot.started_at, dt.UTC)
    entry: dict[str, Any] = {
        "id": str(slot.id),
        # TorchServe's form: milliseconds and a Z.
        "startTime": started.strftime("%Y-%m-%dT%H:%M:%S.") + f"{started.microsecond // 1000:03d}Z",
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
