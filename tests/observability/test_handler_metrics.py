"""`api.observability.handler_metrics`: a handler's `context.metrics` calls come out on /metrics.

Updates go through the real metrics store (`api.workers.context.MetricsStore`, TorchServe's
`MetricCacheAbstract` API) wired straight to `HandlerMetrics.on_metric`. In the server the store
lives in a worker process, and `api.backends.workers.WorkerBackend` hands its updates, the same
calls, to `on_metric` on the event loop (`api.app` wires it).
"""

from __future__ import annotations

import json
import math
import re
import threading

import numpy as np
import pytest
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes

from api.core.registry import Registry
from api.core.types import InferenceRequest, Prediction
from api.observability.compose import build_observability
from api.observability.gpu import GpuCollector
from api.observability.handler_metrics import HandlerMetrics
from api.observability.metrics import PrometheusObserver
from api.workers.context import MetricsStore
from tests.support.exposition import parse, value
from tests.support.fake_nvml import FakeDevice, FakeNvml


@pytest.fixture
def observer() -> PrometheusObserver:
    return PrometheusObserver(process_metrics=False, hostname="h")


@pytest.fixture
def sink(observer: PrometheusObserver) -> HandlerMetrics:
    handler_metrics = HandlerMetrics(hostname="h")
    observer.add_collector(handler_metrics)
    observer.add_text(handler_metrics.counters_text)
    return handler_metrics


def store_for(sink: HandlerMetrics, model: str = "digits") -> MetricsStore:
    store = MetricsStore(model, on_metric=sink.on_metric)
    store.set_request_ids({0: "req-0"})
    return store


def test_torchserve_metric_calls_become_prometheus_families(
    observer: PrometheusObserver, sink: HandlerMetrics
) -> None:
    store = store_for(sink)
    store.add_counter("LoopCount", 1, 0)
    store.add_counter("LoopCount", 2, 0)
    store.add_time("PreprocessTime", 12.5, 0)  # a gauge in ms, TorchServe's default
    store.add_size("ImageSize", 0.5, 0, dimensions=[Dimension("Camera", "front")])
    store.add_percent("Confidence", 97.0, 0, metric_type=MetricTypes.HISTOGRAM)

    samples, types = parse(observer.render().decode())
    model = {"ModelName": "digits", "Level": "Model", "Hostname": "h"}
    # Counters keep TorchServe's naming: the sample is named as the metric, no _total.
    assert types["LoopCount"] == "counter"
    assert value(samples, "LoopCount", **model) == 3
    assert types["PreprocessTime"] == "gauge"
    assert value(samples, "PreprocessTime", **model) == 12.5
    assert value(samples, "ImageSize", Camera="front", **model) == 0.5
    assert types["Confidence"] == "histogram"
    assert value(samples, "Confidence_count", **model) == 1
    assert value(samples, "Confidence_bucket", le="+Inf", **model) == 1


def test_models_are_told_apart_by_their_model_name_label(
    observer: PrometheusObserver, sink: HandlerMetrics
) -> None:
    store_for(sink, "a").add_counter("Hits", 1, 0)
    store_for(sink, "b").add_counter("Hits", 5, 0)
    samples, _ = parse(observer.render().decode())
    assert value(samples, "Hits", ModelName="a") == 1
    assert value(samples, "Hits", ModelName="b") == 5


