"""Handlers' custom metrics (TorchServe's `context.metrics` API) on /metrics.

A handler calls `context.metrics.add_counter / add_time / add_size / add_percent / add_metric`;
the local backend's metrics store (`api.backends.context.MetricsStore`) validates the update as
TorchServe does and calls `HandlerMetrics.on_metric(name, value, unit, dimensions, type)`.
They come out as TorchServe 0.12 exports them in `metrics_mode=prometheus`:

- named as the handler named them (characters Prometheus does not allow become `_`);
- labelled with the update's dimensions (TorchServe's defaults are `ModelName` and `Level`)
  plus `Hostname`;
- counters add up and are written with TorchServe's naming, the sample named as the metric with
  no `_total` added; gauges keep the last value; histograms count values into prometheus_client's
  default buckets (the ones TorchServe's Java client uses).

With `metrics_config=`, only the metrics it declares are exported, unless
`model_metrics_auto_detect=true` (`api.metrics_config`).

As TorchServe's frontend (its `WorkerLifeCycle` looks `MetricCache.getMetricBackend(name)` up),
an update finds its metric by name only: a metric `metrics_config` declares (or TorchServe's
default HandlerTime and PredictionTime) has the declared type, unit and dimensions (plus
`Hostname`); any other has the type, unit and dimension names of its first update. An update
written with another type is recorded under the metric's type (a negative one is dropped for a
counter, which cannot go down). Its dimension values are taken by position, as TorchServe takes
them (the worker's metrics cache does so too: `api.workers.context`), whatever their names; an
update with more or fewer is dropped, as TorchServe's Prometheus client refuses it.

Values that are not finite numbers, names that would shadow torchgate's own families (TorchServe's
registry refuses a name already registered too), and series past `max_series` are dropped, each
kind with one warning, so a handler's bug cannot break the scrape or grow memory without bound.
Nor can one model's handler (a label per request id, say) take every series from the others:
each loaded model version (a source: `for_source`, until `release`) keeps `max_series // 10` of
them for itself, and grows past that only into what is left beyond every other's unused share.
One model alone may still use them all.
Label values and units may come from a client (a lone surrogate, which `json.loads('"\\udcff"')`
yields, cannot be encoded as UTF-8): they are recorded with such characters escaped.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.metrics import Histogram

from api.metrics_config import MetricsSpec
from api.observability.metrics import TORCHSERVE_NAMES, FastHistogram, counter_text

log = logging.getLogger(__name__)

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
# torchgate's own namespace: every family it writes, or may write later, under that prefix.
_RESERVED_PREFIX = "torchgate_"
# TorchServe's frontend counters (`PrometheusObserver._torchserve_text`).
_TS_NAMES = (
    "ts_inference_requests_total", "ts_inference_latency_microseconds",
    "ts_queue_latency_microseconds",
)  # fmt: skip
# TorchServe's host and GPU families, written by `api.observability.system` and `.gpu`
# (tests/observability/test_handler_metrics.py checks every built-in family is refused).
_SYSTEM_NAMES = (
    "CPUUtilization", "MemoryUsed", "MemoryAvailable", "MemoryUtilization",
    "DiskUsage", "DiskUtilization", "DiskAvailable",
    "GPUMemoryUsed", "GPUMemoryUtilization", "GPUUtilization",
)  # fmt: skip


def _process_names() -> frozenset[str]:
    """The family and sample names (`process_cpu_seconds`, `process_cpu_seconds_total`,
    `python_info`, ...) of prometheus_client's process, platform and GC collectors, which
    `PrometheusObserver(process_metrics=True)` writes. Only these: TorchServe exports a handler
    metric named `process_time` or `ts_custom`, and so does torchgate."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    names = set()
    for family in registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return frozenset(names)


# Families torchgate writes itself; a handler metric by one of these names would duplicate them.
_RESERVED_NAMES = (
    TORCHSERVE_NAMES | frozenset(_SYSTEM_NAMES) | frozenset(_TS_NAMES) | _process_names()
)
_INVALID_NAME = re.compile(r"[^a-zA-Z0-9_:]")
_INVALID_LABEL = re.compile(r"[^a-zA-Z0-9_]")

Series = float | FastHistogram


@dataclass(eq=False)
class _Family:
    name: str
    kind: str
    unit: str
    label_names: tuple[str, ...]
    series: dict[tuple[str, ...], Series] = field(default_factory=dict)


