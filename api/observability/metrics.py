"""Prometheus metrics for /metrics, fed by the core through the `Observer` protocol.

What the metrics port serves (docs/observability.md lists every name and label):

- per request: `torchgate_requests_total{model,version,api,status,shadow}`,
  `torchgate_request_latency_seconds{model,version,api,shadow}` and
  `torchgate_queue_wait_seconds{model,version}`; per batch: `torchgate_batch_size` and
  `torchgate_inference_seconds{model,version}`; `torchgate_rejected_total{model,version,reason}`;
- read from the registry at scrape time (`RegistryCollector`): queue depth, in-flight requests,
  workers, busy workers, readiness;
- TorchServe's own counters, `ts_inference_requests_total`, `ts_inference_latency_microseconds`
  and `ts_queue_latency_microseconds{model_name,model_version,hostname}`, and its
  `Requests2XX`/`Requests4XX`/`Requests5XX` (every answer of the REST ports, `http_answered`)
  and `QueueTime`{Level,Hostname}, written exactly as TorchServe 0.12 writes them, so existing
  TorchServe dashboards keep working;
- process and Python metrics, GPUs (`api.observability.gpu`), handlers' custom metrics
  (`api.observability.handler_metrics`).

Histograms are in seconds, with buckets from 50 µs up, fine enough for sub-millisecond requests.

Why the per-request path does not use prometheus_client's `Counter` and `Histogram`: every
observation takes a lock, and finding a labelled child costs more than the observation (on this
project's 2-core machine: `Histogram.observe` 0.8 µs, `Counter.inc` 0.27 µs, `.labels()` about
1 µs; the first observer spent about 5 µs per request). Every `Observer` call happens on the
event loop, so plain integers need no lock: one dict lookup finds a request's series, then a few
increments. A collector turns the series into metric families at scrape time, and
prometheus_client writes the text.

Scrapes run in a thread, off the event loop (`api.rest.apps`), since rendering a large page takes
long enough to stall every request. So the collectors here read the loop's dicts through a copy
made in one C-level step (`list(d.items())`, which runs no Python code and so cannot be
interleaved with the loop's changes), and `render()` renders each collector on its own: one that
fails loses its families, not the page.
"""

from __future__ import annotations

import logging
import socket
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from functools import partial

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from api.core.registry import ModelVersion, Registry
from api.core.types import REJECT_AUTH, REJECT_TOO_LARGE, InferenceRequest, Prediction
from api.errors import TorchgateError
from api.observability.log_files import worker_name

log = logging.getLogger(__name__)

# fmt: off
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05,
    0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# fmt: on

# Unregistered versions whose series are still exported; older ones' go (`_retire`).
RETIRED_VERSIONS_KEPT = 100

# TorchServe's counters of HTTP answers: 2xx, 4xx, and everything else.
_HTTP_ANSWER_FAMILIES = (
    ("Requests2XX", "HTTP answers with a 2xx status (TorchServe name)"),
    ("Requests4XX", "HTTP answers with a 4xx status (TorchServe name)"),
    ("Requests5XX", "HTTP answers with any other status (TorchServe name)"),
)
QUEUE_TIME = "QueueTime"
WORKER_LOAD_TIME = "WorkerLoadTime"
# The families this module writes under TorchServe's unprefixed names (the others start with
# `torchgate_` or `ts_`): no handler metric may take one (`api.observability.handler_metrics`).
TORCHSERVE_NAMES = frozenset(
    (*(name for name, _ in _HTTP_ANSWER_FAMILIES), QUEUE_TIME, WORKER_LOAD_TIME)
)
# Rejections decided by a transport before it knew whether the model exists (auth, body size):
# their model label comes from the client, so unknown names are blanked to bound cardinality.
_EDGE_REASONS = frozenset((REJECT_AUTH, REJECT_TOO_LARGE))


