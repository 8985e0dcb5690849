"""Prometheus metrics, fed by the core through the `Observer` protocol.

Histograms are in seconds with buckets fine enough for sub-millisecond latencies. TorchServe's own
metric names are exported too (`ts_inference_requests_total`, `ts_inference_latency_microseconds`,
`ts_queue_latency_microseconds`, labelled `model_name`, `model_version`, `hostname`), so existing
TorchServe dashboards keep working.

Labelled children are cached per label tuple: looking them up through `.labels()` on every request
costs more than the observation itself.
"""

from __future__ import annotations

import socket
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from api.core.types import InferenceRequest, Prediction

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class PrometheusObserver:
    """Implements `api.core.types.Observer`; `render()` is the /metrics body."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "torchgate_requests_total",
            "Inference requests answered",
            ["model", "version", "api", "status", "shadow"],
            registry=r,
        )
        self.latency = Histogram(
            "torchgate_request_latency_seconds",
            "Request latency inside torchgate",
            ["model", "version", "api", "shadow"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "torchgate_queue_wait_seconds",
            "Time a request waited for a worker",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "torchgate_inference_seconds",
            "Handler time per batch",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "torchgate_batch_size",
            "Requests per batch",
            ["model", "version"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "torchgate_rejected_total",
            "Requests refused before inference",
            ["model", "version", "reason"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "torchgate_queue_depth",
            "Requests waiting in the queue",
            ["model", "version"],
            registry=r,
        )
        hostname = socket.gethostname()
        self._hostname = hostname
        self.ts_requests = Counter(
            "ts_inference_requests",
            "Total number of inference requests (TorchServe name)",
            ["model_name", "model_version", "hostname"],
            registry=r,
        )
        self.ts_latency = Counter(
            "ts_inference_latency_microseconds",
            "Cumulative inference duration in microseconds (TorchServe name)",
            ["model_name", "model_version", "hostname"],
            registry=r,
        )
        self.ts_queue_latency = Counter(
            "ts_queue_latency_microseconds",
            "Cumulative queuing duration in microseconds (TorchServe name)",
            ["model_name", "model_version", "hostname"],
            registry=r,
        )
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- Observer -------------------------------------------------------------------------------

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
        flag = "true" if shadow else "false"
        self._child(self.requests, model, version, request.api, str(status), flag).inc()
        self._child(self.latency, model, version, request.api, flag).observe(latency_s)
        if prediction is not None:
            self._child(self.queue_wait, model, version).observe(prediction.queue_seconds)
            self._child(self.ts_queue_latency, model, version, self._hostname).inc(
                prediction.queue_seconds * 1e6
            )
        if not shadow:
            self._child(self.ts_requests, model, version, self._hostname).inc()
            self._child(self.ts_latency, model, version, self._hostname).inc(latency_s * 1e6)

    def request_rejected(self, model: str, version: str, reason: str) -> None:
        self._child(self.rejected, model, version, reason).inc()

    def batch_finished(self, model: str, version: str, size: int, inference_s: float) -> None:
        self._child(self.batch_size, model, version).observe(size)
        self._child(self.inference, model, version).observe(inference_s)

    def queue_changed(self, model: str, version: str, depth: int) -> None:
        self._child(self.queue_depth, model, version).set(depth)

    # -- exposition -----------------------------------------------------------------------------

    def render(self) -> bytes:
        return generate_latest(self.registry)
