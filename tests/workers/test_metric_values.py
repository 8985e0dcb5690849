"""What a handler passes to `context.metrics` as a value or a dimension, through a real worker
process to /metrics.

Handlers pass what they have: `context.metrics.add_metric("Conf", out.max())` (a tensor), a numpy
float32, a string, NaN; and dimension values from the client's request. TorchServe's frontend
takes a value that parses as a number and drops the rest, and the request succeeds either way.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from ts.metrics.metric_type_enum import MetricTypes

from api.core.types import Prediction
from api.workers.context import MetricsStore
from api.workers.pool import WorkerPool
from tests.support.exposition import parse, value
from tests.support.metered import serve_metered

# Each request's body names what its handler records.
HANDLER = """
    import json
    import os

    import numpy as np
    import torch
    from ts.metrics.dimension import Dimension
    from ts.metrics.metric_type_enum import MetricTypes

    SURROGATE = json.loads('"\\\\udcff"')  # what a client's JSON string "\\udcff" decodes to

    def handle(data, context):
        if data is None:
            return None
        metrics = context.metrics
        for row in data:
            kind = row["body"]
            if kind == "float32":
                metrics.add_counter("Confidences", np.float32(0.5))
            elif kind == "tensor":
                out = torch.tensor([0.125, 0.25])
                metrics.add_metric("Conf", out.max(), "Percent", metric_type=MetricTypes.GAUGE)
            elif kind == "abc":
                metrics.add_counter("Hits", "abc")
            elif kind in ("nan", "inf"):
                metrics.add_counter("Hits", float(kind))
            elif kind == "one":
                metrics.add_counter("Hits", 1)
            elif kind == "surrogate":
                metrics.add_metric(
                    "Route", 1, SURROGATE, dimensions=[Dimension("Path", SURROGATE)]
                )
        return [os.getpid()] * len(data)
"""


def serve(pool: WorkerPool, tmp_path: Path, bodies: list[str]) -> tuple[list[Prediction], str]:
    """Each body as a request of its own to one worker; the answers and the /metrics page."""
    return serve_metered(pool, tmp_path, "values", HANDLER, list(bodies))


def one_worker_answered_all(answers: list[Prediction]) -> bool:
    """Every answer a 200 from the same process: none failed, the worker was never replaced."""
    return all(a.status == 200 for a in answers) and len({a.body for a in answers}) == 1


def test_numpy_and_tensor_values_count_as_their_numbers(
    worker_pool: WorkerPool, tmp_path: Path
) -> None:
    answers, text = serve(worker_pool, tmp_path, ["float32", "float32", "float32", "tensor"])
    assert one_worker_answered_all(answers)
    samples, types = parse(text)
    assert types["Confidences"] == "counter"
    assert value(samples, "Confidences", ModelName="values") == 1.5
    assert value(samples, "Conf", ModelName="values") == 0.25


@pytest.mark.parametrize("bad", ["abc", "nan", "inf"])
def test_a_value_that_is_no_finite_number_is_dropped_and_the_request_succeeds(
    worker_pool: WorkerPool, tmp_path: Path, bad: str
) -> None:
    answers, text = serve(worker_pool, tmp_path, [bad, "one", bad, "one"])
    assert one_worker_answered_all(answers)
    samples, _ = parse(text)
    assert value(samples, "Hits", ModelName="values") == 2


def test_a_lone_surrogate_in_a_dimension_or_unit_keeps_the_page_whole(
    worker_pool: WorkerPool, tmp_path: Path
) -> None:
    answers, text = serve(worker_pool, tmp_path, ["surrogate", "one"])
    assert one_worker_answered_all(answers)
    samples, _ = parse(text)
    assert value(samples, "Route", Path="\\\\udcff") == 1  # escaped, as exposition escapes `\`
    assert value(samples, "Hits", ModelName="values") == 1
    assert "torchgate_requests_total" in text and "ts_inference_requests_total" in text
    assert "# HELP Route Handler metric (\\\\udcff)" in text


# -- the worker's metrics store alone ----------------------------------------------------------


def recording_store(seen: list[float]) -> MetricsStore:
    store = MetricsStore("m", lambda _name, value, *_: seen.append(value))
    store.request_ids = {0: "r0"}
    return store


def test_the_store_hands_on_builtin_floats(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[float] = []
    store = recording_store(seen)
    store.add_counter("Hits", np.float32(0.5))
    store.add_metric("Conf", torch.tensor([0.25]), "Percent", metric_type=MetricTypes.GAUGE)
    assert seen == [0.5, 0.25]
    assert all(type(v) is float for v in seen)
    assert not caplog.records


def test_the_store_drops_values_that_are_no_finite_numbers_warning_once_per_metric(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[float] = []
    store = recording_store(seen)
    with caplog.at_level(logging.WARNING):
        for bad in ("abc", math.nan, -math.inf, None, torch.tensor([1.0, 2.0]), object()):
            store.add_counter("Hits", bad)
            store.add_time("Latency", bad)
    assert seen == [] and store.snapshot() == {}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "metric Hits: dropped the value 'abc'" in warnings[0]