class FastHistogram:
    """Bucket counts and a sum without a lock: only ever updated from the event loop."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one counts values above every bound
        self.total = 0.0

    def observe(self, value: float) -> None:
        # bisect_left finds the first bound >= value: Prometheus' `le` is inclusive.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def add(self, other: FastHistogram) -> None:
        for index, count in enumerate(list(other.counts)):
            self.counts[index] += count
        self.total += other.total

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative `(le, count)` pairs ending with `+Inf`, as HistogramMetricFamily takes."""
        counts = list(self.counts)  # one snapshot, so the buckets add up
        result, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            running += count
            result.append((floatToGoString(bound), float(running)))
        return result


class _RequestSeries:
    """Everything recorded for one (model, version, api, shadow); both histograms use
    LATENCY_BUCKETS, which `request_finished` relies on."""

    __slots__ = ("latency", "queue", "statuses")

    def __init__(self) -> None:
        self.statuses: dict[int, int] = {}
        self.latency = FastHistogram(LATENCY_BUCKETS)
        self.queue = FastHistogram(LATENCY_BUCKETS)


class _BatchSeries:
    __slots__ = ("inference", "sizes")

    def __init__(self) -> None:
        self.sizes = FastHistogram(BATCH_SIZE_BUCKETS)
        self.inference = FastHistogram(LATENCY_BUCKETS)


RequestKey = tuple[str, str, str, bool]  # model, version, api, shadow


