"""`api.metrics_config`: TorchServe's metrics.yaml declares model metrics up front, and
`model_metrics_auto_detect` decides whether undeclared ones reach /metrics.

The worker side is the real metrics store (`api.workers.context.MetricsStore`) a handler gets as
`context.metrics`; the exporter side is `api.observability.handler_metrics.HandlerMetrics`
behind a real Prometheus observer. tests/integration/test_archive_environment.py compares the
result with a real TorchServe.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from ts.metrics.dimension import Dimension
from ts.metrics.metric_cache_errors import MetricsCacheKeyError
from ts.metrics.metric_type_enum import MetricTypes

from api.config import ConfigError, parse_config
from api.metrics_config import DEFAULT_MODEL_METRICS, DeclaredMetric, load_metrics_spec
from api.observability.handler_metrics import HandlerMetrics
from api.observability.metrics import PrometheusObserver
from api.workers.context import MetricsStore
from tests.support.exposition import parse, value

# As examples/custom_metrics/metrics.yaml writes it: anchors for the dimension names.
EXAMPLE = """
dimensions:
  - &model_name "ModelName"
  - &level "Level"
ts_metrics:
  counter:
    - name: Requests2XX
      unit: Count
      dimensions: [*level]
model_metrics:
  counter:
    - name: InferenceRequestCount
      unit: count
      dimensions: []
  gauge:
    - name: SizeOfImage
      unit: kB
      dimensions: [*model_name, *level]
  histogram:
    - name: ExamplePercentMetric
      unit: percent
      dimensions: [*model_name, *level]
