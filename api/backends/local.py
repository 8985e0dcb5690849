"""The local backend: a model archive's handler hosted in this process, TorchServe-style.

Each worker is what a TorchServe worker process is, minus the process: its own import of the
handler (see `loader.py`), its own handler instance and `Context`, initialized once, and one
dedicated thread that runs every `initialize` and `handle` call, so a handler is only ever
called from one thread and never concurrently. The event loop only hands batches over.

Devices: with CUDA, worker i runs on GPU `i % device_count` (`system_properties["gpu_id"]`,
and the thread's current CUDA device); otherwise on CPU with `gpu_id` None. On CPU each worker
thread sets torch's intra-op threads to `cores // max_workers` (at least 1), so workers running
side by side do not oversubscribe the cores; torch applies the setting per thread.

A batch reaches the handler as TorchServe's `data`: one dict per request (`request.inputs`,
e.g. `{"body": ...}`), with request ids and headers in the context. The handler must answer with
a list holding one response per request; the status, phrase and headers it sets per item with
`context.set_response_status(code, phrase, idx)` / `set_response_header(idx, ...)` become that
item's `Prediction`. A handler that raises fails the batch (`InferenceFailed`, or the status of
a TorchServe `PredictionException`) and the worker keeps serving.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ts.metrics.metric_type_enum import MetricTypes
from ts.utils.util import PredictionException

from api.backends.archive import Archive, open_archive
from api.backends.context import (
    Context,
    MetricCallback,
    MetricsStore,
    RequestProcessor,
    make_context,
)
from api.backends.extract import ArchiveLimits
from api.backends.loader import (
    EntryPoint,
    archive_module_names,
    load_handler,
    missing_archive_module,
)
from api.backends.thread import WorkerThread
from api.core.types import InferenceRequest, ModelSettings, Prediction
from api.errors import InferenceFailed, ModelNotReady, TorchgateError, error_for_status, wrapping
from api.v2.bridge import plain_item

log = logging.getLogger(__name__)

DEFAULT_INTRA_OP_THREADS = 1
PREDICTION_METRIC = "PredictionTime"  # TorchServe's per-batch model metric, in ms


async def load_local_backend(
    path: Path,
    settings: ModelSettings,
    *,
    work_dir: Path | None = None,
    limits: ArchiveLimits | None = None,
    name: str | None = None,
    handler: str | None = None,
    gpu_count: int | None = None,
    intra_op_threads: int | None = None,
    on_metric: MetricCallback | None = None,
    limit_max_image_pixels: bool = True,
) -> LocalBackend:
    """Validate and extract the archive at `path` (off the event loop) and host its handler.

    Raises `ArchiveError` (400) for an archive that cannot be served. Workers, and with them
    the handler, start when the registry calls `start_worker`.
    """
    archive = await asyncio.to_thread(
        open_archive, path, work_dir=work_dir, limits=limits, name=name, handler=handler
    )
    try:
        return LocalBackend(
            archive,
            settings,
            gpu_count=gpu_count,
            intra_op_threads=intra_op_threads,
            on_metric=on_metric,
            limit_max_image_pixels=limit_max_image_pixels,
        )
    except BaseException:
        await asyncio.to_thread(archive.remove)
        raise


class LocalBackend:
    """`Backend` for one model version whose handler runs in-process; see the module docstring.

    `gpu_count` overrides the GPUs used (0: CPU only); `intra_op_threads` the torch threads per
    CPU worker (0: leave torch's default). `on_metric` receives every metric a handler records
    through `context.metrics` (see `MetricsStore`), from the worker's thread.
    """

    batches = True

    def __init__(
        self,
        archive: Archive,
        settings: ModelSettings,
        *,
        gpu_count: int | None = None,
        intra_op_threads: int | None = None,
        on_metric: MetricCallback | None = None,
        limit_max_image_pixels: bool = True,
    ) -> None:
        self.archive = archive
        self.settings = settings
        self.signature: Mapping[str, Any] | None = archive.signature
        self.manifest: Mapping[str, Any] = archive.manifest
        if gpu_count is None:
            gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        self.gpu_count = gpu_count
        if intra_op_threads is None:
            # One thread per CPU worker; scale with workers, not threads. With two OpenMP
            # threads per worker on a 2-core machine, a TorchScript worker's barrier waited on
            # a descheduled thread: p99 100-300 ms at concurrency 1, against 1-4 ms with one.
            intra_op_threads = DEFAULT_INTRA_OP_THREADS
        self.intra_op_threads = intra_op_threads
        self._on_metric = on_metric
        self._limit_max_image_pixels = limit_max_image_pixels
        self.module_names = archive_module_names(archive.model_dir)
        self._workers: set[LocalWorker] = set()

    async def start_worker(self, index: int) -> LocalWorker:
        """Start worker `index`: its thread, device, context and initialized handler."""
        gpu_id = index % self.gpu_count if self.gpu_count else None
        device = "cpu" if gpu_id is None else f"cuda:{gpu_id}"
        thread = WorkerThread(f"torchgate-{self.archive.name}-{self.archive.version}-w{index}")
        try:
            context, entry = await thread.call(self._load, gpu_id)
        except BaseException:
            thread.stop()  # after a cancelled start, once initialize has returned
            raise
        worker = LocalWorker(self, index, device, thread, context, entry)
        self._workers.add(worker)
        log.info(
            "%s/%s worker %d: %s on %s",
            self.archive.name,
            self.archive.version,
            index,
            entry.description,
            device,
        )
        return worker

    async def close(self) -> None:
        """Close workers still open, then delete the extracted archive."""
        for worker in list(self._workers):
            await worker.close()
        await asyncio.to_thread(self.archive.remove)

    def _load(self, gpu_id: int | None) -> tuple[Context, EntryPoint]:
        """Runs in the new worker's thread."""
        if gpu_id is not None:
            torch.cuda.set_device(gpu_id)
        elif self.intra_op_threads > 0:
            torch.set_num_threads(self.intra_op_threads)
        archive = self.archive
        context = make_context(
            model_name=archive.name,
            model_dir=archive.model_dir,
            manifest=archive.manifest,
            batch_size=self.settings.batch_size,
            gpu_id=gpu_id,
            metrics=MetricsStore(archive.name, self._on_metric),
            model_yaml_config=archive.model_config,
            limit_max_image_pixels=self._limit_max_image_pixels,
        )
        return context, load_handler(archive, context, self.module_names)

    def _forget(self, worker: LocalWorker) -> None:
        self._workers.discard(worker)


class LocalWorker:
    """One worker of a `LocalBackend`: a handler instance and the thread that calls it."""

    def __init__(
        self,
        backend: LocalBackend,
        index: int,
        device: str,
        thread: WorkerThread,
        context: Context,
        entry: EntryPoint,
    ) -> None:
        self.device = device
        self.index = index
        self.context = context
        self.metrics: MetricsStore = context.metrics
        self.entry: EntryPoint | None = entry
        self._backend = backend
        self._thread = thread
        self._handle = entry.handle
        archive = backend.archive
        self._what = f"Model {archive.name} version {archive.version} handler failed"
        # TorchServe's per-batch PredictionTime, recorded without add_time's generic lookups.
        self._prediction_time = self.metrics.add_metric_to_cache(
            PREDICTION_METRIC, "ms", ["ModelName", "Level"], MetricTypes.GAUGE
        )
        self._model_dims = [archive.name, "Model"]
        # Without a signature.json the handler is taken to be a plain TorchServe one.
        self._plain_handler = archive.signature is None
        # Ids for requests that arrive without one: unique, and cheaper than a uuid4 each.
        self._id_prefix = f"{uuid.uuid4().hex[:12]}-"
        self._ids = itertools.count()

    async def predict(self, batch: Sequence[InferenceRequest]) -> list[Prediction]:
        if self.entry is None:
            raise ModelNotReady(f"{self._what}: worker {self.index} is closed")
        return await self._thread.call(self._run, batch)

    def _run(self, batch: Sequence[InferenceRequest]) -> list[Prediction]:
        """Runs in the worker's thread: what TorchServe's `Service.predict` does, minus the wire."""
        context = self.context
        processors = [RequestProcessor(request.headers) for request in batch]
        ids = {
            idx: request.request_id or f"{self._id_prefix}{next(self._ids)}"
            for idx, request in enumerate(batch)
        }
        context.request_ids = ids
        context.request_processor = processors
        self.metrics.request_ids = ids
        data = [self._item(request) for request in batch]
        started = time.perf_counter()
        try:
            with wrapping(InferenceFailed, self._what):
                result = self._handle(data, context)
        except InferenceFailed as exc:
            raise self._failure(exc) from exc.__cause__
        elapsed_ms = round((time.perf_counter() - started) * 1000, 2)
        self._prediction_time.add_or_update(elapsed_ms, self._model_dims)
        if not isinstance(result, list):
            raise InferenceFailed(
                f"{self._what}: returned {type(result).__name__}, expected a list of "
                f"{len(batch)} responses"
            )
        if len(result) != len(batch):
            raise InferenceFailed(
                f"{self._what}: returned {len(result)} responses for a batch of "
                f"{len(batch)} requests"
            )
        return [
            Prediction(
                body,
                int(processor.get_response_status_code()),
                processor.get_response_status_phrase() or "",
                processor.get_response_headers(),
            )
            for body, processor in zip(result, processors, strict=True)
        ]

    def _item(self, request: InferenceRequest) -> dict[str, Any]:
        """The request item the handler gets (see `api.v2.bridge` for the v2 rule)."""
        if request.kserve_v2 and self._plain_handler:
            return plain_item(request.inputs["body"])
        return request.inputs

    def _failure(self, error: InferenceFailed) -> TorchgateError:
        """The error a failed batch reports; logged, as TorchServe's worker logs it."""
        cause = error.__cause__
        if isinstance(cause, PredictionException):
            # TorchServe's way for a handler to fail a batch with a status of its choosing.
            return error_for_status(cause.error_code, cause.message)
        log.warning("%s", error.message, exc_info=cause)
        missing = missing_archive_module(cause, self._backend.module_names) if cause else None
        if missing is not None:
            return InferenceFailed(
                f"{error.message} (archive module {missing!r} was imported at request time; "
                f"import it at module level or in initialize: torchgate isolates each archive's "
                f"modules once its handler is loaded)"
            )
        return error

    async def close(self) -> None:
        """Drop the handler (freeing the model) in its thread, then end the thread."""
        if self.entry is None:
            return
        self.entry = None
        self._backend._forget(self)
        try:
            await self._thread.call(self._release)
        finally:
            self._thread.stop()

    def _release(self) -> None:
        self._handle = _closed
        self.context.request_processor = None
        if self.device != "cpu":
            torch.cuda.empty_cache()


def _closed(data: Any, context: Any) -> Any:
    raise ModelNotReady("worker is closed")