class PrometheusObserver:
    """Implements `api.core.types.Observer`; `render()` is the /metrics body.

    `track(registry)` adds the scrape-time gauges of a model registry; `add_collector` plugs in
    more collectors (GPUs, handler metrics) and `add_text` more pre-rendered families.
    """

    def __init__(self, *, hostname: str | None = None, process_metrics: bool = True) -> None:
        self.hostname = hostname or socket.gethostname()
        self._requests: dict[RequestKey, _RequestSeries] = {}
        self._batches: dict[tuple[str, str], _BatchSeries] = {}
        self._rejected: dict[tuple[str, str, str], int] = {}
        # TorchServe's ts_* counters: requests, latency µs, queue µs by (model, version label).
        self._torchserve: dict[tuple[str, str], list[float]] = {}
        # TorchServe's Requests2XX, Requests4XX, Requests5XX: HTTP answers of the REST ports.
        self._http_answers = [0, 0, 0]
        self._last_queue_ms: float | None = None  # TorchServe's QueueTime gauge
        self._models: Registry | None = None
        self._texts: list[Callable[[], str]] = [self._torchserve_text]
        # Rendered in this order, each on its own (`render`), so not in a CollectorRegistry.
        self._collectors: list[Collector] = [_ObserverCollector(self)]
        if process_metrics:
            process = CollectorRegistry()  # prometheus_client's collectors register themselves
            ProcessCollector(registry=process)
            PlatformCollector(registry=process)
            GCCollector(registry=process)
            self._collectors.append(process)
        self._failed: set[str] = set()  # sources whose failure was logged
        # Unregistered versions whose series are still exported, oldest first (`_retire`).
        self._retired: OrderedDict[tuple[str, str], None] = OrderedDict()

    def track(self, models: Registry) -> None:
        """Export the registry's queue depth, in-flight requests, workers and readiness, and
        let the series of unregistered versions go (`_retire`)."""
        self._models = models
        self._collectors.append(RegistryCollector(models, self.hostname))
        models.on_version_gone.append(self._retire)

    def _retire(self, model: str, version: str) -> None:
        """An unregistered version's counters and histograms stay exported (a scrape after the
        unregister still sees its last counts, and registering it again continues them) until
        `RETIRED_VERSIONS_KEPT` more recent versions have gone: each version that ever served
        left about a hundred series for the life of the process, and a server that deploys a
        new version every hour had its /metrics grow without bound."""
        self._retired.pop((model, version), None)
        self._retired[(model, version)] = None
        while len(self._retired) > RETIRED_VERSIONS_KEPT:
            (old_model, old_version), _ = self._retired.popitem(last=False)
            if not self._known(old_model, old_version):  # not registered again since
                self._forget(old_model, old_version)

    def _forget(self, model: str, version: str) -> None:
        for request_key in [k for k in self._requests if k[:2] == (model, version)]:
            del self._requests[request_key]
        self._batches.pop((model, version), None)
        for rejected_key in [k for k in self._rejected if k[:2] == (model, version)]:
            del self._rejected[rejected_key]
        # TorchServe's counters are labelled with the version a request named.
        self._torchserve.pop((model, version), None)
        if not self._known(model, None):
            self._torchserve.pop((model, "default"), None)

    def add_collector(self, collector: Collector) -> None:
        """Add a prometheus_client collector; its `collect()` runs in the scrape's thread."""
        self._collectors.append(collector)

    def add_text(self, source: Callable[[], str]) -> None:
        """Add families rendered by `source` (Prometheus text) after the collectors'."""
        self._texts.append(source)

    # -- Observer (on the event loop; keep these cheap) -----------------------------------------

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
        key = (model, version, request.api, shadow)
        series = self._requests.get(key)
        if series is None:
            series = self._requests[key] = _RequestSeries()
        statuses = series.statuses
        statuses[status] = statuses.get(status, 0) + 1
        # FastHistogram.observe, inlined: this runs once per request.
        latency = series.latency
        latency.counts[bisect_left(LATENCY_BUCKETS, latency_s)] += 1
        latency.total += latency_s
        wait = 0.0
        if prediction is not None:
            queue, wait = series.queue, prediction.queue_seconds
            queue.counts[bisect_left(LATENCY_BUCKETS, wait)] += 1
            queue.total += wait
        if request.counted and not shadow:  # TorchServe never saw shadow copies
            if prediction is not None:
                self._last_queue_ms = wait * 1e3
            named = (model, request.version_named or "default")
            totals = self._torchserve.get(named)
            if totals is None:
                totals = self._torchserve[named] = [0.0, 0.0, 0.0]
            totals[0] += 1
            totals[1] += latency_s * 1e6
            totals[2] += wait * 1e6

    def http_answered(self, status: int) -> None:
        """An HTTP answer on a REST port, counted as TorchServe counts it: 2xx, 4xx, the rest."""
        self._http_answers[0 if 200 <= status < 300 else 1 if 400 <= status < 500 else 2] += 1

    def request_rejected(self, model: str, version: str, reason: str) -> None:
        if reason in _EDGE_REASONS and not self._known(model, version):
            model = version = ""
        key = (model, version, reason)
        self._rejected[key] = self._rejected.get(key, 0) + 1

    def batch_finished(self, model: str, version: str, size: int, inference_s: float) -> None:
        key = (model, version)
        series = self._batches.get(key)
        if series is None:
            series = self._batches[key] = _BatchSeries()
        series.sizes.observe(size)
        series.inference.observe(inference_s)

    def queue_changed(self, model: str, version: str, depth: int) -> None:
        pass  # the depth is read from the registry at scrape time, which costs nothing here

    def _known(self, model: str, version: str | None) -> bool:
        if self._models is None:
            return True
        try:
            self._models.get(model, version or None)
        except TorchgateError:
            return False
        return True

    # -- exposition -----------------------------------------------------------------------------

    def render(self) -> bytes:
        """The /metrics body; safe to call from any thread.

        Each collector and text source is rendered on its own: one that raises, or writes a
        string UTF-8 cannot encode, loses its own families (logged once), not every scrape.
        """
        parts = [self._guarded(c, partial(generate_latest, c)) for c in self._collectors]
        parts += [self._guarded(source, source) for source in self._texts]
        return b"".join(parts)

    def _guarded(self, source: object, render: Callable[[], bytes | str]) -> bytes:
        try:
            text = render()
            return text.encode() if isinstance(text, str) else text
        except Exception:
            what = getattr(source, "__qualname__", type(source).__qualname__)
            if what not in self._failed:
                self._failed.add(what)
                log.exception("/metrics: %s failed; its families are left out", what)
            return b""

    def collect(self) -> Iterator[Metric]:
        """The families recorded by this observer (`render` adds the other collectors')."""
        requests = list(self._requests.items())  # a copy in one step (see the module docstring)
        count = CounterMetricFamily(
            "torchgate_requests_total",
            "Inference requests answered, by status code",
            labels=["model", "version", "api", "status", "shadow"],
        )
        latency = HistogramMetricFamily(
            "torchgate_request_latency_seconds",
            "Request latency inside torchgate, from routing to the answer",
            labels=["model", "version", "api", "shadow"],
        )
        queue_by_version: dict[tuple[str, str], FastHistogram] = {}
        for (model, version, api, shadow), series in requests:
            flag = "true" if shadow else "false"
            for status, n in list(series.statuses.items()):
                count.add_metric([model, version, api, str(status), flag], n)
            latency.add_metric(
                [model, version, api, flag], series.latency.buckets(), series.latency.total
            )
            merged = queue_by_version.setdefault((model, version), FastHistogram(LATENCY_BUCKETS))
            merged.add(series.queue)
        queue = HistogramMetricFamily(
            "torchgate_queue_wait_seconds",
            "Time a request waited in the queue for a worker",
            labels=["model", "version"],
        )
        for (model, version), histogram in queue_by_version.items():
            queue.add_metric([model, version], histogram.buckets(), histogram.total)
        yield from (count, latency, queue)

        sizes = HistogramMetricFamily(
            "torchgate_batch_size", "Requests per batch", labels=["model", "version"]
        )
        inference = HistogramMetricFamily(
            "torchgate_inference_seconds",
            "Handler (inference) time per batch",
            labels=["model", "version"],
        )
        for (model, version), batch in list(self._batches.items()):
            sizes.add_metric([model, version], batch.sizes.buckets(), batch.sizes.total)
            inference.add_metric([model, version], batch.inference.buckets(), batch.inference.total)
        yield from (sizes, inference)

        rejected = CounterMetricFamily(
            "torchgate_rejected_total",
            "Requests refused before inference (queue_full, deadline, auth, too_large, ...)",
            labels=["model", "version", "reason"],
        )
        for (model, version, reason), n in list(self._rejected.items()):
            rejected.add_metric([model, version, reason], n)
        yield rejected

        if self._last_queue_ms is not None:
            queue_time = GaugeMetricFamily(
                QUEUE_TIME,
                "Queue time of the latest request (milliseconds; TorchServe name)",
                labels=["Level", "Hostname"],
            )
            queue_time.add_metric(["Host", self.hostname], self._last_queue_ms)
            yield queue_time

    def _torchserve_text(self) -> str:
        """TorchServe 0.12's per-model counters, named and typed exactly as it writes them.

        TorchServe's Java client writes `# TYPE ts_inference_latency_microseconds counter` with
        samples of that same name; prometheus_client would add `_total` to every counter, so
        these three families are written here. As TorchServe's, a request is labelled with the
        version it named, "default" when it named none, and a client's request counts once
        (KServe v1 instances too).
        """
        totals = list(self._torchserve.items())  # a copy in one step (see the module docstring)
        families = (
            ("ts_inference_requests_total", "Total number of inference requests."),
            ("ts_inference_latency_microseconds", "Cumulative inference duration in microseconds"),
            ("ts_queue_latency_microseconds", "Cumulative queuing duration in microseconds"),
        )
        parts = []
        for index, (name, help_text) in enumerate(families):
            samples = [
                (
                    {"model_name": model, "model_version": version, "hostname": self.hostname},
                    values[index],
                )
                for (model, version), values in totals
            ]
            parts.append(counter_text(name, help_text, samples))
        host = {"Level": "Host", "Hostname": self.hostname}
        for (name, help_text), count in zip(_HTTP_ANSWER_FAMILIES, self._http_answers, strict=True):
            # As TorchServe: the family is listed from the start, its sample once it counts.
            parts.append(counter_text(name, help_text, [(host, count)] if count else []))
        return "".join(parts)