def test_conflicting_reserved_and_odd_names_never_break_the_scrape(
    observer: PrometheusObserver, sink: HandlerMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    sink.on_metric("torchgate_requests_total", 1.0, "", {}, "counter")  # would duplicate ours
    sink.on_metric("torchgate_future_family", 1.0, "", {}, "gauge")  # torchgate's namespace
    sink.on_metric("ts_inference_requests_total", 1.0, "", {}, "counter")
    sink.on_metric("process_cpu_seconds_total", 1.0, "", {}, "gauge")  # prometheus_client's
    sink.on_metric("2xx rate/s", 4.0, "", {"a-b": "v"}, "gauge")
    sink.on_metric("Weird", 1.0, "", {}, "summary")
    # Names torchgate does not write are the handler's, as in TorchServe.
    sink.on_metric("ts_custom", 2.0, "", {}, "gauge")
    sink.on_metric("process_time", 3.0, "", {}, "gauge")

    text = observer.render().decode()
    samples, types = parse(text)
    assert value(samples, "_2xx_rate_s", a_b="v") == 4.0
    assert not [s for s in samples if s.name.startswith("torchgate_")]
    assert "Weird" not in types
    assert value(samples, "ts_custom", Hostname="h") == 2.0
    assert value(samples, "process_time", Hostname="h") == 3.0
    # One warning per metric and problem, not per update.
    assert caplog.text.count("handler metric") == 5


def test_an_update_takes_its_metrics_type_and_dimensions(
    observer: PrometheusObserver, sink: HandlerMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    """As TorchServe's frontend: a metric is found by name and keeps the type and dimensions it
    was created with (its first update's, here: nothing declares it); another type is recorded
    as that type, and dimension values go by position whatever their names, or are dropped
    when there are more or fewer."""
    sink.on_metric("Latency", 1.0, "ms", {"ModelName": "m"}, "gauge")
    sink.on_metric("Latency", 2.0, "ms", {"ModelName": "m"}, "counter")  # set, as a gauge
    sink.on_metric("Latency", 3.0, "ms", {"Other": "x"}, "gauge")  # as ModelName="x"
    sink.on_metric("Latency", 4.0, "ms", {"ModelName": "m", "Other": "y"}, "gauge")  # dropped
    sink.on_metric("Hits", 2.0, "", {"ModelName": "m", "Level": "Model"}, "counter")
    sink.on_metric("Hits", 3.0, "", {"ModelName": "m", "Level": "Model"}, "histogram")  # added
    sink.on_metric("Hits", -1.0, "", {"ModelName": "m", "Level": "Model"}, "gauge")  # dropped

    samples, types = parse(observer.render().decode())
    assert types["Latency"] == "gauge" and types["Hits"] == "counter"
    assert value(samples, "Latency", ModelName="m") == 2.0
    assert value(samples, "Latency", ModelName="x") == 3.0
    assert len([s for s in samples if s.name == "Latency"]) == 2
    assert value(samples, "Hits", ModelName="m", Level="Model") == 5.0
    assert "dimensions ['ModelName', 'Other'], where it has ['ModelName']" in caplog.text
    assert "Hits dropped: a negative value for a counter" in caplog.text


def test_series_are_bounded(observer: PrometheusObserver) -> None:
    sink = HandlerMetrics(hostname="h", max_series=3)
    observer.add_text(sink.counters_text)
    for index in range(10):
        sink.on_metric("PerRequest", 1.0, "", {"id": str(index)}, "counter")
    samples, _ = parse(observer.render().decode())
    assert len([s for s in samples if s.name == "PerRequest"]) == 3
    # A metric of a new name once the bound is reached is no family either: 50,000 made-up
    # names made 50,000 empty families (and a scrape of 22 MB of HELP and TYPE lines).
    for index in range(100):
        sink.on_metric(f"Name{index}", 1.0, "", {}, "gauge")
    assert len(sink._families) == 1


def test_one_model_cannot_take_every_series_from_the_others(
    observer: PrometheusObserver, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler labelling by request id took all 10,000 series: every other model's metrics
    were dropped. Each version keeps a tenth for itself; alone, one may use them all."""
    sink = HandlerMetrics(hostname="h", max_series=100)
    observer.add_text(sink.counters_text)
    greedy, quiet = sink.for_source("greedy.mar"), sink.for_source("quiet.mar")
    for index in range(200):
        greedy("PerRequest", 1.0, "", {"id": str(index)}, "counter")
    for index in range(10):
        quiet("QuietHits", 1.0, "", {"ModelName": "quiet", "kind": str(index)}, "counter")
    samples, _ = parse(observer.render().decode())
    assert len([s for s in samples if s.name == "PerRequest"]) == 90  # 10 kept for quiet.mar
    assert len([s for s in samples if s.name == "QuietHits"]) == 10
    assert "greedy.mar has made all the handler metric series it may" in caplog.text
    alone = HandlerMetrics(hostname="h", max_series=100)
    only = alone.for_source("only.mar")
    for index in range(200):
        only("PerRequest", 1.0, "", {"id": str(index)}, "counter")
    assert alone._series_count == 100
    # A version unloaded (or failed to load) keeps no share: the greedy one may take it.
    released = HandlerMetrics(hostname="h", max_series=100)
    grows = released.for_source("grows.mar")
    released.for_source("leaves.mar")
    for index in range(200):
        grows("PerRequest", 1.0, "", {"id": str(index)}, "counter")
    assert released._series_count == 90
    released.release("leaves.mar")
    for index in range(200):
        grows("PerRequest", 1.0, "", {"id": str(index)}, "counter")
    assert released._series_count == 100
    # However many archives have come and gone, each still gets its own share.
    many = HandlerMetrics(hostname="h", max_series=100)
    callbacks = [many.for_source(f"m{index}.mar") for index in range(30)]
    for index, callback in enumerate(callbacks):
        callback("Hits", 1.0, "", {"ModelName": f"m{index}"}, "counter")
    assert many._series_count == 30


def test_updates_from_many_threads_add_up(
    observer: PrometheusObserver, sink: HandlerMetrics
) -> None:
    """`HandlerMetrics` takes updates from any thread (it locks every read and write), though
    the worker backend calls it from the event loop."""
    model = {"ModelName": "digits", "Level": "Model"}

    def work() -> None:
        for _ in range(1000):
            sink.on_metric("Items", 1.0, "Count", model, "counter")
            sink.on_metric("ItemTime", 1.0, "ms", model, "histogram")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for _ in range(20):
        observer.render()  # scrapes meanwhile see consistent copies
    for thread in threads:
        thread.join()
    samples, _ = parse(observer.render().decode())
    assert value(samples, "Items", ModelName="digits") == 8000
    assert value(samples, "ItemTime_count", ModelName="digits") == 8000


def test_a_lone_surrogate_from_a_client_cannot_break_the_scrape(
    observer: PrometheusObserver, sink: HandlerMetrics
) -> None:
    """`json.loads('"\\udcff"')` gives a string UTF-8 cannot encode; as a dimension value or
    a unit it made every later /metrics page fail. It is recorded escaped."""
    surrogate = json.loads('"\\udcff"')
    store = store_for(sink)
    store.add_metric("Route", 1, surrogate, dimensions=[Dimension("Path", surrogate)])
    store.add_time("Latency", 2.0, dimensions=[Dimension("Path", surrogate)])
    store.add_counter("Hits", 1)

    text = observer.render().decode()
    samples, _ = parse(text)
    assert value(samples, "Route", Path="\\\\udcff") == 1
    assert value(samples, "Latency", Path="\\\\udcff") == 2.0
    assert value(samples, "Hits", ModelName="digits") == 1
    assert "# HELP Route Handler metric (\\\\udcff)" in text


def test_values_are_taken_as_finite_floats(
    observer: PrometheusObserver, sink: HandlerMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    """Workers send builtin floats (`api.workers.context`); the frontend converts again, so a
    numpy float32 adds up and NaN, infinity or a string cannot stick to a series."""
    model = {"ModelName": "m"}
    for _ in range(3):
        sink.on_metric("Confidences", np.float32(0.5), "", model, "counter")  # type: ignore[arg-type]
        sink.on_metric("Sizes", np.float32(0.5), "", model, "histogram")  # type: ignore[arg-type]
    for bad in (math.nan, math.inf, "abc"):
        sink.on_metric("Confidences", bad, "", model, "counter")  # type: ignore[arg-type]

    samples, types = parse(observer.render().decode())
    assert types["Confidences"] == "counter"
    assert value(samples, "Confidences", ModelName="m") == 1.5
    assert value(samples, "Sizes_sum", ModelName="m") == 1.5
    assert caplog.text.count("not a finite number") == 1


def test_no_handler_metric_takes_a_builtin_family_name() -> None:
    """TorchServe's registry refuses a name already registered; here a handler metric by the
    name of one of torchgate's families would write the family twice, an invalid page."""
    gpu = GpuCollector(hostname="h", nvml=FakeNvml([FakeDevice(used=1, total=2, utilization=3)]))
    observability = build_observability(access_log=False, gpu=gpu)
    observer = observability.metrics
    observer.track(Registry())  # WorkerLoadTime
    observer.request_finished(  # QueueTime
        InferenceRequest({}), "m", "1", 200, 0.001, Prediction(b"", queue_seconds=0.001)
    )
    page = observer.render().decode()
    builtin = set(parse(page)[1])
    assert any(name.startswith("process_") for name in builtin)  # prometheus_client's too
    sample_names = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", page, re.MULTILINE))

    # A family's name, or a sample's (`process_cpu_seconds_total` of `process_cpu_seconds`).
    for name in builtin | sample_names:
        observability.handler_metrics.on_metric(name, 1.0, "", {"ModelName": "m"}, "gauge")
    page = observer.render().decode()
    families = re.findall(r"^# TYPE (\S+) ", page, re.MULTILINE)
    assert set(families) == builtin
    assert len(families) == len(builtin), "a family is written twice"
    assert set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", page, re.MULTILINE)) == sample_names
