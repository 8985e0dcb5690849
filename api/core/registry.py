"""Which model versions exist, their state, workers and default version.

The registry owns each version's batcher and worker tasks; backends are built elsewhere (the app
factory injects a `BackendFactory`) so the core never imports a backend. A version whose backend
does not batch (a remote TorchServe) still goes through a `Batcher` of size 1: the queue bound,
deadlines and disconnect handling then apply to it too.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from api.core.batching import Batcher
from api.core.names import check_model_name, check_model_version
from api.core.sequences import SequenceBatcher, sequence_limits
from api.core.supervision import StartWorker, WorkerSlot, start_error, supervise
from api.core.types import Backend, ModelSettings, NullObserver, Observer, Worker
from api.errors import (
    BadRequest,
    Conflict,
    DefaultVersionInUse,
    HandlerLoadError,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    TorchgateError,
    VersionNotFound,
)

log = logging.getLogger(__name__)

BackendFactory = Callable[[], Awaitable[Backend]]
# How a new slot's first start ended: None once its worker started, else the error (a slot
# stopped before its start ended gets one saying so). By slot index.
FirstStarts = dict[int, asyncio.Future[Exception | None]]


class StoppedBeforeStart(ModelNotReady):
    """A new slot's worker was stopped (scaled away, unloaded) before its first start ended."""


class ModelState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    UNLOADING = "UNLOADING"


@dataclass(eq=False)
class ModelVersion:
    name: str
    version: str
    url: str
    settings: ModelSettings
    backend: Backend
    batcher: Batcher
    state: ModelState = ModelState.LOADING
    workers: list[WorkerSlot] = field(default_factory=list)
    loaded_at: float = field(default_factory=time.time)
    # Free-form description of where inference happens, e.g. {"kind": "local"}.
    backend_info: dict[str, Any] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.unavailable is None

    @property
    def unavailable(self) -> str | None:
        """Why this version cannot take requests now, or None when it can."""
        if (
            self.state is ModelState.READY
            and getattr(self.backend, "unavailable", None) is None
            and any(slot.live for slot in self.workers)
        ):
            return None  # every request asks: the common answer first, without the message
        what = f"Model {self.name} version {self.version}"
        errors = "; ".join(slot.last_error for slot in self.workers if slot.last_error)
        if self.state is ModelState.FAILED:
            return f"{what} failed: {errors or 'no worker could be started'}"
        if self.state is not ModelState.READY:
            return f"{what} is not ready ({self.state.value})"
        # A remote backend reports why its server cannot serve (see `Backend`).
        remote: str | None = getattr(self.backend, "unavailable", None)
        if remote is not None:
            return remote
        if any(slot.live for slot in self.workers):
            return None
        if not self.workers:
            return f"{what} has no workers"
        return f"{what} has no live worker: {errors or 'starting'}"

    @property
    def first_starting(self) -> bool:
        """No worker lives, but one is being started for the first time and has not failed
        yet (an asynchronous register, a scale-up from 0): a request may wait in the queue for
        it, as TorchServe holds it. A worker being restarted after a crash or a failed start
        is not one: that window is refused with Retry-After (docs/compatibility.md)."""
        return (
            self.state is ModelState.READY
            and getattr(self.backend, "unavailable", None) is None
            and any(
                slot.worker is None and slot.starting and slot.failed_starts == 0
                for slot in self.workers
            )
        )

    @property
    def healthy(self) -> bool:
        """TorchServe's rule for `/ping`: at least `min_workers` workers that are serving or
        still being (re)started; a worker that has kept failing for maxRetryTimeoutInSec (300 s
        by default) does not count, as TorchServe's past its retry window. (That window is
        longer than `FAILED_AFTER` failed starts, which mark the version FAILED for its own
        clients at once.) A version scaled to 0 on purpose is healthy: it lacks nothing it was
        asked to have."""
        if self.state not in (ModelState.READY, ModelState.FAILED):
            return False
        window = self.settings.max_retry_timeout_s
        if getattr(self.backend, "unavailable", None) is not None:
            # A remote TorchServe that cannot serve counts as a worker that keeps failing:
            # past the same window only. At once, a blip of it made the whole server unready,
            # and a load balancer took every model away with it.
            since = getattr(self.backend, "unavailable_since", None)
            return since is not None and time.monotonic() - since < window
        working = sum(1 for slot in self.workers if not slot.given_up(window))
        return working >= self.settings.min_workers

    def health_changed(self) -> None:
        """A worker died, failed to start or came back: FAILED once no worker lives and a slot
        has failed to start `FAILED_AFTER` times in a row; READY again once one lives."""
        if self.state is ModelState.READY and any(slot.failed for slot in self.workers):
            if not any(slot.live for slot in self.workers):
                self.state = ModelState.FAILED
                # What was queued for its workers (while they first started, or for a
                # crashed one's replacement) would otherwise wait out its response timeout
                # for starts that keep failing: answered now, with the handler's error.
                reason = self.unavailable or f"Model {self.name} version {self.version} failed"
                self.batcher.fail_queued(ModelNotReady(reason))
        elif self.state is ModelState.FAILED and any(slot.live for slot in self.workers):
            self.state = ModelState.READY


