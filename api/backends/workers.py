"""The worker backend: a model archive's handler hosted in worker processes, TorchServe-style.

Each worker is an OS process forked by the zygote (`api.workers`), hosting the handler with
TorchServe's worker contract: the model directory as working directory and first on
`sys.path`, TorchServe's own `Context` (system_properties with `gpu_id`, manifest, request ids
and headers, per-item `set_response_status` / `set_response_header`, `context.metrics`),
`initialize` once, one batch at a time. The frontend and the worker exchange one frame per
batch each way (`api.workers.wire`).

What a worker costs its model when it fails, and only its model:

- it dies (os._exit, a segfault, the OOM killer): the batch it held fails with 500 naming the
  exit status; queued requests wait for a live worker; the registry restarts it
  (`api.core.supervision`);
- it does not answer within the model's `responseTimeout`: the batch gets 504, the process is
  killed, and it is replaced the same way;
- `initialize` raises (or the process dies while loading): `start_worker` raises
  `HandlerLoadError` with the handler's message.

Devices: GPUs go round robin over the whole server, as TorchServe assigns them (`GpuRoundRobin`:
one counter for every model's workers, so the first worker of each model does not pile onto
GPU 0; a restarted worker keeps its GPU); `number_of_gpu` caps the GPUs used, at the devices
present; CPU without one. On CPU each worker gets `intra_op_threads` torch threads (default 1:
workers side by side must not oversubscribe the cores; with OMP_NUM_THREADS set, torch follows
it, as in TorchServe). This module imports neither torch nor handler code.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from api.backends.archive import Archive, default_work_dir, open_archive
from api.backends.extract import ArchiveLimits
from api.backends.requirements import install_requirements as install_requirements_into
from api.backends.requirements import requirements_file
from api.core.types import (
    API_V1_REST,
    API_V2_GRPC,
    API_V2_REST,
    InferenceRequest,
    ModelSettings,
    NotRun,
    Prediction,
)
from api.errors import (
    DeadlineExceeded,
    HandlerLoadError,
    InferenceFailed,
    ModelNotReady,
    WorkerDied,
    error_for_status,
)
from api.metrics_config import DEFAULT_MODEL_METRICS, DeclaredMetric
from api.observability.gpu import import_nvml
from api.observability.log_files import worker_name
from api.workers.main import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_ITEMS_PER_REQUEST,
    PLAIN_ITEM,
    WorkerSpec,
)
from api.workers.pool import NotStarted, WorkerExit, WorkerPool, WorkerProcess
from api.workers.wire import blobs

log = logging.getLogger(__name__)

_UNWRAPPED_APIS = frozenset((API_V1_REST, API_V2_REST, API_V2_GRPC))

DEFAULT_INTRA_OP_THREADS = 1
STOP_GRACE_S = 5.0  # a stopping worker that has not exited by then is killed

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# on_metric(name, value, unit, dimensions, metric_type), for each update a handler makes through
# `context.metrics` (see `api.workers.context.MetricsStore`); called on the event loop.
MetricCallback = Callable[[str, float, str, Mapping[str, str], str], None]


class GpuRoundRobin:
    """TorchServe's GPU assignment (WorkLoadManager.addThreads): one counter for the whole
    server, `(last + 1) % count` from 0, so new workers of every model get GPUs 1, 2, ...,
    count - 1, 0, 1, ...; `next()` is None (CPU) with no GPU. One per server, shared by every
    `WorkerBackend`."""

    def __init__(self, count: int) -> None:
        self.count = max(count, 0)
        self._last = 0

    def next(self) -> int | None:
        if not self.count:
            return None
        self._last = (self._last + 1) % self.count
        return self._last


def gpu_round_robin(
    number_of_gpu: int | None, *, visible: Callable[[], int] | None = None
) -> GpuRoundRobin:
    """The round robin for `number_of_gpu` (None: every GPU present), capped at the GPUs
    present (`visible`, default `visible_gpus`) as TorchServe's ConfigManager caps it, with a
    warning; 0 or less: no GPU (CPU workers), as in TorchServe."""
    if number_of_gpu is not None and number_of_gpu <= 0:
        if number_of_gpu < 0:
            log.warning("number_of_gpu=%d: workers run on CPU, as in TorchServe", number_of_gpu)
        return GpuRoundRobin(0)
    present = (visible or visible_gpus)()
    if number_of_gpu is None:
        return GpuRoundRobin(present)
    if number_of_gpu > present:
        log.warning(
            "number_of_gpu=%d, but %d GPU%s present: workers use %d, as TorchServe caps it",
            number_of_gpu,
            present,
            " is" if present == 1 else "s are",
            present,
        )
    return GpuRoundRobin(min(number_of_gpu, present))


def visible_gpus(
    environ: Mapping[str, str] | None = None,
    nvml: Any | None = None,
    amd_nodes: Path = Path("/sys/class/kfd/kfd/topology/nodes"),
) -> int:
    """The GPUs a worker's torch sees, counted without torch or a GPU call (the frontend
    touches neither): NVIDIA's from NVML, narrowed by CUDA_VISIBLE_DEVICES; else AMD's from
    the ROCm driver's topology in sysfs (what a ROCm build of torch counts), narrowed by
    ROCR_VISIBLE_DEVICES, HIP_VISIBLE_DEVICES and CUDA_VISIBLE_DEVICES in turn; 0 without
    either driver. (`nvml`, `amd_nodes`: tests' stand-ins.)"""
    env = os.environ if environ is None else environ
    present = _nvidia_devices(nvml)
    if present:
        return _narrowed(present, env.get("CUDA_VISIBLE_DEVICES"))
    present = _amd_devices(amd_nodes)
    for key in ("ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
        present = _narrowed(present, env.get(key))
    return present


def _nvidia_devices(nvml: Any | None) -> int:
    nvml = nvml if nvml is not None else import_nvml()
    if nvml is None:
        return 0
    try:
        nvml.nvmlInit()
        try:
            return int(nvml.nvmlDeviceGetCount())
        finally:
            nvml.nvmlShutdown()
    except Exception as exc:  # pynvml.NVMLError: no driver, no library, no device
        log.debug("no NVIDIA GPU: %s", exc)
        return 0


def _amd_devices(nodes: Path) -> int:
    """The KFD topology's GPU nodes (CPU nodes have no SIMDs)."""
    count = 0
    try:
        for node in nodes.iterdir():
            with contextlib.suppress(OSError, ValueError):
                for line in (node / "properties").read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "simd_count" and int(value) > 0:
                        count += 1
    except OSError:  # no ROCm driver
        return 0
    return count


def _narrowed(present: int, chosen: str | None) -> int:
    """The devices of `present` a `*_VISIBLE_DEVICES` list leaves, as the runtime reads it:
    ordinals up to the first invalid or absent one, UUIDs taken as they are, none when an
    ordinal repeats; unset: all."""
    if chosen is None:
        return present
    seen: list[str | int] = []
    for entry in (part.strip() for part in chosen.split(",")):
        if entry.startswith(("GPU-", "MIG-")):
            seen.append(entry)
            continue
        number = re.match(r"[+-]?\d+", entry)
        ordinal = int(number.group()) if number else -1
        if ordinal in seen:
            return 0  # torch sees no device when an ordinal repeats
        if not 0 <= ordinal < present:
            break
        seen.append(ordinal)
    return len(seen)


async def load_worker_backend(
    path: Path,
    settings: ModelSettings,
    *,
    pool: WorkerPool,
    work_dir: Path | None = None,
    limits: ArchiveLimits | None = None,
    name: str | None = None,
    handler: str | None = None,
    gpus: GpuRoundRobin | None = None,
    intra_op_threads: int | None = None,
    on_metric: MetricCallback | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    max_items_per_request: int = DEFAULT_MAX_ITEMS_PER_REQUEST,
    declared_metrics: Sequence[DeclaredMetric] = DEFAULT_MODEL_METRICS,
    service_envelope: str | None = None,
) -> WorkerBackend:
    """Validate and extract the archive at `path` (off the event loop) for worker processes.

    Raises `ArchiveError` (400) for an archive that cannot be served. Workers, and with them
    the handler, start when the registry calls `start_worker`.
    """
    opening = asyncio.ensure_future(
        asyncio.to_thread(
            open_archive, path, work_dir=work_dir, limits=limits, name=name, handler=handler
        )
    )
    try:
        archive = await asyncio.shield(opening)
    except asyncio.CancelledError:
        # The thread extracts on regardless (up to archive_max_bytes): what it leaves is
        # removed once it is done, not kept until the server exits.
        opening.add_done_callback(_remove_extracted)
        raise
    return WorkerBackend(
        archive,
        settings,
        pool=pool,
        gpus=gpus,
        intra_op_threads=intra_op_threads,
        on_metric=on_metric,
        max_image_pixels=max_image_pixels,
        max_items_per_request=max_items_per_request,
        declared_metrics=declared_metrics,
        work_dir=work_dir,
        service_envelope=service_envelope,
    )


def _remove_extracted(opening: asyncio.Future[Archive]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        # In a thread, as WorkerBackend.close removes it: thousands of files, gigabytes.
        asyncio.get_running_loop().run_in_executor(None, opening.result().remove)


class WorkerBackend:
    """`Backend` for one model version whose workers are processes; see the module docstring."""

    batches = True

    def __init__(
        self,
        archive: Archive,
        settings: ModelSettings,
        *,
        pool: WorkerPool,
        gpus: GpuRoundRobin | None = None,
        intra_op_threads: int | None = None,
        on_metric: MetricCallback | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        max_items_per_request: int = DEFAULT_MAX_ITEMS_PER_REQUEST,
        declared_metrics: Sequence[DeclaredMetric] = DEFAULT_MODEL_METRICS,
        work_dir: Path | None = None,
        service_envelope: str | None = None,
    ) -> None:
        """`gpus`: the server's round robin (`gpu_round_robin`, shared by every backend;
        `GpuRoundRobin(0)` for CPU workers); without it, one of this backend's own over every
        GPU present, made at its first worker's start."""
        self.archive = archive
        self.settings = settings
        self.signature: Mapping[str, Any] | None = archive.signature
        self.manifest: Mapping[str, Any] = archive.manifest
        self._pool = pool
        self._gpus = gpus
        # The GPU (None: CPU) of each worker slot, by index: taken from the round robin at the
        # slot's first start and kept across its restarts, as TorchServe's WorkerThread keeps
        # its gpuId; released when the registry removes the slot (`worker_slot_removed`).
        self._gpu_ids: dict[int, int | None] = {}
        self._worker_ids: dict[int, int] = {}  # by slot index (`worker_slot_numbered`)
        # One thread per CPU worker; scale with workers, not threads. With two OpenMP threads
        # per worker on a 2-core machine, a TorchScript worker's barrier waited on a descheduled
        # thread: p99 100-300 ms at concurrency 1, against 1-4 ms with one. An OMP_NUM_THREADS
        # in the environment is how TorchServe's users size their workers: torch follows it
        # (0: leave torch's own setting) unless torchgate.intra_op_threads says otherwise.
        if intra_op_threads is None:
            intra_op_threads = 0 if os.environ.get("OMP_NUM_THREADS") else DEFAULT_INTRA_OP_THREADS
        self._intra_op_threads = intra_op_threads
        self._on_metric = on_metric
        self._max_image_pixels = max_image_pixels
        self._max_items_per_request = max_items_per_request
        self._declared_metrics = tuple(declared_metrics)
        self._unstreamed_apis: set[str] = set()  # warned about (`note_unstreamed`)
        self._service_envelope = service_envelope
        # Called once the backend is closed (its version unloaded): what the server keeps for
        # it elsewhere goes (its share of handler metric series: `HandlerMetrics.release`).
        self.on_close: list[Callable[[], None]] = []
        self._workers: set[ProcessWorker] = set()
        # The model's own package directory (api.backends.requirements), if it has one, made
        # under the work dir (never in a model directory the user handed in).
        self._work_dir = work_dir or default_work_dir()
        self._packages: Path | None = None

    @property
    def model_config(self) -> Mapping[str, Any]:
        """The archive's model-config.yaml (`api.model_config` reads its frontend keys)."""
        return self.archive.model_config

    async def prepare(
        self, settings: ModelSettings, *, install_requirements: bool, model: str
    ) -> None:
        """Take the version's final settings and, with `install_py_dep_per_model`, install
        the archive's requirements; before any worker starts. `model` names the model as it
        registers. Raises `RequirementsError`."""
        self.settings = settings
        archive = self.archive
        requirements = requirements_file(archive.manifest)
        if requirements is None:
            return
        if not install_requirements:
            log.warning(
                "Model %s: requirementsFile %s is not installed: install_py_dep_per_model is "
                "false (as in TorchServe)",
                model,
                requirements,
            )
            return
        if settings.use_venv:
            log.info(
                "Model %s: useVenv: its requirements go into a package directory of its own, "
                "on top of the server's environment (docs/compatibility.md)",
                model,
            )
        self._packages = await install_requirements_into(
            archive.model_dir, requirements, self._work_dir, model=model
        )

    def gpu_of(self, index: int) -> int | None:
        """The GPU of worker slot `index`: the one it has, else the next of the round robin
        (a new slot's, which it keeps through its restarts)."""
        if index not in self._gpu_ids:
            if self._gpus is None:
                self._gpus = gpu_round_robin(None)
            self._gpu_ids[index] = self._gpus.next()
        return self._gpu_ids[index]

    def worker_slot_numbered(self, index: int, worker_id: int) -> None:
        """The registry gave slot `index` its worker id (describe's 9000, 9001, ...): the
        slot's processes log their output under TorchServe's name for it, kept across
        restarts as TorchServe's worker thread keeps its port."""
        self._worker_ids[index] = worker_id

    def worker_slot_removed(self, index: int) -> None:
        """The registry took slot `index` off the version (a scale-down, an unload): a later
        slot of that index is a new worker, with the next GPU, as TorchServe's new
        WorkerThread; not a restart."""
        self._gpu_ids.pop(index, None)
        self._worker_ids.pop(index, None)

    async def start_worker(self, index: int) -> ProcessWorker:
        """Fork worker `index` and wait until its handler is initialized."""
        archive = self.archive
        spec = WorkerSpec(
            archive=archive,
            index=index,
            batch_size=self.settings.batch_size,
            gpu_id=self.gpu_of(index),
            intra_op_threads=self._intra_op_threads,
            max_image_pixels=self._max_image_pixels,
            max_items_per_request=self._max_items_per_request,
            python_path=() if self._packages is None else (str(self._packages),),
            declared_metrics=self._declared_metrics,
            service_envelope=self._service_envelope,
        )
        label = f"{archive.name}/{archive.version} w{index}"
        worker_id = self._worker_ids.get(index)
        name = None if worker_id is None else worker_name(worker_id, archive.name, archive.version)
        what = f"Model {archive.name} version {archive.version} worker {index}"
        try:
            process = await self._pool.spawn(spec, label=label, worker_name=name)
        except WorkerExit as exc:
            raise HandlerLoadError(f"{what} could not be started: {exc}") from None
        try:
            report = await process.receive(self.settings.startup_timeout_s)
        except TimeoutError:
            raise HandlerLoadError(
                f"{what} did not load within {self.settings.startup_timeout_s:g} s "
                f"(startupTimeout); it was killed"
            ) from None
        except WorkerExit as exc:
            raise HandlerLoadError(f"{what} died while loading: {exc}") from None
        except BaseException:
            process.kill()
            raise
        if report[0] == "failed":
            await process.stop(STOP_GRACE_S)
            raise HandlerLoadError(report[1])
        _, info, metrics = report
        self._report(metrics)
        worker = ProcessWorker(self, index, process, info["device"])
        self._workers.add(worker)
        # A worker that dies is replaced, not closed: forgotten here, or each crash would keep
        # its receive buffer (and the frame it was reading) until the version is unloaded.
        process.exited.add_done_callback(lambda _exit: self._forget(worker))
        log.info("%s: %s on %s, pid %d", label, info["description"], worker.device, process.pid)
        return worker

    async def close(self) -> None:
        """Stop workers still running, then delete the extracted archive."""
        try:
            await asyncio.gather(*(worker.close() for worker in list(self._workers)))
            await asyncio.to_thread(self.archive.remove)
            if self._packages is not None:
                await asyncio.to_thread(shutil.rmtree, self._packages, True)
                self._packages = None
        finally:
            for callback in self.on_close:
                callback()
            self.on_close.clear()

    def _report(self, metrics: Sequence[tuple[str, float, str, dict[str, str], str]]) -> None:
        if self._on_metric is None:
            return
        failed = 0
        for update in metrics:
            try:
                self._on_metric(*update)
            except Exception:
                # Logged once per reply, not once per update: a reply can carry many.
                if not failed:
                    log.exception("%s: a handler metric could not be recorded", self.archive.name)
                failed += 1
        if failed > 1:
            log.error("%s: %d handler metrics of one reply not recorded", self.archive.name, failed)

    def _forget(self, worker: ProcessWorker) -> None:
        self._workers.discard(worker)

    def note_unstreamed(self, api: str) -> None:
        """A streaming handler's intermediate response reached a request whose API answers
        once (v2 infer, v1 predict, unary gRPC): it is dropped, and the client gets the final
        response alone. Said once per API, not in silence."""
        if api in self._unstreamed_apis:
            return
        self._unstreamed_apis.add(api)
        log.warning(
            "Model %s version %s: the handler sent intermediate responses "
            "(send_intermediate_predict_response) to a %s request, which answers once: they "
            "are dropped and the client gets the final response only. Stream with REST "
            "/predictions, gRPC StreamPredictions or StreamPredictions2, or KServe v2 "
            "ModelStreamInfer",
            self.archive.name,
            self.archive.version,
            api,
        )


class ProcessWorker:
    """One worker process of a `WorkerBackend`, as the batcher drives it."""

    # The batcher hands this worker its next batch while it runs the current one: the batch
    # waits in the worker's socket, so the worker goes straight on instead of idling for the
    # frontend's turn-around (at 32 connections on 2 cores, it idled over half the time).
    pipeline_depth = 2
    # responseTimeout is timed on the process's own calls (`WorkerProcess.call`), from when
    # it takes a batch up; past it, the process is killed and replaced.
    keeps_time = True

    def __init__(
        self, backend: WorkerBackend, index: int, process: WorkerProcess, device: str
    ) -> None:
        self.index = index
        self.device = device
        self.pid = process.pid
        self._backend = backend
        self._process = process
        archive = backend.archive
        self._what = f"Model {archive.name} version {archive.version} worker {index}"
        # Ids for requests that arrive without one: unique, and cheaper than a uuid4 each.
        self._id_prefix = f"{uuid.uuid4().hex[:12]}-"
        self._ids = itertools.count()
        self._closed = False

    @property
    def exited(self) -> asyncio.Future[str]:
        """Resolves, with how it ended, once the process is gone."""
        return self._process.exited

    @property
    def alive(self) -> bool:
        return self._process.alive

    def memory_bytes(self) -> int:
        """The process's resident set size (0 once it is gone)."""
        try:
            with open(f"/proc/{self.pid}/statm") as statm:
                return int(statm.read().split()[1]) * _PAGE_SIZE
        except (OSError, ValueError, IndexError):
            return 0

    def _item_headers(self, request: InferenceRequest) -> Mapping[str, str]:
        # torchgate's KServe endpoints unwrap their requests themselves: service_envelope is
        # for TorchServe's own APIs only (the worker skips it for items marked so), and only
        # TorchServe's APIs answer a handler's torch tensor in torch.save's format.
        if request.api in _UNWRAPPED_APIS:
            return {**request.headers, PLAIN_ITEM: "1"}
        return request.headers

    async def predict(self, batch: Sequence[InferenceRequest]) -> list[Prediction]:
        if self._closed:  # stopped on purpose: not a death, and nothing to replace
            raise ModelNotReady(f"{self._what} is closed")
        items = [
            (
                request.request_id or f"{self._id_prefix}{next(self._ids)}",
                self._item_headers(request),
                blobs(request.inputs),
                request.input_types,
            )
            for request in batch
        ]
        timeout = self._backend.settings.response_timeout_s
        on_chunk = _chunk_forwarder(batch, self._backend.note_unstreamed)
        try:
            reply = await self._process.call(("batch", items), timeout, on_chunk)
        except TimeoutError:
            raise DeadlineExceeded(
                f"{self._what} did not answer within {timeout:g} s (responseTimeout); "
                f"it was killed and is being replaced"
            ) from None
        except NotStarted as exc:
            raise NotRun(f"{self._what} died before it started this batch: {exc}") from None
        except WorkerExit as exc:
            raise WorkerDied(f"{self._what} died while running this batch: {exc}") from None
        self._backend._report(reply[-1])
        if reply[0] == "error":
            _, status, message, _ = reply
            if status == 500:
                raise InferenceFailed(message)
            raise error_for_status(status, message)
        return [Prediction(*response) for response in reply[1]]

    async def close(self) -> None:
        self._closed = True
        self._backend._forget(self)
        await self._process.stop(STOP_GRACE_S)


def _chunk_forwarder(
    batch: Sequence[InferenceRequest], unstreamed: Callable[[str], None]
) -> Callable[[list[Any]], None]:
    """Hands each intermediate response to its request's `stream` callback; one whose request
    came through an API that cannot stream is dropped, and `unstreamed(api)` says so."""

    def forward(responses: list[Any]) -> None:
        for idx, *response in responses:
            if not 0 <= idx < len(batch):
                continue
            request = batch[idx]
            if request.stream is not None:
                request.stream(Prediction(*response))
            else:
                unstreamed(request.api)

    return forward