"""


@pytest.fixture
def example(tmp_path: Path) -> Path:
    path = tmp_path / "metrics.yaml"
    path.write_text(EXAMPLE)
    return path


def test_model_metrics_are_read_and_ts_metrics_is_said_to_be_unused(
    example: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="api.metrics_config"):
        spec = load_metrics_spec(example, auto_detect=False)
    assert spec.model_metrics == (
        DeclaredMetric("InferenceRequestCount", "count", "counter", ()),
        DeclaredMetric("SizeOfImage", "kB", "gauge", ("ModelName", "Level")),
        DeclaredMetric("ExamplePercentMetric", "percent", "histogram", ("ModelName", "Level")),
    )
    assert "ts_metrics section is not read" in caplog.text
    # By name only, as TorchServe's frontend looks a metric up: any type a handler writes.
    assert spec.exports("SizeOfImage")
    assert spec.declared("SizeOfImage") == spec.model_metrics[1]
    assert not spec.exports("Undeclared") and spec.declared("Undeclared") is None
    assert load_metrics_spec(example, auto_detect=True).exports("Undeclared")


def test_config_properties_keys(example: Path, tmp_path: Path) -> None:
    config = parse_config(
        {"metrics_config": example.name, "model_metrics_auto_detect": "true"}, base_dir=tmp_path
    )
    assert config.metrics_spec.source == example
    assert config.metrics_spec.auto_detect is True
    default = parse_config({}, base_dir=tmp_path).metrics_spec
    assert default.source is None and default.model_metrics == DEFAULT_MODEL_METRICS


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("model_metrics: {}\n", "no model_metrics section"),
        ("model_metrics:\n  summary: []\n", "model_metrics.summary is not one of"),
        ("model_metrics:\n  gauge:\n    - name: X\n", "needs name, unit and dimensions"),
        (
            "model_metrics:\n  gauge:\n    - {name: X, unit: ms, dimensions: ModelName}\n",
            "dimensions must be a list",
        ),
        ("model_metrics: [\n", "cannot read it"),
    ],
)
def test_a_bad_metrics_yaml_is_a_config_error(tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / "metrics.yaml").write_text(text)
    with pytest.raises(ConfigError, match=problem):
        parse_config({"metrics_config": "metrics.yaml"}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="cannot read it"):
        parse_config({"metrics_config": "missing.yaml"}, base_dir=tmp_path)


def test_declared_metrics_are_in_the_workers_cache(example: Path) -> None:
    spec = load_metrics_spec(example, auto_detect=False)
    updates: list[tuple[str, float, dict[str, str], str]] = []
    store = MetricsStore(
        "mnist",
        lambda name, value, unit, dims, kind: updates.append((name, value, dict(dims), kind)),
        spec.model_metrics,
    )
    store.set_request_ids({0: "req-0"})
    # The custom_metrics example's calls: get_metric of a declared metric, then add_or_update.
    store.get_metric("InferenceRequestCount", MetricTypes.COUNTER).add_or_update(2, [])
    store.add_size("SizeOfImage", 1.5, None, "kB")
    # Wrong number of dimension values: dropped and logged, as TorchServe's CachingMetric does.
    store.get_metric("InferenceRequestCount", MetricTypes.COUNTER).add_or_update(1, ["x"])
    with pytest.raises(MetricsCacheKeyError):
        store.get_metric("SizeOfImage", MetricTypes.COUNTER)
    assert updates == [
        ("InferenceRequestCount", 2, {}, "counter"),
        ("SizeOfImage", 1.5, {"ModelName": "mnist", "Level": "Model"}, "gauge"),
    ]
    # Without metrics_config: TorchServe's default declarations.
    assert MetricsStore("m").cache == {}
    default = MetricsStore("m", declared=DEFAULT_MODEL_METRICS)
    assert default.get_metric("HandlerTime", MetricTypes.GAUGE).dimension_names == [
        "ModelName",
        "Level",
    ]


@pytest.mark.parametrize("auto_detect", [False, True])
def test_undeclared_metrics_need_auto_detect(
    example: Path, auto_detect: bool, caplog: pytest.LogCaptureFixture
) -> None:
    observer = PrometheusObserver(process_metrics=False, hostname="h")
    sink = HandlerMetrics(hostname="h")
    sink.spec = load_metrics_spec(example, auto_detect=auto_detect)
    observer.add_collector(sink)
    observer.add_text(sink.counters_text)
    store = MetricsStore("mnist", sink.on_metric, sink.spec.model_metrics)
    store.set_request_ids({0: "req-0"})
    store.add_size("SizeOfImage", 1.5, None, "kB")
    with caplog.at_level(logging.WARNING, logger="api.observability.handler_metrics"):
        store.add_counter("UndeclaredCount", 2)
        store.add_counter("UndeclaredCount", 2)
    samples, types = parse(observer.render().decode())
    assert value(samples, "SizeOfImage", ModelName="mnist", Level="Model", Hostname="h") == 1.5
    if auto_detect:
        assert types["UndeclaredCount"] == "counter"
        assert value(samples, "UndeclaredCount", ModelName="mnist", Level="Model") == 4
    else:
        assert "UndeclaredCount" not in types
        assert caplog.text.count("model_metrics_auto_detect=true exports it") == 1


def test_a_declared_metric_has_the_declared_type_unit_and_dimensions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """TorchServe's frontend records every update of a declared metric into the metric built
    from the declaration (type, unit, dimensions plus Hostname), taking dimension values by
    position; its Prometheus client refuses another number of them (logged)."""
    (tmp_path / "metrics.yaml").write_text(
        "model_metrics:\n"
        "  histogram:\n"
        "    - {name: Latency, unit: ms, dimensions: [ModelName, Level]}\n"
    )
    observer = PrometheusObserver(process_metrics=False, hostname="h")
    sink = HandlerMetrics(hostname="h")
    sink.spec = load_metrics_spec(tmp_path / "metrics.yaml", auto_detect=False)
    observer.add_collector(sink)
    observer.add_text(sink.counters_text)
    store = MetricsStore("mnist", sink.on_metric, sink.spec.model_metrics)
    store.set_request_ids({0: "req-0"})
    with caplog.at_level(logging.WARNING, logger="api.observability.handler_metrics"):
        store.add_time("Latency", 5.0)  # a gauge (add_time's default)
        store.add_time("Latency", 7.0, metric_type=MetricTypes.HISTOGRAM)  # the declared one
        # A counter with one more value: dropped.
        store.add_metric("Latency", 1.0, "ms", dimensions=[Dimension("Camera", "front")])
        # Other names, as many values: TorchServe names them by position.
        other = store.add_metric_to_cache("Latency", "ms", ["Camera", "Site"], MetricTypes.GAUGE)
        other.add_or_update(4.0, ["front", "north"])
        # TorchServe's older update() renames the declared metric's dimensions: one fewer.
        store.get_metric("Latency", MetricTypes.HISTOGRAM).update(2.0, "", [Dimension("A", "a")])
    text = observer.render().decode()
    samples, types = parse(text)
    assert types["Latency"] == "histogram"
    assert "# HELP Latency Handler metric (ms)" in text  # the declared unit
    model = {"ModelName": "mnist", "Level": "Model", "Hostname": "h"}
    assert value(samples, "Latency_count", **model) == 2
    assert value(samples, "Latency_sum", **model) == 12.0
    assert value(samples, "Latency_sum", ModelName="front", Level="north", Hostname="h") == 4.0
    assert len([s for s in samples if s.name == "Latency_count"]) == 2
    assert "dimensions ['Camera', 'ModelName', 'Level'], where it has" in caplog.text
    assert "dimensions ['A'], where it has ['ModelName', 'Level']" in caplog.text