class HandlerMetrics:
    """Collects handler metrics that worker processes report with their answers (see
    `api.workers.main`); a prometheus_client collector plus text.

    `collect()` yields the gauges and histograms, `counters_text()` writes the counters (see
    the module docstring for why counters are written by hand).
    """

    def __init__(self, *, hostname: str, max_series: int = 10_000) -> None:
        self._hostname = hostname
        self._max_series = max_series
        self._families: dict[str, _Family] = {}
        self._series_count = 0
        # Series each source (`for_source`: a model version's archive) has made, and the share
        # every source keeps for itself (the module docstring).
        self._by_source: dict[str, int] = {}
        self._share = max_series // 10
        self._warned: set[tuple[str, str]] = set()
        # metrics_config / model_metrics_auto_detect: which metrics are exported.
        self.spec = MetricsSpec()
        # Updates arrive on the event loop while scrapes run in a thread (`api.rest.apps`
        # renders /metrics off the loop): every read and write holds the lock.
        self._lock = threading.Lock()

    def for_source(self, source: str) -> Callable[[str, float, str, Mapping[str, str], str], None]:
        """The `MetricCallback` for one source of updates (a model version), whose new series
        count against its own share first."""
        with self._lock:
            self._by_source.setdefault(source, 0)
        return functools.partial(self.on_metric, source=source)

    def release(self, source: str) -> None:
        """`source` is gone (its version unloaded, or it failed to load): it keeps no share
        any more. The series it made stay, as TorchServe keeps an unloaded model's metrics."""
        with self._lock:
            self._by_source.pop(source, None)

    def on_metric(
        self,
        name: str,
        value: float,
        unit: str,
        dimensions: Mapping[str, str],
        metric_type: str,
        *,
        source: str = "",
    ) -> None:
        """`api.backends.context.MetricCallback`: record one update; never raises."""
        kind = str(getattr(metric_type, "value", metric_type)).lower()
        if kind not in (COUNTER, GAUGE, HISTOGRAM):
            self._warn(name, f"unknown metric type {metric_type!r}")
            return
        declared = self.spec.declared(name)
        if declared is None and not self.spec.exports(name):
            self._warn(
                name,
                f"not declared in metrics_config {self.spec.source} "
                f"(model_metrics_auto_detect=true exports it)",
            )
            return
        family_name = _metric_name(name)
        if family_name.startswith(_RESERVED_PREFIX) or family_name in _RESERVED_NAMES:
            self._warn(name, "the name is reserved for torchgate's own metrics")
            return
        number = _finite(value)
        if number is None:  # workers drop these already (api.workers.context); guard anyway
            self._warn(name, "a value that is not a finite number")
            return
        given = {_label_name(k): _encodable(str(v)) for k, v in dimensions.items()}
        # Last, as TorchServe's frontend appends it to every update of a model metric.
        host = given.pop("Hostname", self._hostname)
        with self._lock:
            family = self._families.get(family_name)
            if family is None and not self._room_for(source):  # a new family is a new series
                return
            if family is None:
                if declared is None:  # auto-detected: as its first update
                    family = _Family(family_name, kind, _encodable(unit), (*given, "Hostname"))
                else:
                    names = (_label_name(d) for d in declared.dimensions)
                    family = _Family(
                        family_name,
                        declared.kind,
                        _encodable(declared.unit),
                        (*(d for d in names if d != "Hostname"), "Hostname"),
                    )
                self._families[family_name] = family
            labels = self._labels(name, family, given)
            if labels is None:
                return
            labels["Hostname"] = host
            if family.kind != kind:
                self._warn(
                    name,
                    f"written as a {kind}, recorded as the {family.kind} it was declared "
                    "or first written as",
                    dropped=False,
                )
                kind = family.kind
            if kind == COUNTER and number < 0:  # Prometheus' Counter.inc refuses it too
                self._warn(name, "a negative value for a counter")
                return
            key = tuple(labels[label] for label in family.label_names)
            current = family.series.get(key)
            if current is None:
                if not self._room_for(source):
                    return
                self._series_count += 1
                if source in self._by_source:
                    self._by_source[source] += 1
            if kind == COUNTER:
                family.series[key] = (current if isinstance(current, float) else 0.0) + number
            elif kind == GAUGE:
                family.series[key] = number
            else:
                if not isinstance(current, FastHistogram):
                    current = family.series[key] = FastHistogram(Histogram.DEFAULT_BUCKETS[:-1])
                current.observe(number)

    def collect(self) -> Iterator[Metric]:
        for family in self._snapshot(GAUGE, HISTOGRAM):
            help_text = f"Handler metric ({family.unit or 'no unit'})"
            labels = list(family.label_names)
            if family.kind == GAUGE:
                gauge = GaugeMetricFamily(family.name, help_text, labels=labels)
                for key, value in family.series.items():
                    assert isinstance(value, float)
                    gauge.add_metric(list(key), value)
                yield gauge
            else:
                histogram = HistogramMetricFamily(family.name, help_text, labels=labels)
                for key, value in family.series.items():
                    assert isinstance(value, FastHistogram)
                    histogram.add_metric(list(key), value.buckets(), value.total)
                yield histogram

    def counters_text(self) -> str:
        parts = []
        for family in self._snapshot(COUNTER):
            samples = [
                (dict(zip(family.label_names, key, strict=True)), float(value))
                for key, value in family.series.items()
                if isinstance(value, float)
            ]
            parts.append(
                counter_text(family.name, f"Handler metric ({family.unit or 'no unit'})", samples)
            )
        return "".join(parts)

    def _snapshot(self, *kinds: str) -> list[_Family]:
        """Copies of the families of the given kinds, taken under the lock."""
        with self._lock:
            copies = []
            for family in self._families.values():
                if family.kind not in kinds:
                    continue
                series: dict[tuple[str, ...], Series] = {}
                for key, value in family.series.items():
                    if isinstance(value, FastHistogram):
                        copy = FastHistogram(value.bounds)
                        copy.add(value)
                        value = copy
                    series[key] = value
                copies.append(
                    _Family(family.name, family.kind, family.unit, family.label_names, series)
                )
            return copies

    def _room_for(self, source: str) -> bool:
        """Whether `source` may make one more series (warned once when not): within
        `max_series`, and within its own share or what the unused shares of every other source
        leave. Under the lock."""
        if self._series_count < self._max_series and self._by_source.get(source, 0) < self._share:
            return True
        held_for_others = sum(
            max(0, self._share - made) for other, made in self._by_source.items() if other != source
        )
        if self._series_count + held_for_others < self._max_series:
            return True
        if self._series_count >= self._max_series:
            self._warn("", f"more than {self._max_series} handler metric series")
        else:
            self._warn(
                "",
                f"{source or 'a model'} has made all the handler metric series it may: "
                f"{self._share} of the {self._max_series} are kept for each other model",
            )
        return False

    def _labels(self, name: str, family: _Family, given: dict[str, str]) -> dict[str, str] | None:
        """The dimension values `given` (Hostname aside) named by the family's dimensions, by
        position, as TorchServe's frontend passes them to its Prometheus metric; None (warned)
        when there are more or fewer, which that refuses."""
        names = family.label_names[:-1]  # Hostname is the last
        if len(given) != len(names):
            self._warn(
                name,
                f"dimensions {list(given)}, where it has {list(names)} (TorchServe drops it too)",
            )
            return None
        if tuple(given) != names:
            self._warn(
                name,
                f"dimensions {list(given)} recorded as its {list(names)}, by position, as "
                "TorchServe does",
                dropped=False,
            )
        return dict(zip(names, given.values(), strict=True))

    def _warn(self, name: str, problem: str, *, dropped: bool = True) -> None:
        if (name, problem) not in self._warned:
            self._warned.add((name, problem))
            what = "dropped" if dropped else "note"
            log.warning("handler metric %s %s: %s", name or "(any)", what, problem)


def _finite(value: float) -> float | None:
    """`value` as a builtin float (a numpy float32 is not one, and would not add up as a
    counter), or None when it is no finite number: NaN or infinity would stick to a counter."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _encodable(text: str) -> str:
    """`text` with what UTF-8 cannot encode (lone surrogates) written as `\\udcff` escapes."""
    if text.isascii():  # nearly always, and then nothing to do (this runs on the loop)
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _metric_name(name: str) -> str:
    clean = _INVALID_NAME.sub("_", name) or "_"
    return f"_{clean}" if clean[0].isdigit() else clean


def _label_name(name: str) -> str:
    clean = _INVALID_LABEL.sub("_", name) or "_"
    return f"_{clean}" if clean[0].isdigit() else clean