class _ObserverCollector:
    def __init__(self, observer: PrometheusObserver) -> None:
        self._observer = observer

    def collect(self) -> Iterator[Metric]:
        return self._observer.collect()


class RegistryCollector:
    """Gauges read from the model registry when Prometheus scrapes, not on every change."""

    def __init__(self, registry: Registry, hostname: str) -> None:
        self._registry = registry
        self._hostname = hostname

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        depth = GaugeMetricFamily(
            "torchgate_queue_depth", "Requests waiting in the queue", labels=labels
        )
        in_flight = GaugeMetricFamily(
            "torchgate_inflight_requests",
            "Requests accepted for a model version and not yet answered (queued or running)",
            labels=labels,
        )
        workers = GaugeMetricFamily(
            "torchgate_workers",
            "Workers alive (one dead, restarting or failing to start is not counted)",
            labels=labels,
        )
        busy = GaugeMetricFamily(
            "torchgate_workers_busy", "Workers running a batch right now", labels=labels
        )
        ready = GaugeMetricFamily(
            "torchgate_model_ready", "1 when the model version answers requests", labels=labels
        )
        versions = self._versions()
        for model_version in versions:
            values = [model_version.name, model_version.version]
            batcher = model_version.batcher
            depth.add_metric(values, batcher.depth)
            in_flight.add_metric(values, batcher.in_flight)
            workers.add_metric(values, sum(slot.live for slot in list(model_version.workers)))
            busy.add_metric(values, batcher.busy_workers)
            ready.add_metric(values, 1.0 if model_version.ready else 0.0)
        yield from (depth, in_flight, workers, busy, ready)
        yield self._worker_load_times(versions)

    def _versions(self) -> list[ModelVersion]:
        """The registered versions. The event loop may unregister one while a scrape's thread
        reads them: one gone meanwhile is left out, not an error that fails the collector."""
        found: list[ModelVersion] = []
        for name in self._registry.names():
            try:
                found += self._registry.versions(name)
            except (TorchgateError, KeyError):  # the model, or one of its versions, went
                continue
        return found

    def _worker_load_times(self, versions: list[ModelVersion]) -> Metric:
        """TorchServe's WorkerLoadTime: each worker's latest start, ms, by TorchServe's name
        for it (`W-<worker id>-<model>_<version>`)."""
        family = GaugeMetricFamily(
            WORKER_LOAD_TIME,
            "Time the worker's latest start took (milliseconds; TorchServe name)",
            labels=["WorkerName", "Level", "Hostname"],
        )
        for model_version in versions:
            for slot in list(model_version.workers):
                if slot.load_s is not None:
                    name = worker_name(slot.id, model_version.name, model_version.version)
                    family.add_metric([name, "Host", self._hostname], slot.load_s * 1e3)
        return family


