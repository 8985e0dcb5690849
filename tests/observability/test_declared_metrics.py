"""Handler metrics that metrics.yaml (`metrics_config`) declares, through the real path: a
worker process runs the handler with torchgate's `context.metrics`, and its updates reach
`HandlerMetrics.on_metric` behind a Prometheus observer, as `api.app` wires them.

TorchServe 0.12's frontend looks a handler metric up by its name only
(`WorkerLifeCycle.ReaderThread`: `metricCache.getMetricBackend(name).addOrUpdate(...)`), so a
metric is recorded under the type metrics.yaml declares whatever type the handler wrote it with;
an undeclared one (with `model_metrics_auto_detect=true`) gets the type of its first update
(`MetricCache.addAutoDetectMetricBackend`). Its `Service.predict` records PredictionTime with
`metrics.add_time`, which reuses a declared PredictionTime gauge.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from api.metrics_config import load_metrics_spec
from api.workers.pool import WorkerPool
from tests.support.exposition import parse, value
from tests.support.metered import serve_metered

# A handler as TorchServe's docs write one: add_size and add_time without a metric_type (so
# gauges), where metrics.yaml wants histograms; a counter it writes as a gauge too.
HANDLER = """
    from ts.metrics.metric_type_enum import MetricTypes

    state = {}

    def initialize(context):
        state["declared"] = context.metrics.cache.get(MetricTypes.GAUGE, {}).get("PredictionTime")

    def handle(data, context):
        metrics = context.metrics
        metrics.add_size("ImageSize", 2.5, None, "kB")
        metrics.add_metric("Items", len(data), "count", None, metric_type=MetricTypes.GAUGE)
        metrics.add_counter("Undeclared", 1)
        current = metrics.get_metric("PredictionTime", MetricTypes.GAUGE)
        return [{"reused": state["declared"] is not None and current is state["declared"]}] * len(
            data
        )
"""

DECLARED_HISTOGRAMS = """
model_metrics:
  counter:
    - name: Items
      unit: count
      dimensions: [ModelName, Level]
  histogram:
    - name: ImageSize
      unit: kB
      dimensions: [ModelName, Level]
    - name: PredictionTime
      unit: ms
      dimensions: [ModelName, Level]
"""

DECLARED_GAUGE = """
model_metrics:
  gauge:
    - name: PredictionTime
      unit: ms
      dimensions: [ModelName, Level]
"""


def serve(
    pool: WorkerPool, tmp_path: Path, metrics_yaml: str, *, auto_detect: bool, batches: int
) -> tuple[list[object], str]:
    """Run `batches` one-request batches of HANDLER with `metrics_yaml` as metrics_config; the
    handler's answers and the /metrics page."""
    (tmp_path / "metrics.yaml").write_text(metrics_yaml)
    spec = load_metrics_spec(tmp_path / "metrics.yaml", auto_detect=auto_detect)
    answers, page = serve_metered(pool, tmp_path, "declared", HANDLER, [b"x"] * batches, spec=spec)
    return [answer.body for answer in answers], page


@pytest.mark.parametrize("auto_detect", [False, True])
def test_a_declared_metric_is_recorded_under_its_declared_type(
    worker_pool: WorkerPool, tmp_path: Path, auto_detect: bool
) -> None:
    """Gauge updates of metrics declared as histograms and a counter count as those, with or
    without auto-detect (a declaration wins over the first update's type); before, /metrics
    dropped them ("a gauge not declared in metrics_config"), or with auto-detect exported them
    as gauges."""
    _, text = serve(worker_pool, tmp_path, DECLARED_HISTOGRAMS, auto_detect=auto_detect, batches=3)
    samples, types = parse(text)
    model = {"ModelName": "declared", "Level": "Model", "Hostname": "h"}
    assert types["ImageSize"] == "histogram"
    assert value(samples, "ImageSize_count", **model) == 3
    assert value(samples, "ImageSize_sum", **model) == 7.5
    assert "# HELP ImageSize Handler metric (kB)" in text  # the declared unit
    # The worker's own PredictionTime gauge, declared here as a histogram.
    assert types["PredictionTime"] == "histogram"
    assert value(samples, "PredictionTime_count", **model) == 3
    # A counter written as a gauge: each value added, as TorchServe's Counter.inc does.
    assert types["Items"] == "counter"
    assert value(samples, "Items", **model) == 3
    if auto_detect:  # undeclared: the type of its first update
        assert types["Undeclared"] == "counter"
    else:
        assert "Undeclared" not in types


def test_a_declared_prediction_time_is_reused(worker_pool: WorkerPool, tmp_path: Path) -> None:
    """The worker records PredictionTime into the gauge metrics.yaml declares, as TorchServe's
    `metrics.add_time` does; it replaced the declaration with a metric of its own."""
    answers, text = serve(worker_pool, tmp_path, DECLARED_GAUGE, auto_detect=False, batches=2)
    assert answers == [{"reused": True}] * 2
    samples, types = parse(text)
    assert types["PredictionTime"] == "gauge"
    assert value(samples, "PredictionTime", ModelName="declared", Level="Model", Hostname="h") >= 0
