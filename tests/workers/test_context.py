"""The metrics store behind context.metrics: TorchServe's API, recorded instead of logged."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
from ts.context import Context
from ts.metrics.dimension import Dimension
from ts.metrics.metric_cache_errors import MetricsCacheKeyError, MetricsCacheValueError
from ts.metrics.metric_type_enum import MetricTypes

from api.workers.context import MetricsStore, make_context

Seen = list[tuple[str, float, str, dict[str, str], str]]


def store(seen: Seen | None = None) -> MetricsStore:
    def on_metric(name: str, value: float, unit: str, dims: Mapping[str, str], kind: str) -> None:
        if seen is not None:
            seen.append((name, value, unit, dict(dims), kind))

    metrics = MetricsStore("m", on_metric)
    metrics.request_ids = {0: "r0", 1: "r1"}
    return metrics


def test_torchserve_add_methods_and_series() -> None:
    seen: Seen = []
    metrics = store(seen)
    metrics.add_counter("Hits", 1)
    metrics.add_counter("Hits", 2)
    metrics.add_time("Latency", 12.5)
    metrics.add_size("Payload", 3, unit="kB")
    metrics.add_percent("Load", 50.0)
    metrics.add_metric("Custom", 7, "items", dimensions=[Dimension("Route", "a")])
    metrics.add_error("Oops", 1)
    model = {"ModelName": "m", "Level": "Model"}
    assert seen == [
        ("Hits", 1, "Count", model, "counter"),
        ("Hits", 2, "Count", model, "counter"),
        ("Latency", 12.5, "Milliseconds", model, "gauge"),
        ("Payload", 3, "Kilobytes", model, "gauge"),
        ("Load", 50.0, "Percent", model, "gauge"),
        ("Custom", 7, "items", {"Route": "a", **model}, "counter"),
        ("Oops", 1, "unit", {"Level": "Error"}, "counter"),
    ]
    series = metrics.snapshot()
    assert series[("counter", "Hits", (("ModelName", "m"), ("Level", "Model")))] == 3
    assert series[("gauge", "Latency", (("ModelName", "m"), ("Level", "Model")))] == 12.5


def test_validation_is_torchserve_s() -> None:
    metrics = store()
    with pytest.raises(MetricsCacheValueError):
        metrics.add_time("Latency", 1, unit="minutes")
    with pytest.raises(MetricsCacheKeyError):
        metrics.get_metric("Nope", MetricTypes.GAUGE)
    metrics.add_counter("Hits", -1)  # logged and dropped, like CachingMetric
    assert metrics.snapshot() == {}


def test_default_dimensions_are_not_shared_between_stores() -> None:
    """TorchServe appends ModelName to the add_* methods' shared default list (one model per
    process there, as in a torchgate worker); a store must keep its own name whatever other
    stores in the same process recorded."""
    first, second = MetricsStore("first"), MetricsStore("second")
    first.add_counter("Hits", 1)
    second.add_counter("Hits", 1)
    assert [key[2] for key in second.snapshot()] == [(("ModelName", "second"), ("Level", "Model"))]


def test_get_metric_and_backwards_compatible_update() -> None:
    seen: Seen = []
    metrics = store(seen)
    metric = metrics.add_metric_to_cache("Queue", "count", ["Worker"], MetricTypes.GAUGE)
    assert metrics.get_metric("Queue", MetricTypes.GAUGE) is metric
    metric.add_or_update(4, ["w0"])
    metric.update(5, dimensions=[Dimension("Shard", "s1")])
    assert seen == [
        ("Queue", 4, "Count", {"Worker": "w0"}, "gauge"),
        ("Queue", 5, "Count", {"Shard": "s1"}, "gauge"),
    ]


def test_a_failing_callback_never_fails_the_handler() -> None:
    def explode(*args: object) -> None:
        raise RuntimeError("exporter down")

    metrics = MetricsStore("m", explode)
    metrics.add_counter("Hits", 1)
    assert len(metrics.snapshot()) == 1


def test_make_context_is_torchserve_s_context(tmp_path: Path) -> None:
    metrics = MetricsStore("m")
    context = make_context(
        model_name="m",
        model_dir=tmp_path,
        manifest={"model": {"modelName": "m"}},
        batch_size=8,
        gpu_id=None,
        metrics=metrics,
        model_yaml_config={"a": 1},
    )
    assert isinstance(context, Context)
    assert context.metrics is metrics
    assert context.system_properties["model_dir"] == str(tmp_path)
    assert context.system_properties["server_name"] == "MMS"
    assert context.model_yaml_config == {"a": 1}
