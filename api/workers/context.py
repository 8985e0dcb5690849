"""The `Context` a handler receives, and the metrics store behind `context.metrics`.

Handlers get TorchServe's own classes: `ts.context.Context` and `ts.context.RequestProcessor`
from the installed `torchserve` package (a pinned dependency), not look-alikes. Third-party
handlers subclass `ts.torch_handler.base_handler.BaseHandler`, which reads `system_properties`,
`manifest`, `model_yaml_config`, `metrics` and per-request headers through exactly these
objects, so anything a handler can do with the context inside TorchServe it can do here, with
the same attribute names, defaults and quirks (`set_response_status` default phrase, header
dictionaries, `get_sequence_id`, ...). A copy would drift from TorchServe; the real class cannot.

The one part replaced is the metrics cache. TorchServe's `MetricsCacheYamlImpl` needs a
metrics.yaml and turns every `add_time` into a log line, which the Java frontend parses back.
`MetricsStore` keeps TorchServe's API (it subclasses `MetricCacheAbstract`, so `add_counter`,
`add_time`, `add_size`, `add_percent`, `add_metric`, `add_error`, `get_metric` and
`add_metric_to_cache` keep their signatures and validation) but records each update in memory
and hands it to an `on_metric` callback, from which an exporter can feed Prometheus.

Values are taken as `float(value)`, so a one-element tensor (`out.max()`) or a numpy scalar counts
as its number; one that is no finite number ("abc", NaN) is dropped with one warning per metric,
as TorchServe's frontend drops a value that does not parse, and the request goes on.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import ts
from ts.context import Context, RequestProcessor
from ts.metrics.dimension import Dimension
from ts.metrics.metric_abstract import MetricAbstract
from ts.metrics.metric_cache_abstract import MetricCacheAbstract
from ts.metrics.metric_cache_errors import MetricsCacheKeyError
from ts.metrics.metric_type_enum import MetricTypes

from api.metrics_config import DeclaredMetric
from api.workers.main import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_ITEMS_PER_REQUEST

__all__ = [
    "Context",
    "MetricCallback",
    "MetricsStore",
    "RecordingMetric",
    "RequestProcessor",
    "make_context",
]

log = logging.getLogger(__name__)

# on_metric(name, value, unit, dimensions, metric_type): called in the worker process for every
# metric update a handler makes (the worker collects them and sends them with its answer);
# metric_type is "counter", "gauge" or "histogram" and unit TorchServe's long name
# ("Milliseconds", "Count", ...). It must be cheap.
MetricCallback = Callable[[str, float, str, Mapping[str, str], str], None]

SeriesKey = tuple[str, str, tuple[tuple[str, str], ...]]  # (metric_type, name, dimensions)


class RecordingMetric(MetricAbstract):
    """One metric of a `MetricsStore`; updates are validated as TorchServe's `CachingMetric`."""

    def __init__(
        self,
        store: MetricsStore,
        metric_name: str,
        unit: str,
        dimension_names: list[str] | None = None,
        metric_type: MetricTypes = MetricTypes.COUNTER,
    ) -> None:
        super().__init__(metric_name, unit, dimension_names, metric_type)
        self._store = store
        # Read on every update; enum attribute access is slow enough to show up.
        self.type_name: str = metric_type.value
        self.is_counter = metric_type is MetricTypes.COUNTER

    def add_or_update(
        self,
        value: float,
        dimension_values: list[str] | None = None,
        request_id: str = "",
    ) -> None:
        values = dimension_values or []
        # Like CachingMetric: a bad update is logged and dropped, never fails the request.
        if len(values) != len(self.dimension_names):
            log.error(
                "metric %s: dimension values %s do not match dimension names %s",
                self.metric_name,
                values,
                self.dimension_names,
            )
            return
        number = self._store.finite(self.metric_name, value)
        if number is None:
            return
        if self.is_counter and number < 0:
            log.error("metric %s: a counter cannot be updated by %s", self.metric_name, number)
            return
        self._store.record(self, number, values)

    def update(
        self, value: float, request_id: str = "", dimensions: list[Dimension] | None = None
    ) -> None:
        """TorchServe's backwards-compatible form: replaces the dimension names."""
        dims = dimensions or []
        self.dimension_names = [dim.name for dim in dims]
        self.add_or_update(value, [dim.value for dim in dims], request_id)


