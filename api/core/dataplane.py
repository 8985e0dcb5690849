"""The protocol-agnostic operations every transport calls: infer, health, metadata.

REST and gRPC endpoints decode their wire format, call one method here and encode the result;
all routing, queueing, deadlines and measurements happen below this line, once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from api.core.registry import ModelVersion, Registry
from api.core.routing import Router
from api.core.sequences import SEQUENCE_ID
from api.core.types import (
    REJECT_DEADLINE,
    REJECT_NOT_READY,
    InferenceRequest,
    NullObserver,
    Observer,
    Prediction,
    header_value,
)
from api.errors import DeadlineExceeded, ModelNotReady, Overloaded, TorchgateError, http_status

log = logging.getLogger(__name__)


# Checks a request against the version it was routed to and returns what that version gets.
class Adapt(Protocol):
    """Checks a request against the version it goes to and returns what that version's
    handler gets (see `DataPlane.infer`); `shadow` for a shadow's copy."""

    def __call__(
        self, model_version: ModelVersion, request: InferenceRequest, /, *, shadow: bool
    ) -> InferenceRequest: ...


@dataclass(slots=True)
class Answer:
    model_version: ModelVersion
    prediction: Prediction


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)


class DataPlane:
    def __init__(
        self,
        registry: Registry,
        *,
        router: Router | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.registry = registry
        self.router = router
        self._observer = observer or NullObserver()
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self.accepting = True

    # -- health ---------------------------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """The server's health (`/ping`, v2 server ready, gRPC Ping and ServerReady).

        TorchServe's rule: healthy while accepting and every model's default version has the
        workers it was asked for (`ModelVersion.healthy`). A model scaled to 0 workers on
        purpose does not make the whole server unhealthy; whether one model can serve now is
        `model_ready`, and describe shows why not.
        """
        if not self.accepting:
            return False
        return all(self.registry.get(name).healthy for name in self.registry.names())

    def model_ready(self, model: str, version: str | None = None) -> bool:
        return self.registry.get(model, version).ready  # raises NotFound

    def note_rejected(self, model: str, version: str, reason: str) -> None:
        """Record a request the transport refused before it reached a model (auth, size)."""
        self._observer.request_rejected(model, version, reason)

    # -- inference ------------------------------------------------------------------------------

    async def infer(
        self,
        model: str,
        version: str | None,
        request: InferenceRequest,
        *,
        adapt: Adapt | None = None,
    ) -> Answer:
        """Route, queue and run one request; raises a `TorchgateError` on failure.

        `adapt(model_version, request, shadow=False)` runs once the version is chosen, before
        queueing: it checks the request against that version (its signature) and returns the
        request that version's handler gets, or raises (BadRequest). Shadow copies are adapted
        to theirs, with `shadow=True`.

        A handler's per-item error (status >= 400) comes back as a `Prediction` with that status,
        not as an exception, so the transport can send the handler's own body.
        """
        request.version_named = version
        return await self._infer(model, version, request, adapt)

    async def _infer(
        self,
        model: str,
        version: str | None,
        request: InferenceRequest,
        adapt: Adapt | None,
        *,
        note_not_ready: bool = True,
    ) -> Answer:
        started = time.monotonic()
        version, shadows = self._route(model, version, request.headers)
        model_version = self._ready_version(model, version, note=note_not_ready)
        for shadow in shadows:
            self._start_shadow(model, shadow, request, adapt)
        if adapt is not None:
            request = adapt(model_version, request, shadow=False)
        try:
            prediction = await self._run(model_version, request)
        except TorchgateError as exc:
            self._observer.request_finished(
                request,
                model,
                model_version.version,
                http_status(exc),
                time.monotonic() - started,
                None,
            )
            raise
        self._observer.request_finished(
            request,
            model,
            model_version.version,
            prediction.status,
            time.monotonic() - started,
            prediction,
        )
        return Answer(model_version, prediction)

    async def infer_many(
        self, model: str, version: str | None, requests: Sequence[InferenceRequest]
    ) -> list[Answer]:
        """Several requests that one client sent together (KServe v1's `instances`).

        They are routed once, from the first one's headers, so every one runs on the same
        version (and each goes to the shadow, if the route has one); then each is queued on its
        own, so the batcher batches them as it would separate requests. The first failure is
        raised and the others still queued are withdrawn. No request: the model and version are
        still checked (404, 503).

        TorchServe takes such a request as one job: one place in the job queue, one step of a
        sequence. So no more of them wait in the queue at once than it had room for when the
        request came (`_infer_in_turns`), and a sequence batching version gets them one after
        another, on one sequence (`_infer_in_sequence`).
        """
        started = time.monotonic()
        named = version
        version, shadows = self._route(model, version, requests[0].headers if requests else {})
        model_version = self._ready_version(model, version)
        for request in requests:
            request.version_named = named
        if model_version.settings.sequence_batching:
            return await self._infer_in_sequence(model, model_version.version, requests, shadows)
        return await self._infer_in_turns(model, model_version, requests, shadows, started)

    async def _infer_in_turns(
        self,
        model: str,
        model_version: ModelVersion,
        requests: Sequence[InferenceRequest],
        shadows: tuple[str, ...],
        started: float,
    ) -> list[Answer]:
        """`infer_many`'s requests, as many queued at once as the queue has room for now
        (at least one: a full queue refuses the first, 503, as it would a lone request); each
        of the rest is queued once an earlier one is answered. Queued all at once, a request
        with more instances than `job_queue_size` would be refused (503) even by an idle
        server, however often it was retried, and a large one would take the whole queue from
        other clients."""
        version = model_version.version
        turns = asyncio.Semaphore(_room(model_version, len(requests)))
        failed = False

        async def in_turn(index: int, request: InferenceRequest) -> Answer:
            nonlocal failed
            await turns.acquire()
            if failed:  # an earlier one failed: the request has; this one is never queued
                raise asyncio.CancelledError
            self._start_shadows(model, shadows, request)
            try:
                # Should the version stop being ready before they run, the client's one
                # request is counted as refused once, not once per instance.
                first = index == 0
                answer = await self._infer(model, version, request, None, note_not_ready=first)
            except BaseException:
                # The turn is not given back: a waiting one would be queued (and refused,
                # and counted) before the gather below withdraws it.
                failed = True
                raise
            turns.release()
            return answer

        tasks = [asyncio.ensure_future(in_turn(i, r)) for i, r in enumerate(requests)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException as exc:
            # The first request is the one the client's request is counted by (`counted`);
            # withdrawn before it finished, it is recorded here, with the failure that ended
            # the client's request.
            first_withdrawn = not tasks[0].done()
            for task in tasks:
                task.cancel()
            # Collect the others' outcomes, so none is left unretrieved.
            await asyncio.gather(*tasks, return_exceptions=True)
            if first_withdrawn and isinstance(exc, TorchgateError):
                self._observer.request_finished(
                    requests[0],
                    model,
                    version,
                    http_status(exc),
                    time.monotonic() - started,
                    None,
                )
            raise

    async def _infer_in_sequence(
        self,
        model: str,
        version: str,
        requests: Sequence[InferenceRequest],
        shadows: tuple[str, ...],
    ) -> list[Answer]:
        """`infer_many`'s requests to a sequence batching version: one after another, each
        once the one before is answered, all on one sequence: the client's
        (`ts_request_sequence_id`) or the one the first request started. TorchServe runs such
        a request as one step of one sequence; queued together they would take as many places
        in the sequence's queue (maxSequenceJobQueueSize, 1 by default: 503) or, without an
        id, start as many sequences (maxNumSequence, 1 by default: 503), none seeing the
        others' state. A failure ends the request: the rest are never queued."""
        answers: list[Answer] = []
        for index, request in enumerate(requests):
            if index:
                request.headers = _in_sequence_of(requests[0], request)
            self._start_shadows(model, shadows, request)
            first = index == 0
            answer = await self._infer(model, version, request, None, note_not_ready=first)
            answers.append(answer)
            if not answer.prediction.ok:  # a handler's error for this step ends the request
                break
        return answers

    def _start_shadows(
        self, model: str, shadows: tuple[str, ...], request: InferenceRequest
    ) -> None:
        for shadow in shadows:
            self._start_shadow(model, shadow, request, None)

    def _ready_version(self, model: str, version: str | None, *, note: bool = True) -> ModelVersion:
        """The version, ready to take a request (or queue it while its workers first start);
        a refusal for not being ready is counted (`torchgate_rejected_total`, unless not
        `note`), as the others before inference are."""
        try:
            return self.registry.ready_version(model, version, or_starting=True)
        except ModelNotReady:
            if note:
                self._observer.request_rejected(model, version or "", REJECT_NOT_READY)
            raise

    def _route(
        self, model: str, version: str | None, headers: Mapping[str, str]
    ) -> tuple[str | None, tuple[str, ...]]:
        """The version a request without one goes to (the traffic policy's choice) and the
        versions shadowing it; a named version is taken as it is."""
        if version is None and self.router is not None:
            choice = self.router.choose(model, headers)
            return choice.version, choice.shadows
        return version, ()

    async def _run(self, model_version: ModelVersion, request: InferenceRequest) -> Prediction:
        future = model_version.batcher.submit(request)
        timeout = model_version.settings.response_timeout_s
        wait = _queue_bound(request, timeout)
        # A request still queued at its deadline is answered 504 and never run (the batcher
        # skips done futures). One handed to a worker is the worker's to time, as in
        # TorchServe, where responseTimeout bounds the handler's time on a batch. A timer, not
        # wait_for: no task or extra future per request. Cancelling this coroutine (the client
        # left) cancels the future the same way.
        timer = future.get_loop().call_later(
            wait, self._deadline_passed, future, request, model_version, timeout
        )
        try:
            return await future
        finally:
            timer.cancel()

    def _deadline_passed(
        self,
        future: asyncio.Future[Prediction],
        request: InferenceRequest,
        model_version: ModelVersion,
        timeout: float,
    ) -> None:
        if future.done():
            return
        if (
            request.requeued
            and not request.dispatched
            and _queue_bound(request, timeout) >= timeout
        ):
            # Given back unrun by a dying worker: queued afresh (as the batcher counts it), so
            # one more responseTimeout before the queue answers it 504. A client's own shorter
            # bound still counts from its arrival.
            request.requeued = False
            future.get_loop().call_later(
                timeout, self._deadline_passed, future, request, model_version, timeout
            )
            return
        if request.dispatched:
            # Looked at again later: it comes back to the queue if its worker dies before
            # starting it, and must not wait there forever if no worker is left to take it.
            # A client's own bound is looked at as often as it asks, but not more than every
            # 10 ms while a worker holds the request.
            recheck = timeout
            if request.queue_timeout_s is not None:
                recheck = max(_queue_bound(request, timeout), 0.01)
            future.get_loop().call_later(
                recheck, self._deadline_passed, future, request, model_version, timeout
            )
            return
        self._observer.request_rejected(model_version.name, model_version.version, REJECT_DEADLINE)
        own = _queue_bound(request, timeout)
        if own < timeout:
            bound = f"the request's timeout of {own * 1e6:.0f} µs"
        else:
            bound = f"its responseTimeout of {timeout:g} s"
        future.set_exception(
            DeadlineExceeded(
                f"Request for model {model_version.name} version {model_version.version} "
                f"waited in the queue past {bound}"
            )
        )

    def _start_shadow(
        self, model: str, version: str, request: InferenceRequest, adapt: Adapt | None
    ) -> None:
        """Send a copy to a shadow version; it never delays, fails or changes the primary."""
        # A handler may mutate its request item; the shadow's must not be the primary's. Nor
        # may a streaming shadow's parts reach the primary's client: they are discarded.
        copy = replace(
            request,
            inputs=dict(request.inputs),
            headers=dict(request.headers),
            stream=None if request.stream is None else discard_part,
        )

        async def shadow() -> None:
            started = time.monotonic()
            status, prediction = 500, None
            try:
                model_version = self.registry.ready_version(model, version, or_starting=True)
                _refuse_shadow_past_half_queue(model_version)
                adapted = copy if adapt is None else adapt(model_version, copy, shadow=True)
                prediction = await self._run(model_version, adapted)
                status = prediction.status
            except TorchgateError as exc:
                status = http_status(exc)
            except Exception:
                log.exception("shadow request to %s/%s failed", model, version)
            self._observer.request_finished(
                request,
                model,
                version,
                status,
                time.monotonic() - started,
                prediction,
                shadow=True,
            )

        task = asyncio.create_task(shadow())
        self._shadow_tasks.add(task)  # keep a reference until done, or the task may vanish
        task.add_done_callback(self._shadow_tasks.discard)

    # -- metadata -------------------------------------------------------------------------------

    def metadata(self, model: str, version: str | None = None) -> ModelMetadata:
        model_version = self.registry.get(model, version)
        signature: Mapping[str, Any] = model_version.backend.signature or {}
        versions = (
            [v.version for v in self.registry.versions(model)]
            if version is None
            else [model_version.version]
        )
        return ModelMetadata(
            name=model,
            versions=versions,
            platform=str(signature.get("platform") or _platform(model_version)),
            inputs=_specs(signature.get("inputs", [])),
            outputs=_specs(signature.get("outputs", [])),
        )


def _platform(model_version: ModelVersion) -> str:
    serialized = str(model_version.backend.manifest.get("model", {}).get("serializedFile", ""))
    if serialized.endswith(".onnx"):
        return "onnxruntime_onnx"
    if serialized.endswith((".pt", ".pth", ".torchscript")):
        return "pytorch_torchscript"
    return "torchserve_handler"


def _specs(entries: Any) -> list[TensorSpec]:
    specs = []
    for entry in entries or []:
        specs.append(
            TensorSpec(
                name=str(entry["name"]),
                datatype=str(entry.get("datatype", "BYTES")),
                shape=[int(d) for d in entry.get("shape", [-1])],
            )
        )
    return specs


def _queue_bound(request: InferenceRequest, timeout: float) -> float:
    """How long `request` may wait in the queue: the version's responseTimeout (`timeout`), or
    the client's own bound when that is shorter."""
    if request.queue_timeout_s is None:
        return timeout
    return min(request.queue_timeout_s, timeout)


def _room(model_version: ModelVersion, count: int) -> int:
    """How many of `count` requests of one client may wait in `model_version`'s queue at
    once: the room it has now, at least one, at most `count`."""
    batcher = model_version.batcher
    return max(1, min(count, batcher.queue_size - batcher.depth))


def _refuse_shadow_past_half_queue(model_version: ModelVersion) -> None:
    """Overloaded (the shadow copy is dropped, counted as a shadow 503) when `model_version`'s
    job queue is more than half full. Its queue is shared with its real requests (it may
    carry weight too, or be named): copies filling it would get those refused. Checked just
    before queueing, with no await between, so the copies never take more than half."""
    batcher = model_version.batcher
    # The copy would be one more: it may take the queue to half, not past. The queue's length
    # (answered requests included) is a cheap upper bound; only past it are live ones counted.
    limit = batcher.queue_size
    if 2 * (batcher.depth_at_most + 1) > limit and 2 * (batcher.depth + 1) > limit:
        raise Overloaded(
            f"Shadow copy for model {model_version.name} version {model_version.version} "
            f"dropped: it would fill more than half of its job queue ({limit})"
        )


def _in_sequence_of(first: InferenceRequest, request: InferenceRequest) -> Mapping[str, str]:
    """`request`'s headers, naming the sequence `first` ran on: the client's id (already
    there), or the one the sequence batcher gave `first` (`SequenceBatcher.submit`). Not a
    start: only `first` is. A backend that keeps sequences itself (a remote TorchServe) gives
    no id back: then each request starts a sequence there, as a lone one would."""
    if header_value(request.headers, SEQUENCE_ID):
        return request.headers
    sequence_id = header_value(first.headers, SEQUENCE_ID)
    if not sequence_id:
        return request.headers
    return {**request.headers, SEQUENCE_ID: sequence_id}


def discard_part(prediction: Prediction) -> None:
    """Where intermediate responses go that nobody sends on, on purpose: a shadow copy's, and
    those a worker still sends for a stream whose request has ended (its 504, its client
    gone). A request's `stream` of None would say its API answers once (`note_unstreamed`)."""