class Registry:
    """Model versions by name; every mutation happens on the event loop."""

    def __init__(
        self, observer: Observer | None = None, *, max_workers_per_model: int | None = None
    ) -> None:
        self._observer = observer or NullObserver()
        # Each worker is a process holding its own copy of the model: an unbounded count lets
        # one management call exhaust the machine's memory. None: no bound (tests).
        self.max_workers_per_model = max_workers_per_model
        self._models: dict[str, dict[str, ModelVersion]] = {}
        self._defaults: dict[str, str] = {}
        self._lock = asyncio.Lock()  # serialises scale/unregister, not inference
        self._registering: set[tuple[str, str]] = set()  # versions being loaded (`register`)
        self._closing = False
        self._worker_ids = itertools.count(9000)  # describe's worker ids (`WorkerSlot.id`)
        # Stops running (scale-downs, unloads), by the version they stop: its unregister waits
        # for them, `close` for all.
        self._stopping: dict[asyncio.Task[None], ModelVersion] = {}
        self.on_change: list[Callable[[], None]] = []
        # Names of the models loaded at server start (describe's loadedAtStartup: TorchServe
        # answers it per model name, so a version registered later says true too). A model
        # unregistered (every version of it) leaves it, as TorchServe's startupModels.
        self.loaded_at_startup: set[str] = set()
        # Told the name of a model whose last version was unregistered.
        self.on_model_gone: list[Callable[[str], None]] = []
        # Asked (model, version) before a version is unloaded; raising (e.g. Conflict) refuses.
        self.before_unregister: list[Callable[[str, str], None]] = []
        # Told (model, version) once an unregistered version is unloaded: nothing of it runs.
        self.on_version_gone: list[Callable[[str, str], None]] = []

    # -- reads ----------------------------------------------------------------------------------

    def taken(self, name: str) -> bool:
        """Whether a model of this name exists or has a version loading."""
        return name in self._models or any(n == name for n, _ in self._registering)

    def names(self) -> list[str]:
        return sorted(self._models)

    def __iter__(self) -> Iterator[ModelVersion]:
        for name in self.names():
            yield from self.versions(name)

    def versions(self, name: str) -> list[ModelVersion]:
        versions = self._models.get(name)
        if not versions:
            raise ModelNotFound(f"Model not found: {name}")
        return [versions[v] for v in sorted(versions, key=_version_key)]

    def default_version(self, name: str) -> str:
        if name not in self._models:
            raise ModelNotFound(f"Model not found: {name}")
        return self._defaults[name]

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        versions = self._models.get(name)
        if not versions:
            raise ModelNotFound(f"Model not found: {name}")
        if version is None:
            version = self._defaults[name]
        try:
            return versions[version]
        except KeyError:
            raise VersionNotFound(
                f"Model version: {version} does not exist for model: {name}"  # TorchServe's
            ) from None

    def ready_version(
        self, name: str, version: str | None = None, *, or_starting: bool = False
    ) -> ModelVersion:
        """The version, if it can take a request now; else `ModelNotReady` (503) with why.

        `or_starting` (predictions): a version whose workers are all still starting for the
        first time (`ModelVersion.first_starting`) takes it too, queued until one is up and
        bounded by its response timeout, as TorchServe holds it. It stays not ready (v2
        ready, `/ping`, routing) until then.
        """
        model_version = self.get(name, version)
        reason = model_version.unavailable
        # Only a version without a live worker pays for the look at its starts.
        if reason is not None and not (or_starting and model_version.first_starting):
            # A registered version's worker being replaced (or its remote server being
            # reconnected) is back within seconds: say when to try again.
            serving = model_version.state is ModelState.READY
            raise ModelNotReady(reason, retry_after=1 if serving else None)
        return model_version

    # -- mutations ------------------------------------------------------------------------------

    async def register(
        self,
        name: str,
        version: str,
        url: str,
        backend_factory: BackendFactory,
        settings: ModelSettings,
        *,
        make_default: bool = False,
        backend_info: dict[str, Any] | None = None,
        keep_failed: bool = False,
        wait: bool = True,
    ) -> ModelVersion:
        """Load a model version and start its `min_workers` workers, side by side.

        The first version of a model becomes its default. Raises `Conflict` if the version
        exists; a backend that fails to load raises and leaves nothing registered. A handler
        that fails to start raises its error (`HandlerLoadError`) too, unless `keep_failed`
        (server start-up, as TorchServe): then the version stays registered, its workers keep
        being retried with backoff, and it reports the handler's error until one starts.

        `wait=False` (TorchServe's asynchronous register) returns once the version is
        registered: its workers start in the background, and failing ones are retried as
        with `keep_failed`.
        """
        # Here, not at each source (url, model_name, manifest, snapshot), so none can skip it.
        check_model_name(name)
        check_model_version(version)
        key = (name, version)
        if self._closing:
            raise Overloaded(f"Model {name} version {version}: the server is stopping")
        if version in self._models.get(name, {}) or key in self._registering:
            raise Conflict(f"Model version {version} is already registered for model {name}")
        # Reserved, then loaded without the lock: one handler's slow `initialize` (up to its
        # startupTimeout per worker) must not hold up every other model's start, nor every
        # management call meanwhile.
        self._registering.add(key)
        try:
            backend = await backend_factory()
            batcher = _make_batcher(name, version, settings, backend, self._observer)
            model_version = ModelVersion(
                name, version, url, settings, backend, batcher, backend_info=backend_info or {}
            )
            try:
                if keep_failed:  # start-up: config.properties or a snapshot asked for too many
                    self._clamp(model_version)
                else:
                    self._check_bound(backend, settings.min_workers, settings.max_workers)
                starts = self._start_in_background(model_version, settings.min_workers)
                if wait:
                    failed = await _failed_starts(starts, until_first=not keep_failed)
                    _raise_or_keep(f"{name}/{version}", failed, keep_failed=keep_failed)
                if self._closing:  # `close` began while it loaded: it would outlive the server
                    raise Overloaded(f"Model {name} version {version}: the server is stopping")
            except BaseException:
                await self._stop_workers(model_version, len(model_version.workers))
                await backend.close()
                raise
        finally:
            self._registering.discard(key)
        # Published in one step, with no await: no other mutation can come in between.
        model_version.state = ModelState.READY
        self._models.setdefault(name, {})[version] = model_version
        if make_default or name not in self._defaults:
            self._defaults[name] = version
        self._changed()
        log.info("registered %s/%s with %d workers", name, version, len(model_version.workers))
        return model_version

    async def unregister(self, name: str, version: str | None = None) -> ModelVersion:
        """Stop taking requests for a version, finish what it has queued, then unload it.

        Without a version, unregisters the default one. The default version of a model with
        other versions cannot be removed (TorchServe answers the same): set another default
        first.
        """
        async with self._lock:
            model_version = self.get(name, version)
            # A version still loading counts: removing the default beside it would leave the
            # model unknown (404) until it is published, and for good should it fail.
            others = [v for v in self._models[name] if v != model_version.version]
            others += [v for n, v in self._registering if n == name]
            if others and self._defaults[name] == model_version.version:
                raise DefaultVersionInUse(
                    f"Cannot remove default version for model {name} (version "
                    f"{model_version.version}): set another default version first"
                )
            for guard in self.before_unregister:
                guard(name, model_version.version)
            model_version.state = ModelState.UNLOADING
            del self._models[name][model_version.version]
            if not self._models[name]:
                del self._models[name]
                del self._defaults[name]
                self._model_gone(name)
        # Shielded, as every stop: a caller that goes away (a gRPC deadline, a client's
        # disconnect) must not leave the version half unloaded, its workers running and the
        # snapshot still naming it.
        await asyncio.shield(self._in_background(model_version, self._unload(model_version)))
        return model_version

    async def _unload(self, model_version: ModelVersion) -> None:
        try:
            await model_version.batcher.drain()
        finally:
            # Its workers a scale-down is still stopping: done before the backend (and the
            # archive it extracted) goes. Other versions' are not waited for, nor this unload
            # itself (a stop in `_stopping` too).
            this = asyncio.current_task()
            stopping = [
                task
                for task, of in self._stopping.items()
                if of is model_version and task is not this
            ]
            if stopping:
                await asyncio.gather(*stopping, return_exceptions=True)
            try:
                await self._stop_workers(model_version, len(model_version.workers))
                await model_version.backend.close()
            finally:
                self._version_gone(model_version)
        self._changed()

    def _version_gone(self, model_version: ModelVersion) -> None:
        for callback in self.on_version_gone:
            try:
                callback(model_version.name, model_version.version)
            except Exception:
                log.exception("on_version_gone callback %r failed", callback)

    def set_default(self, name: str, version: str) -> None:
        self.get(name, version)  # raises NotFound for an unknown version
        self._defaults[name] = version
        self._changed()

    async def scale(
        self,
        name: str,
        version: str | None,
        min_workers: int,
        max_workers: int,
        *,
        wait: bool = True,
    ) -> None:
        """Set the worker range; start or stop workers only to come within it, as TorchServe
        does (3 workers stay 3 for a range of 1..4, and become 2 for 1..2).

        New workers start side by side, in slots added at once (describe shows them
        STARTING; `/ping` counts them), each retried with backoff while its start fails, as
        any worker's restart. The workers leaving take no new batch from then on and finish
        the one in hand.

        `wait=False` (TorchServe's asynchronous scale) returns once the range is set. Else it
        returns once the new workers have started, or the leaving ones stopped; a new worker
        that failed to start raises `HandlerLoadError` with the handler's error, and its slot
        stays, retried, the range kept (TorchServe answers 500 and keeps its worker threads
        retrying). Cancelled, the caller leaves the slots to their retries all the same.
        """
        async with self._lock:
            model_version = self.get(name, version)
            self._check_range(model_version, min_workers, max_workers)
            _update(model_version.settings, min_workers=min_workers, max_workers=max_workers)
            have = len(model_version.workers)
            starts: FirstStarts = {}
            stopping: list[WorkerSlot] = []
            if min_workers > have:
                starts = self._start_in_background(model_version, min_workers - have)
            elif max_workers < have:
                stopping = _leaving(model_version, have - max_workers)
        # Outside the lock: a worker finishing (or timing out) its batch must not hold up every
        # other management call. A task of its own, shielded when waited for: a caller that
        # goes away must not cut the stop short and leave the leaving processes running.
        # Started before `_changed`, which may raise (a snapshot that cannot be written).
        task = None
        if stopping:
            task = self._in_background(model_version, self._stop_slots(model_version, stopping))
        self._changed()
        if not wait:
            return
        if task is not None:
            await asyncio.shield(task)
        failed = await _failed_starts(starts)
        if any(isinstance(e, StoppedBeforeStart) for e in failed.values()):
            # Unloaded meanwhile (a DELETE): its workers never started, and the client is
            # told the version is gone, not that it was scaled.
            self._raise_if_gone(model_version, version)
        # A slot scaled away meanwhile (a later scale) did not fail.
        errors = dict.fromkeys(
            start_error(error)
            for error in failed.values()
            if not isinstance(error, StoppedBeforeStart)
        )
        if errors:
            raise HandlerLoadError(
                f"Failed to start workers for model {model_version.name} version "
                f"{model_version.version}: {'; '.join(errors)}"
            )

    def _raise_if_gone(self, model_version: ModelVersion, version: str | None) -> None:
        """The not-found error a call naming `version` of this model would raise now, if
        `model_version` is no longer registered; 503 if the server's stop took its slots."""
        name = model_version.name
        if self._closing:
            raise Overloaded(
                f"Model {name} version {model_version.version}: the server is stopping"
            )
        if self._models.get(name, {}).get(model_version.version) is model_version:
            return
        self.get(name, version)  # the model, or the version named, is gone: raises
        # Only when the same version was registered again meanwhile: a new one, not scaled.
        raise VersionNotFound(
            f"Model version: {model_version.version} of model: {name} was unregistered "
            "while its workers started"
        )

    def check_scale(
        self, name: str, version: str | None, min_workers: int, max_workers: int
    ) -> None:
        """Raise, changing nothing, where `scale` would refuse this range (BadRequest): for a
        caller that changes other settings with the same request."""
        self._check_range(self.get(name, version), min_workers, max_workers)

    def _in_background(
        self, model_version: ModelVersion, stop: Coroutine[Any, Any, None]
    ) -> asyncio.Task[None]:
        """Run `stop` (a stop of some of `model_version`'s workers, or of all of it) to its
        end whoever waits for it; `unregister` and `close` wait for it."""
        task = asyncio.create_task(stop, name=f"{model_version.name}/{model_version.version}")
        self._stopping[task] = model_version
        task.add_done_callback(self._stopped)
        return task

    def _stopped(self, task: asyncio.Task[None]) -> None:
        self._stopping.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            # Said here: its caller may have gone away (or never waited: a 202 scale).
            log.error("stopping %s failed", task.get_name(), exc_info=task.exception())

    def update_batching(
        self,
        name: str,
        version: str | None,
        *,
        batch_size: int | None = None,
        max_batch_delay_ms: float | None = None,
        response_timeout_s: float | None = None,
    ) -> None:
        model_version = self.get(name, version)
        changes: dict[str, Any] = {
            key: value
            for key, value in (
                ("batch_size", batch_size),
                ("max_batch_delay_ms", max_batch_delay_ms),
                ("response_timeout_s", response_timeout_s),
            )
            if value is not None
        }
        _update(model_version.settings, **changes)
        model_version.batcher.set_limits(
            **_batcher_limits(model_version.settings, model_version.backend)
        )
        self._changed()

    async def close(self) -> None:
        """Graceful shutdown: drain every version's queue, then stop workers and backends.

        Draining waits at most the longest response timeout (plus a little): by then every
        accepted request has had its answer or its 504.
        """
        self._closing = True
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
        versions = list(self)
        longest = max((v.settings.response_timeout_s for v in versions), default=0.0)
        drains = asyncio.gather(*(v.batcher.drain() for v in versions), return_exceptions=True)
        try:
            await asyncio.wait_for(drains, longest + 5.0)
        except TimeoutError:
            log.error("shutdown: queues not drained after %.0f s; stopping workers", longest + 5)
        for model_version in versions:
            await self._stop_workers(model_version, len(model_version.workers))
            await model_version.backend.close()
        self._models.clear()
        self._defaults.clear()

    # -- internals -----------------------------------------------------------------------------

    def _bound(self, backend: Backend) -> int | None:
        # A remote TorchServe's "workers" are in-flight request slots, not processes: the
        # backend bounds them itself.
        if not getattr(backend, "worker_processes", True):
            return getattr(backend, "max_workers", None)
        return self.max_workers_per_model

    def _check_range(self, model_version: ModelVersion, min_workers: int, max_workers: int) -> None:
        """BadRequest for a range above the bound, or not a range (`ModelSettings`' checks)."""
        self._check_bound(model_version.backend, min_workers, max_workers)
        try:
            replace(model_version.settings, min_workers=min_workers, max_workers=max_workers)
        except ValueError:
            raise BadRequest(
                f"Invalid worker range: min_worker={min_workers}, max_worker={max_workers}"
            ) from None

    def _check_bound(self, backend: Backend, min_workers: int, max_workers: int) -> None:
        bound = self._bound(backend)
        if bound is not None and max(min_workers, max_workers) > bound:
            raise BadRequest(
                f"Worker count above the bound of {bound} workers per model "
                f"({_bound_source(backend)}): min_worker={min_workers}, max_worker={max_workers}"
            )

    def _clamp(self, model_version: ModelVersion) -> None:
        """Bring start-up settings within the bound, in place (the backend holds the same
        object): a server that refused to start over a worker count would serve nothing, so
        the count is lowered and the log says so."""
        settings = model_version.settings
        bound = self._bound(model_version.backend)
        if bound is None or max(settings.min_workers, settings.max_workers) <= bound:
            return
        log.warning(
            "%s/%s asks for minWorkers=%d, maxWorkers=%d: clamped to %d (%s)",
            model_version.name,
            model_version.version,
            settings.min_workers,
            settings.max_workers,
            bound,
            _bound_source(model_version.backend),
        )
        _update(
            settings,
            min_workers=min(settings.min_workers, bound),
            max_workers=min(settings.max_workers, bound),
        )

    def _start_in_background(self, model_version: ModelVersion, count: int) -> FirstStarts:
        """Add `count` slots whose supervisors start their workers (side by side), retrying a
        failed start with backoff as any restart. A synchronous caller waits for what the
        first starts return (`_failed_starts`); the slots are supervised whether it does."""
        starts: FirstStarts = {}
        for _ in range(count):
            slot = WorkerSlot(_free_index(model_version), None, starting=True)
            starts[slot.index] = self._supervise(model_version, slot)
        return starts

    def _supervise(
        self, model_version: ModelVersion, slot: WorkerSlot
    ) -> asyncio.Future[Exception | None]:
        """Start supervising `slot`; the future settles with its first start's outcome."""
        slot.id = next(self._worker_ids)
        numbered = getattr(model_version.backend, "worker_slot_numbered", None)
        if numbered is not None:  # a worker backend names the slot's processes after its id
            numbered(slot.index, slot.id)
        label = f"{model_version.name}/{model_version.version}"
        first_start: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        slot.task = asyncio.create_task(
            supervise(
                slot,
                model_version.batcher,
                _settling(first_start, model_version.backend.start_worker),
                model_version.health_changed,
                label,
            ),
            name=f"worker {label}#{slot.index}",
        )
        # Stopped before its start ended (a scale-down, an unload, a failed registration's
        # cleanup): whoever waits for it is told, not left waiting.
        stopped = StoppedBeforeStart(f"{label} worker {slot.index} was stopped before it started")
        slot.task.add_done_callback(lambda _task: _settle(first_start, stopped))
        model_version.workers.append(slot)
        return first_start

    async def _stop_workers(self, model_version: ModelVersion, count: int) -> None:
        count = min(count, len(model_version.workers))
        slots = [model_version.workers.pop() for _ in range(count)]
        _removed(model_version, slots)
        await self._stop_slots(model_version, slots)

    async def _stop_slots(self, model_version: ModelVersion, slots: list[WorkerSlot]) -> None:
        # Every leaving worker stops taking batches at once; then each finishes the one in
        # hand, side by side (one after another, n slots could take n response timeouts).
        tasks = [slot.task for slot in slots if slot.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for slot in slots:
            if slot.worker is None:
                continue
            try:
                await slot.worker.close()
            except Exception:
                log.exception("closing worker %s of %s", slot.index, model_version.name)
        if not model_version.workers:
            # Nobody is left to serve the queue: answer it now rather than at each deadline.
            model_version.batcher.fail_queued(
                ModelNotReady(
                    f"Model {model_version.name} version {model_version.version} has no workers"
                )
            )

    def _model_gone(self, name: str) -> None:
        # Registered again, it is a model the server did not start with.
        self.loaded_at_startup.discard(name)
        for callback in self.on_model_gone:
            callback(name)

    def _changed(self) -> None:
        for callback in self.on_change:
            try:
                callback()
            except TorchgateError:
                raise
            except Exception:
                log.exception("registry change callback failed")


def _settling(outcome: asyncio.Future[Exception | None], start: StartWorker) -> StartWorker:
    """`start`, settling `outcome` with what its first call returns: None for a worker, else
    the error. The supervisor then carries on as for any start (a failed one is retried)."""

    async def start_worker(index: int) -> Worker:
        try:
            worker = await start(index)
        except Exception as exc:
            _settle(outcome, exc)
            raise
        _settle(outcome, None)
        return worker

    return start_worker


def _settle(outcome: asyncio.Future[Exception | None], result: Exception | None) -> None:
    if not outcome.done():
        outcome.set_result(result)


async def _failed_starts(starts: FirstStarts, *, until_first: bool = False) -> dict[int, Exception]:
    """Wait for the first start of each of `starts`' slots; the errors of those that failed.
    `until_first`: stop waiting at the first failure (a registration that fails with it
    need not wait for the others' starts, nor its failed slot retry meanwhile). Cancelled,
    it leaves the slots as they are: supervised, starting or retrying."""
    failed: dict[int, Exception] = {}
    pending = set(starts.values())
    while pending and not (until_first and failed):
        _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        failed = {i: error for i, o in starts.items() if o.done() and (error := o.result())}
    return failed


def _raise_or_keep(label: str, failed: dict[int, Exception], *, keep_failed: bool) -> None:
    """A registration's failed first starts: the first one's error fails it, unless
    `keep_failed` (server start-up), where each is logged and its slot keeps being retried."""
    if failed and not keep_failed:
        raise next(iter(failed.values()))
    for index, error in failed.items():
        # `torchgate start` tells the operator from this line (api.commands.launch).
        log.error("%s worker %d failed to start: %s", label, index, start_error(error))


def _update(settings: ModelSettings, **changes: Any) -> None:
    """Change settings in place (backends hold the same object), validated before anything is
    stored: `replace` runs the checks of `ModelSettings.__post_init__` on a copy first."""
    checked = replace(settings, **changes)
    for name in changes:
        setattr(settings, name, getattr(checked, name))


def _batcher_limits(settings: ModelSettings, backend: Backend) -> dict[str, Any]:
    """A version's batcher limits; a backend that batches on its own side gets batches of 1."""
    return {
        "max_batch_size": settings.batch_size if backend.batches else 1,
        "max_batch_delay_s": settings.max_batch_delay_ms / 1000.0 if backend.batches else 0.0,
        "queue_size": settings.job_queue_size,
        "response_timeout_s": settings.response_timeout_s,
    }


def _make_batcher(
    name: str, version: str, settings: ModelSettings, backend: Backend, observer: Observer
) -> Batcher:
    """A version's batcher: per-sequence queues for TorchServe's sequenceBatching models."""
    limits = _batcher_limits(settings, backend)
    # A remote TorchServe (a backend that does not batch) keeps its sequences itself: pass
    # requests (and the sequence header) on.
    if not (settings.sequence_batching and backend.batches):
        return Batcher(model=name, version=version, observer=observer, **limits)
    if settings.sequence_max_idle_ms <= 0:
        log.warning(
            "%s/%s: sequenceBatching without sequenceMaxIdleMSec > 0: TorchServe then refuses "
            "every request (503), and so does torchgate",
            name,
            version,
        )
    return SequenceBatcher(
        model=name,
        version=version,
        observer=observer,
        limits=sequence_limits(
            max_num_sequence=settings.max_num_sequence,
            max_sequence_job_queue_size=settings.max_sequence_job_queue_size,
            sequence_max_idle_ms=settings.sequence_max_idle_ms,
            sequence_timeout_ms=settings.sequence_timeout_ms,
        ),
        **limits,
    )


def _bound_source(backend: Backend) -> str:
    if getattr(backend, "worker_processes", True):
        return "torchgate.max_workers_per_model"
    return "requests in flight to one TorchServe"


def _leaving(model_version: ModelVersion, count: int) -> list[WorkerSlot]:
    """Take the `count` slots a scale-down stops off the version: those without a live worker
    first (starting, restarting or failing), then the newest; a scale-down that kept a failing
    worker and stopped a serving one would leave the version with less than it asked for."""
    slots = model_version.workers
    order = sorted(range(len(slots)), key=lambda i: (slots[i].live, -i))
    chosen = set(order[:count])
    leaving = [slots[i] for i in sorted(chosen, reverse=True)]
    slots[:] = [slot for i, slot in enumerate(slots) if i not in chosen]
    _removed(model_version, leaving)
    return leaving


def _removed(model_version: ModelVersion, slots: list[WorkerSlot]) -> None:
    """Tell a backend that keeps something per slot index (a worker backend's GPU, kept across
    a slot's restarts) that these slots are gone: a new slot may take their index at once."""
    removed = getattr(model_version.backend, "worker_slot_removed", None)
    if removed is not None:
        for slot in slots:
            removed(slot.index)


def _free_index(model_version: ModelVersion) -> int:
    taken = {slot.index for slot in model_version.workers}
    index = 0
    while index in taken:
        index += 1
    return index


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Order "1.0" < "2.0" < "10.0", with non-numeric parts after numeric ones."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in version.split("."))