def counter_text(name: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]) -> str:
    """A counter family in Prometheus text format whose samples are named `name` itself.

    That is how TorchServe (Prometheus Java simpleclient 0.9) writes counters, `_total` or not.
    """
    lines = [f"# HELP {name} {_escape_help(help_text)}\n", f"# TYPE {name} counter\n"]
    for labels, value in samples:
        label_text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
        lines.append(f"{name}{{{label_text}}} {floatToGoString(value)}\n")
    return "".join(lines)


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def filter_samples(text: bytes, names: Collection[str]) -> bytes:
    """`/metrics?name[]=a&name[]=b` as TorchServe filters: only samples named exactly so.

    TorchServe's Prometheus client keeps the samples whose name (`ts_queue_latency_microseconds`,
    a histogram's `x_bucket`, a counter's `x_total` as written) is one of the names, and a
    family's HELP and TYPE lines only when one of its samples is kept. No name: everything.
    """
    if not names:
        return text
    wanted = set(names)
    out: list[bytes] = []
    header: list[bytes] = []  # the current family's comment lines, held until a sample matches
    for line in text.splitlines(keepends=True):
        if line.startswith(b"#"):
            if line.startswith((b"# HELP ", b"# TYPE ")) and not (
                header and header[0].split(b" ", 3)[2] == line.split(b" ", 3)[2]
            ):
                header = []
            header.append(line)
            continue
        name = line.split(b"{", 1)[0].split(b" ", 1)[0].strip()
        if name and name.decode("utf-8", "replace") in wanted:
            out.extend(header)
            header = []
            out.append(line)
    return b"".join(out)
