"""Messages and extension points shared by the core, the backends and the transports.

Nothing here knows HTTP or gRPC: a transport decodes its wire format into an `InferenceRequest`,
the dataplane answers with a `Prediction`, and the transport encodes that back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)

# The APIs a request can arrive through; metrics and access logs label requests with these.
API_TORCHSERVE_REST = "torchserve-rest"
API_TORCHSERVE_GRPC = "torchserve-grpc"
API_V2_REST = "v2-rest"
API_V2_GRPC = "v2-grpc"
API_V1_REST = "v1-rest"  # KServe v1 (api.rest.kserve_v1)


@dataclass(slots=True)
class InferenceRequest:
    """One client request, shaped the way a TorchServe handler receives one item of a batch.

    `inputs` is TorchServe's request item: a raw body under "body", form fields under their own
    names. Values are bytes, str, or already-parsed JSON; v2 requests arrive as
    `{"body": {"inputs": [{"name", "shape", "datatype", "data": numpy array}], ...}}`.
    """

    inputs: dict[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)
    request_id: str = ""
    api: str = API_TORCHSERVE_REST
    # Set by the transport for v2 requests: the handler then answers with v2 tensors.
    kserve_v2: bool = False
    # Receives a streaming handler's intermediate responses (TorchServe's
    # send_intermediate_predict_response), in order, before the final Prediction. None: the
    # transport does not stream, and intermediate responses are dropped.
    stream: Callable[[Prediction], None] | None = None
    # True while the request is in a batch handed to a worker (`batching.predict_in_time`):
    # then the worker's responseTimeout clock, not the request's deadline in the queue,
    # governs it.
    dispatched: bool = False
    # Set when a worker gave the request back unrun (it died first): the request queues afresh,
    # and the dataplane's queue timer gives it another wait rather than its arrival deadline.
    requeued: bool = False
    # The content type of each input that came with one (a body's, a multipart file's), as
    # TorchServe's frontend sends it beside the value; its handlers read it from the request
    # headers (`context.get_request_header(idx, "body")["content-type"]`).
    input_types: Mapping[str, str] = field(default_factory=dict)
    # The client's own bound on its wait in the queue (v2's `timeout` parameter), in seconds;
    # the version's responseTimeout bounds it either way.
    queue_timeout_s: float | None = None
    # The version the client named, None for the default (set by `DataPlane.infer`): TorchServe's
    # ts_* metrics label a request by it, "default" when it named none.
    version_named: str | None = None
    # False for the second and later of the requests one client request was split into (KServe
    # v1's instances): TorchServe's ts_* metrics count a client's request once.
    counted: bool = True


def header_value(headers: Mapping[str, str], name: str) -> str | None:
    """`headers[name]` for a lower-case `name`, whatever the case of the keys.

    The transports pass lower-case names, so the direct lookup almost always answers.
    """
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value


@dataclass(slots=True)
class Prediction:
    """One response, for one request: what the handler returned and the status it set."""

    body: Any
    status: int = 200
    message: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    # How long the request waited in the queue and the size of the batch it ran in;
    # filled in by the batcher for access logs and response headers.
    queue_seconds: float = 0.0
    batch_size: int = 1

    @property
    def ok(self) -> bool:
        return self.status < 400


@dataclass(slots=True)
class ModelSettings:
    """Per model version settings, named and defaulted as TorchServe's `models={...}` keys."""

    batch_size: int = 1
    max_batch_delay_ms: float = 100.0
    response_timeout_s: float = 120.0
    job_queue_size: int = 100
    min_workers: int = 1
    max_workers: int = 1
    # How long a worker may take to load the handler (TorchServe's startupTimeout).
    startup_timeout_s: float = 120.0
    # TorchServe's stateful (sequence batching) keys, from model-config.yaml: a request's
    # sequence id pins it to one worker, which keeps that sequence's state between requests.
    sequence_batching: bool = False
    sequence_max_idle_ms: int = 0
    sequence_timeout_ms: int = 0
    max_num_sequence: int = 1
    max_sequence_job_queue_size: int = 1
    # model-config.yaml's useVenv: the archive's requirements go into a per-model environment.
    use_venv: bool = False
    # model-config.yaml's maxRetryTimeoutInSec: how long a worker may keep failing (to start,
    # or dying before it serves again) and still count toward the server's health (/ping).
    max_retry_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_batch_delay_ms < 0:
            raise ValueError(f"max_batch_delay must be >= 0, got {self.max_batch_delay_ms}")
        if self.response_timeout_s <= 0:
            raise ValueError(f"response_timeout must be > 0, got {self.response_timeout_s}")
        if self.startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout must be > 0, got {self.startup_timeout_s}")
        if self.job_queue_size < 1:
            raise ValueError(f"job_queue_size must be >= 1, got {self.job_queue_size}")
        # 0/0 is a version registered without workers (TorchServe's register default).
        if self.min_workers < 0 or self.max_workers < self.min_workers:
            raise ValueError(
                f"need 0 <= min_workers <= max_workers, got {self.min_workers}/{self.max_workers}"
            )


class NotRun(Exception):
    """Raised by `Worker.predict` for a batch the worker never started; see `Worker`."""