class MetricsStore(MetricCacheAbstract):
    """TorchServe's metrics cache API, recording in memory instead of logging.

    `series` holds the current value of every (type, name, dimensions) series: counters add up,
    gauges and histograms keep their last value. One store per worker process, written by the
    handler (a handler's own threads too, hence the lock); read it with `snapshot()`.
    """

    def __init__(
        self,
        model_name: str,
        on_metric: MetricCallback | None = None,
        declared: Iterable[DeclaredMetric] = (),
    ) -> None:
        super().__init__(config_file_path="")
        self.model_name = model_name
        # As TorchServe's model loader does: a request id for what initialize records, so those
        # metrics get the model's dimensions, not Level=Error. Each batch sets its own ids.
        self.request_ids: Any = str(uuid.uuid4())
        self.on_metric = on_metric
        self.series: dict[SeriesKey, float] = {}
        self._lock = threading.Lock()
        self._unusable: set[str] = set()  # metrics whose values were dropped (warned once)
        # As TorchServe's MetricsCacheYamlImpl.initialize_cache: metrics_config's model_metrics
        # exist before the handler asks for them (`get_metric`).
        for metric in declared:
            self.add_metric_to_cache(
                metric.name, metric.unit, list(metric.dimensions), MetricTypes(metric.kind)
            )

    def initialize_cache(self) -> None:
        """The declared metrics are created by the constructor; others on first use."""

    def add_metric_to_cache(
        self,
        metric_name: str,
        unit: str,
        dimension_names: list[str] | None = None,
        metric_type: MetricTypes = MetricTypes.COUNTER,
    ) -> RecordingMetric:
        self._check_type(metric_name, str, "`metric_name` must be a str")
        self._check_type(unit, str, "`unit` must be a str")
        self._check_type(metric_type, MetricTypes, "`metric_type` must be a MetricTypes enum")
        if dimension_names:
            self._check_type(dimension_names, list, "`dimension_names` should be a list")
        metric = RecordingMetric(self, metric_name, unit, dimension_names, metric_type)
        self.cache.setdefault(metric_type, {})[metric_name] = metric
        return metric

    def get_metric(
        self, metric_name: str, metric_type: MetricTypes = MetricTypes.COUNTER
    ) -> RecordingMetric:
        try:
            metric: RecordingMetric = self.cache[metric_type][metric_name]
        except KeyError:
            raise MetricsCacheKeyError(
                f"Metric of type '{metric_type}' and name '{metric_name}' doesn't exist"
            ) from None
        return metric

    def _add_default_dims(self, idx: Any, dimensions: list[Dimension]) -> list[Dimension]:
        # TorchServe appends to the caller's list, which is the shared mutable default `[]` of
        # every add_* method: harmless with one model per process, wrong with several here.
        default_dims: list[Dimension] = super()._add_default_dims(idx, list(dimensions))
        return default_dims

    def finite(self, metric_name: str, value: Any) -> float | None:
        """`value` as a builtin float, or None (warned once per metric) when it is no finite
        number. Only builtin values reach the frontend: a tensor there would be refused as a
        foreign object, and the worker replaced; a numpy float32 would not add up."""
        try:
            number = float(value)
        except Exception:  # whatever a handler's object raises from __float__
            number = math.nan
        if math.isfinite(number):
            return number
        if metric_name not in self._unusable:
            self._unusable.add(metric_name)
            log.warning(
                "metric %s: dropped the value %.100r, which is not a finite number "
                "(said once per metric)",
                metric_name,
                value,
            )
        return None

    def record(self, metric: RecordingMetric, value: float, dimension_values: list[str]) -> None:
        dims = tuple(zip(metric.dimension_names, map(str, dimension_values), strict=True))
        key: SeriesKey = (metric.type_name, metric.metric_name, dims)
        with self._lock:
            if metric.is_counter:
                self.series[key] = self.series.get(key, 0) + value
            else:
                self.series[key] = value
        if self.on_metric is not None:
            try:
                self.on_metric(metric.metric_name, value, metric.unit, dict(dims), metric.type_name)
            except Exception:
                log.exception("metric callback failed for %s", metric.metric_name)

    def snapshot(self) -> dict[SeriesKey, float]:
        with self._lock:
            return dict(self.series)


def make_context(
    *,
    model_name: str,
    model_dir: Path,
    manifest: dict[str, Any],
    batch_size: int,
    gpu_id: int | None,
    metrics: MetricsStore,
    model_yaml_config: dict[str, Any],
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    max_items_per_request: int = DEFAULT_MAX_ITEMS_PER_REQUEST,
) -> Context:
    """A worker's context, as TorchServe's `Service` builds it when a worker loads a model.

    The per-batch parts (`request_ids`, `request_processor`) are set before each `handle`.
    """
    context = Context(
        model_name,
        str(model_dir),
        manifest,
        batch_size,
        gpu_id,
        ts.__version__,
        max_image_pixels is not None,  # TorchServe's limit_max_image_pixels
        metrics,
        model_yaml_config,
    )
    # TorchServe's worker socket, which its send_intermediate_predict_response writes to;
    # torchgate's worker replaces that function with one that writes to its own socket
    # (see api.workers.main._install_streaming), so nothing uses this.
    context.cl_socket = None
    if max_image_pixels is not None:
        # torchgate's own property: the shipped image handlers refuse larger images before
        # decoding them (handlers/torchgate_base.py); TorchServe's handlers do not read it.
        context.system_properties["max_image_pixels"] = max_image_pixels
    # torchgate's own too: the most rows (images, texts) one request may bring them.
    context.system_properties["max_items_per_request"] = max_items_per_request
    return context