class Worker(Protocol):
    """Runs one batch at a time for one model version.

    The batcher never calls `predict` on a worker again before the previous call returned, so a
    worker may keep per-thread state (a handler instance, a CUDA stream). `predict` returns one
    `Prediction` per request, in order; a request that failed alone carries its own status.
    Raising fails the whole batch, and the model keeps serving later batches.

    A worker that can die (a process) also has `alive: bool` and `exited: asyncio.Future[str]`
    (resolved, with how it ended, once it is gone): the batcher stops feeding it and the
    registry replaces it (`api.core.supervision`). Without them a worker lives until closed.
    `pipeline_depth: int` (default 1) lets the batcher give it that many batches at once; it
    must then answer them in order, and raise `NotRun` for a batch it never started (it died
    while running the one before): the batcher gives that batch to another worker.
    `keeps_time: bool` (default False) says that `predict` itself fails a batch the handler
    spends more than the version's responseTimeout on (a process worker kills its process);
    for other workers the batcher bounds the call.
    """

    device: str

    async def predict(self, batch: Sequence[InferenceRequest]) -> list[Prediction]: ...

    async def close(self) -> None: ...


class Backend(Protocol):
    """Where a model version's inference happens: in-process, or in a remote TorchServe.

    Example of a minimal backend::

        class EchoBackend:
            batches = True
            signature = None
            manifest = {}
            async def start_worker(self, index): return EchoWorker()
            async def close(self): pass

    A backend whose server can go away (a remote TorchServe) may also have `unavailable:
    str | None`: None while it can serve, else why not. The registry then reports the version
    not ready and refuses its requests with 503 and that message; absent means always able.
    With it, `unavailable_since` (monotonic seconds, None while it serves) says since when:
    the server's health counts it only past the version's maxRetryTimeoutInSec.
    One whose workers are not processes (a remote TorchServe's in-flight slots) says
    `worker_processes = False`: `torchgate.max_workers_per_model` then does not bound them,
    its own `max_workers` does.
    """

    # True when torchgate should batch in front of this backend. A remote TorchServe batches on
    # its own side, so batching twice would only add delay.
    batches: bool
    # The archive's signature.json (input/output names, datatypes, shapes), if it has one.
    signature: Mapping[str, Any] | None
    manifest: Mapping[str, Any]

    async def start_worker(self, index: int) -> Worker:
        """Start worker number `index` (0-based; picks the device round-robin)."""
        ...

    async def close(self) -> None: ...


class Observer(Protocol):
    """Receives what the core measures; metrics and logs plug in here, the core imports neither.

    Called on the event loop, so implementations must be cheap and must not block.
    """

    def request_finished(
        self,
        request: InferenceRequest,
        model: str,
        version: str,
        status: int,
        latency_s: float,
        prediction: Prediction | None,
        shadow: bool = False,
    ) -> None: ...

    def request_rejected(self, model: str, version: str, reason: str) -> None: ...

    def batch_finished(self, model: str, version: str, size: int, inference_s: float) -> None: ...

    def queue_changed(self, model: str, version: str, depth: int) -> None: ...


class NullObserver:
    """An observer that records nothing."""

    def request_finished(
        self,
        request: InferenceRequest,
        model: str,
        version: str,
        status: int,
        latency_s: float,
        prediction: Prediction | None,
        shadow: bool = False,
    ) -> None:
        pass

    def request_rejected(self, model: str, version: str, reason: str) -> None:
        pass

    def batch_finished(self, model: str, version: str, size: int, inference_s: float) -> None:
        pass

    def queue_changed(self, model: str, version: str, depth: int) -> None:
        pass


class Observers:
    """Fans every event out to several observers, in order (metrics, then the access log).

    An observer that raises is logged and skipped: recording a request must never fail it, nor
    keep the other observers from seeing it.
    """

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers

    def request_finished(
        self,
        request: InferenceRequest,
        model: str,
        version: str,
        status: int,
        latency_s: float,
        prediction: Prediction | None,
        shadow: bool = False,
    ) -> None:
        for observer in self.observers:
            try:
                observer.request_finished(
                    request, model, version, status, latency_s, prediction, shadow
                )
            except Exception:
                log.exception("observer %r failed in request_finished", observer)

    def request_rejected(self, model: str, version: str, reason: str) -> None:
        for observer in self.observers:
            try:
                observer.request_rejected(model, version, reason)
            except Exception:
                log.exception("observer %r failed in request_rejected", observer)

    def batch_finished(self, model: str, version: str, size: int, inference_s: float) -> None:
        for observer in self.observers:
            try:
                observer.batch_finished(model, version, size, inference_s)
            except Exception:
                log.exception("observer %r failed in batch_finished", observer)

    def queue_changed(self, model: str, version: str, depth: int) -> None:
        for observer in self.observers:
            try:
                observer.queue_changed(model, version, depth)
            except Exception:
                log.exception("observer %r failed in queue_changed", observer)


# Reasons for `Observer.request_rejected`.
REJECT_QUEUE_FULL = "queue_full"
REJECT_DEADLINE = "deadline"
REJECT_AUTH = "auth"
REJECT_TOO_LARGE = "too_large"
REJECT_NOT_READY = "not_ready"  # the version has no live worker (or its TorchServe is down)
