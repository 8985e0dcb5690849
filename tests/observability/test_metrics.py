"""`api.observability.metrics`: what the Prometheus observer records and how /metrics writes it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.core import GaugeMetricFamily, Metric

from api.app import build
from api.config import parse_config
from api.core.dataplane import DataPlane
from api.core.registry import Registry
from api.core.types import (
    API_TORCHSERVE_REST,
    API_V1_REST,
    API_V2_GRPC,
    API_V2_REST,
    REJECT_AUTH,
    REJECT_QUEUE_FULL,
    InferenceRequest,
    ModelSettings,
    Prediction,
)
from api.errors import ModelNotReady, Overloaded
from api.observability.metrics import (
    LATENCY_BUCKETS,
    FastHistogram,
    PrometheusObserver,
    filter_samples,
)
from api.rest.apps import build_metrics_app
from tests.support.echo_backend import EchoBackend, factory
from tests.support.exposition import parse, value
from tests.support.fake_backend import FakeBackend, load_fake_backend, write_fake_archive


def request(api: str = API_TORCHSERVE_REST) -> InferenceRequest:
    return InferenceRequest({"body": b""}, {}, "rid", api)


def answered(queue_s: float, batch: int = 1) -> Prediction:
    return Prediction(b"", queue_seconds=queue_s, batch_size=batch)


def scrape(observer: PrometheusObserver) -> tuple[list, dict[str, str]]:
    return parse(observer.render().decode())


def test_requests_are_counted_by_model_version_api_status_and_shadow() -> None:
    observer = PrometheusObserver(process_metrics=False)
    for _ in range(3):
        observer.request_finished(request(), "m", "1.0", 200, 0.001, answered(0.0))
    observer.request_finished(request(API_V2_REST), "m", "1.0", 400, 0.001, answered(0.0))
    observer.request_finished(request(API_V2_GRPC), "m", "2.0", 503, 0.001, None)
    observer.request_finished(request(), "m", "2.0", 200, 0.001, answered(0.0), shadow=True)

    samples, types = scrape(observer)
    assert types["torchgate_requests_total"] == "counter"
    total = "torchgate_requests_total"
    assert value(samples, total, model="m", version="1.0", api="torchserve-rest", status="200",
                 shadow="false") == 3  # fmt: skip
    assert value(samples, total, api="v2-rest", status="400") == 1
    assert value(samples, total, api="v2-grpc", version="2.0", status="503") == 1
    assert value(samples, total, version="2.0", status="200", shadow="true") == 1


def test_latency_buckets_resolve_sub_millisecond_requests() -> None:
    observer = PrometheusObserver(process_metrics=False)
    for latency in (0.00004, 0.0002, 0.0002, 0.0009, 0.02):
        observer.request_finished(request(), "m", "1.0", 200, latency, answered(0.0))

    samples, types = scrape(observer)
    assert types["torchgate_request_latency_seconds"] == "histogram"
    bucket = "torchgate_request_latency_seconds_bucket"
    assert value(samples, bucket, le="5e-05") == 1
    assert value(samples, bucket, le="0.0001") == 1
    assert value(samples, bucket, le="0.00025") == 3
    assert value(samples, bucket, le="0.001") == 4
    assert value(samples, bucket, le="+Inf") == 5
    assert value(samples, "torchgate_request_latency_seconds_count") == 5
    assert value(samples, "torchgate_request_latency_seconds_sum") == pytest.approx(0.02134)


def test_a_value_on_a_bucket_bound_counts_in_that_bucket() -> None:
    histogram = FastHistogram((0.001, 0.01))
    for observed in (0.001, 0.0010001, 0.01, 5.0):
        histogram.observe(observed)
    assert histogram.buckets() == [("0.001", 1.0), ("0.01", 3.0), ("+Inf", 4.0)]
    assert histogram.total == pytest.approx(5.0120001)


def test_queue_wait_is_per_model_version_across_apis_and_failures_add_none() -> None:
    observer = PrometheusObserver(process_metrics=False)
    observer.request_finished(request(), "m", "1.0", 200, 0.002, answered(0.0003))
    observer.request_finished(request(API_V2_REST), "m", "1.0", 200, 0.002, answered(0.0007))
    observer.request_finished(request(), "m", "1.0", 504, 0.002, None)

    samples, _ = scrape(observer)
    assert value(samples, "torchgate_queue_wait_seconds_count", model="m", version="1.0") == 2
    assert value(samples, "torchgate_queue_wait_seconds_sum") == pytest.approx(0.001)
    assert value(samples, "torchgate_queue_wait_seconds_bucket", le="0.0005") == 1


def test_batches_record_size_and_inference_time() -> None:
    observer = PrometheusObserver(process_metrics=False)
    observer.batch_finished("m", "1.0", 8, 0.0004)
    observer.batch_finished("m", "1.0", 3, 0.0002)

    samples, types = scrape(observer)
    assert types["torchgate_batch_size"] == types["torchgate_inference_seconds"] == "histogram"
    assert value(samples, "torchgate_batch_size_bucket", le="4.0") == 1
    assert value(samples, "torchgate_batch_size_bucket", le="8.0") == 2
    assert value(samples, "torchgate_batch_size_sum") == 11
    assert value(samples, "torchgate_inference_seconds_bucket", le="0.00025") == 1
    assert value(samples, "torchgate_inference_seconds_count") == 2


def test_rejections_by_reason_and_unknown_models_are_not_labels() -> None:
    async def main() -> list:
        observer = PrometheusObserver(process_metrics=False)
        registry = Registry(observer)
        observer.track(registry)

        async def backend() -> FakeBackend:
            return FakeBackend("m", "1.0")

        await registry.register("m", "1.0", "m.mar", backend, ModelSettings())
        observer.request_rejected("m", "1.0", REJECT_QUEUE_FULL)
        observer.request_rejected("m", "", REJECT_AUTH)  # the default version, by the URL
        # A client can put anything in the URL of a request it is refused for.
        for junk in ("a", "b", "c"):
            observer.request_rejected(junk, "", REJECT_AUTH)
        await registry.close()
        return scrape(observer)[0]

    samples = asyncio.run(main())
    assert value(samples, "torchgate_rejected_total", model="m", reason="queue_full") == 1
    assert value(samples, "torchgate_rejected_total", model="m", reason="auth") == 1
    assert value(samples, "torchgate_rejected_total", model="", reason="auth") == 3


def named(version: str | None, *, counted: bool = True) -> InferenceRequest:
    """A request as the dataplane hands it over: with the version its client named."""
    asked = request()
    asked.version_named, asked.counted = version, counted
    return asked


def test_torchserve_counters_are_written_as_torchserve_writes_them() -> None:
    observer = PrometheusObserver(process_metrics=False, hostname="host-1")
    observer.request_finished(named("1.0"), "m", "1.0", 200, 0.002, answered(0.0005))
    v2 = request(API_V2_REST)
    v2.version_named = "1.0"
    observer.request_finished(v2, "m", "1.0", 500, 0.001, None)
    observer.request_finished(named("1.0"), "m", "1.0", 200, 9.0, answered(9.0), shadow=True)

    text = observer.render().decode()
    samples, types = parse(text)
    for name in (
        "ts_inference_requests_total",
        "ts_inference_latency_microseconds",
        "ts_queue_latency_microseconds",
    ):
        assert types[name] == "counter"  # the sample name is the family name, no _total added
        [sample] = [s for s in samples if s.name == name]
        assert sample.labels == {"model_name": "m", "model_version": "1.0", "hostname": "host-1"}
    # Shadow copies are left out: TorchServe never saw them.
    assert value(samples, "ts_inference_requests_total") == 2
    assert value(samples, "ts_inference_latency_microseconds") == pytest.approx(3000)
    assert value(samples, "ts_queue_latency_microseconds") == pytest.approx(500)
    assert '{model_name="m",model_version="1.0",hostname="host-1"}' in text


def test_http_answers_and_queue_time_as_torchserve_counts_them() -> None:
    """TorchServe's Requests2XX/4XX/5XX count every answer of its REST ports by class (its
    "5XX" is everything not 2xx or 4xx); QueueTime is the latest request's queue wait, ms."""
    observer = PrometheusObserver(process_metrics=False, hostname="host-1")
    samples, types = scrape(observer)
    assert {types[f"Requests{c}XX"] for c in "245"} == {"counter"}  # listed from the start
    assert not [s for s in samples if s.name.startswith("Requests") or s.name == "QueueTime"]
    for status in (200, 201, 404, 413, 500, 503, 302):
        observer.http_answered(status)
    observer.request_finished(named("1.0"), "m", "1.0", 200, 0.01, answered(0.004))
    observer.request_finished(named("1.0"), "m", "1.0", 200, 0.01, answered(0.0025))
    observer.request_finished(named("1.0"), "m", "1.0", 200, 9.0, answered(9.0), shadow=True)
    samples, types = scrape(observer)
    host = {"Level": "Host", "Hostname": "host-1"}
    for name, count in (("Requests2XX", 2), ("Requests4XX", 2), ("Requests5XX", 3)):
        [sample] = [s for s in samples if s.name == name]
        assert (sample.labels, sample.value) == (host, count)
    [queue] = [s for s in samples if s.name == "QueueTime"]
    assert types["QueueTime"] == "gauge"
    assert (queue.labels, queue.value) == (host, pytest.approx(2.5))  # the shadow is not it


def test_torchserve_counters_label_a_request_by_the_version_it_named() -> None:
    """As TorchServe: "default" when the client named no version (its URL had none), and a
    client's request counted once even when torchgate split it (KServe v1 instances)."""
    observer = PrometheusObserver(process_metrics=False, hostname="h")
    observer.request_finished(named(None), "m", "2.0", 200, 0.001, answered(0.0))
    observer.request_finished(named(None, counted=False), "m", "2.0", 200, 0.001, None)
    observer.request_finished(named("2.0"), "m", "2.0", 200, 0.001, None)
    samples, _ = scrape(observer)
    assert value(samples, "ts_inference_requests_total", model_version="default") == 1
    assert value(samples, "ts_inference_requests_total", model_version="2.0") == 1
    # torchgate's own families keep the version that answered, and every request.
    assert value(samples, "torchgate_requests_total", version="2.0") == 3


def test_label_values_are_escaped_in_hand_written_families() -> None:
    observer = PrometheusObserver(process_metrics=False, hostname="h")
    observer.request_finished(request(), 'we"ird\\', "1.0", 200, 0.001, None)
    samples, _ = scrape(observer)
    assert value(samples, "ts_inference_requests_total", model_name='we\\"ird\\\\') == 1


def test_registry_gauges_are_read_at_scrape_time() -> None:
    async def main() -> tuple[list, list]:
        observer = PrometheusObserver(process_metrics=False)
        registry = Registry(observer)
        observer.track(registry)
        backend = FakeBackend("m", "1.0")
        backend.gate = asyncio.Event()

        async def factory() -> FakeBackend:
            return backend

        settings = ModelSettings(batch_size=2, max_batch_delay_ms=0, min_workers=1)
        version = await registry.register("m", "1.0", "m.mar", factory, settings)
        futures = [version.batcher.submit(request()) for _ in range(5)]
        while backend.batches_seen == 0:  # the worker took a batch of 2 and waits at the gate
            await asyncio.sleep(0)
        during = scrape(observer)[0]
        backend.gate.set()
        await asyncio.gather(*futures)
        while version.batcher.busy_workers:  # the worker task notes the batch done after
            await asyncio.sleep(0)
        after = scrape(observer)[0]
        await registry.close()
        return during, after

    during, after = asyncio.run(main())
    assert value(during, "torchgate_queue_depth", model="m", version="1.0") == 3
    assert value(during, "torchgate_inflight_requests") == 5
    assert value(during, "torchgate_workers_busy") == 1
    assert value(during, "torchgate_workers") == 1
    assert value(during, "torchgate_model_ready") == 1
    assert value(after, "torchgate_queue_depth") == 0
    assert value(after, "torchgate_inflight_requests") == 0
    assert value(after, "torchgate_workers_busy") == 0
    # TorchServe's WorkerLoadTime, named by its worker name (W-<worker id>-<model>_<version>).
    [load] = [s for s in after if s.name == "WorkerLoadTime"]
    assert load.labels["WorkerName"] == "W-9000-m_1.0" and load.labels["Level"] == "Host"
    assert 0 <= load.value < 10_000


def test_the_workers_gauge_counts_live_workers_only() -> None:
    """A slot whose worker died (restarting, or failing to start) is capacity lost: it is not
    counted, though describe still lists it."""

    async def main() -> list:
        observer = PrometheusObserver(process_metrics=False)
        registry = Registry(observer)
        observer.track(registry)
        backend = FakeBackend("m", "1.0")

        async def factory() -> FakeBackend:
            return backend

        version = await registry.register(
            "m", "1.0", "m.mar", factory, ModelSettings(min_workers=2, max_workers=2)
        )
        dead = version.workers[0]
        dead.worker = None  # as while its supervisor restarts it
        samples = scrape(observer)[0]
        await registry.close()
        return samples

    assert value(asyncio.run(main()), "torchgate_workers", model="m", version="1.0") == 1


def test_metrics_port_serves_what_the_inference_port_did(tmp_path: Path) -> None:
    async def main() -> tuple[str, str]:
        store = tmp_path / "model_store"
        write_fake_archive(store, "m", "1.0")
        config = parse_config(
            {"model_store": str(store), "load_models": "all",
             "disable_token_authorization": "true", "torchgate.snapshot_file": ""},
            base_dir=tmp_path,
        )  # fmt: skip
        tg = build(config, work_dir=tmp_path / "work", backend_loader=load_fake_backend)
        await tg.start()
        inference = httpx.ASGITransport(app=tg.inference_app)
        metrics = httpx.ASGITransport(app=tg.metrics_app)
        async with httpx.AsyncClient(transport=inference, base_url="http://i") as client:
            for _ in range(4):
                assert (await client.post("/predictions/m", content=b"x")).status_code == 200
            assert (await client.post("/predictions/m/9.9", content=b"x")).status_code == 404
        async with httpx.AsyncClient(transport=metrics, base_url="http://m") as client:
            response = await client.get("/metrics")
            # TorchServe serves the metrics under any path below /metrics, for any method.
            below = await client.post("/metrics/anything/here")
            assert below.status_code == 200 and "ts_inference_requests_total" in below.text
        await tg.stop()
        return response.headers["content-type"], response.text

    content_type, text = asyncio.run(main())
    assert content_type.startswith("text/plain; version=0.0.4")
    samples, types = parse(text)
    assert value(samples, "torchgate_requests_total", model="m", status="200") == 4
    assert value(samples, "torchgate_request_latency_seconds_count", model="m") == 4
    assert value(samples, "ts_inference_requests_total", model_name="m") == 4
    assert value(samples, "torchgate_model_ready", model="m", version="1.0") == 1
    # Process metrics come with it; GPU metrics are absent, not zero, on a machine without one.
    assert "process_resident_memory_bytes" in types and "process_cpu_seconds_total" in types
    assert not any("gpu" in name.lower() for name in types)


def test_default_buckets_start_below_a_tenth_of_a_millisecond() -> None:
    assert LATENCY_BUCKETS[0] <= 0.0001
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)


def test_name_filter_keeps_exactly_the_named_samples() -> None:
    text = (
        b'# HELP a_total A.\n# TYPE a_total counter\na_total{x="1"} 1.0\na_total{x="2"} 2.0\n'
        b'# HELP h H.\n# TYPE h histogram\nh_bucket{le="1"} 1.0\nh_count 1.0\nh_sum 0.5\n'
        b"# HELP g G.\n# TYPE g gauge\ng 3.0\n"
    )
    assert filter_samples(text, []) == text
    assert filter_samples(text, ["a_total", "h_count"]) == (
        b'# HELP a_total A.\n# TYPE a_total counter\na_total{x="1"} 1.0\na_total{x="2"} 2.0\n'
        b"# HELP h H.\n# TYPE h histogram\nh_count 1.0\n"
    )
    assert filter_samples(text, ["h"]) == b""  # a histogram's samples are h_bucket, h_count...


def test_a_failed_kserve_v1_request_is_still_counted_once() -> None:
    """The first instance carries the client's request in the ts_* counters; when another
    instance fails while it still waits (503: another client took the queue's last place
    after the request saw room for all its instances), it is withdrawn, and the client's
    request is counted once all the same, with that failure."""

    async def scenario() -> list[Any]:
        observer = PrometheusObserver(process_metrics=False, hostname="h")
        registry = Registry(observer)
        dataplane = DataPlane(registry, observer=observer)
        slow = factory(EchoBackend("1.0", delay=0.2))
        await registry.register("m", "1.0", "m.mar", slow, ModelSettings(job_queue_size=2))
        requests = [InferenceRequest({"body": i}, {}, "rid", API_V1_REST) for i in range(2)]
        requests[1].counted = False  # as api.rest.kserve_v1 marks all but the first
        split = asyncio.ensure_future(dataplane.infer_many("m", None, requests))
        # Queued once the split request has seen room for both instances, before they are.
        other = InferenceRequest({"body": 9}, {}, "rid", API_V1_REST)
        cutting_in = asyncio.ensure_future(dataplane.infer("m", "1.0", other))
        with pytest.raises(Overloaded):
            await split
        await cutting_in
        await registry.close()
        return scrape(observer)[0]

    samples = asyncio.run(scenario())
    assert value(samples, "ts_inference_requests_total", model_version="default") == 1


def test_a_request_refused_for_a_version_not_ready_is_counted() -> None:
    """503 for a version with no live worker (or whose TorchServe is down) is a refusal
    before inference, counted as the others are."""

    async def scenario() -> list[Any]:
        observer = PrometheusObserver(process_metrics=False, hostname="h")
        registry = Registry(observer)
        dataplane = DataPlane(registry, observer=observer)
        idle = ModelSettings(min_workers=0, max_workers=0)
        await registry.register("m", "1.0", "m.mar", factory(EchoBackend("1.0")), idle)
        with pytest.raises(ModelNotReady):
            await dataplane.infer("m", None, InferenceRequest({"body": b"x"}))
        await registry.close()
        return scrape(observer)[0]

    samples = asyncio.run(scenario())
    assert value(samples, "torchgate_rejected_total", model="m", reason="not_ready") == 1


def test_a_failing_collector_or_text_loses_only_its_own_families(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A collector that raises, or writes what UTF-8 cannot encode, made every scrape fail."""

    class Broken:
        def collect(self) -> Iterator[Metric]:
            raise RuntimeError("broken collector")

    class Unencodable:
        def collect(self) -> Iterator[Metric]:
            family = GaugeMetricFamily("odd", "Odd", labels=["x"])
            family.add_metric(["\udcff"], 1.0)
            yield family

    def broken_text() -> str:
        raise RuntimeError("broken text")

    observer = PrometheusObserver(process_metrics=False, hostname="h")
    observer.add_collector(Broken())
    observer.add_collector(Unencodable())
    observer.add_text(broken_text)
    observer.request_finished(request(), "m", "1.0", 200, 0.001, answered(0.0))
    for _ in range(2):
        samples, types = scrape(observer)
        assert value(samples, "torchgate_requests_total", model="m") == 1
        assert value(samples, "ts_inference_requests_total", model_name="m") == 1
        assert "odd" not in types
    assert caplog.text.count("its families are left out") == 3  # once each


def test_the_metrics_route_renders_off_the_event_loop() -> None:
    """Rendering a page of many series took over a second: on the loop, it stalled every
    request meanwhile."""
    rendered_on_loop: list[bool] = []

    def render() -> bytes:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            rendered_on_loop.append(False)
        else:
            rendered_on_loop.append(True)
        return b"# HELP g G.\n# TYPE g gauge\ng 1.0\n# HELP h H.\n# TYPE h gauge\nh 2.0\n"

    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=build_metrics_app(render))
        async with httpx.AsyncClient(transport=transport, base_url="http://m") as client:
            return await client.get("/metrics", params={"name[]": "h"})

    response = asyncio.run(main())
    assert response.status_code == 200
    assert response.text == "# HELP h H.\n# TYPE h gauge\nh 2.0\n"
    assert rendered_on_loop == [False]


def test_a_version_unregistered_while_a_scrape_reads_the_registry_is_left_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Scrapes run in a thread while the loop unregisters: a model listed by `names()` may be
    gone when its versions are read."""

    async def main() -> list[Any]:
        observer = PrometheusObserver(process_metrics=False, hostname="h")
        registry = Registry(observer)
        observer.track(registry)
        await registry.register("m", "1.0", "m.mar", factory(EchoBackend("1.0")), ModelSettings())
        monkeypatch.setattr(registry, "names", lambda: ["gone", "m"])  # "gone": unregistered
        samples = scrape(observer)[0]
        monkeypatch.undo()
        await registry.close()
        return samples

    samples = asyncio.run(main())
    assert value(samples, "torchgate_model_ready", model="m") == 1
    assert not [s for s in samples if s.labels.get("model") == "gone"]


def test_the_series_of_unregistered_versions_go_once_newer_ones_have_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server deploying a version an hour kept each one's series for ever; now the last
    `RETIRED_VERSIONS_KEPT` unregistered versions' stay (here 2), and one registered again
    keeps its own."""
    monkeypatch.setattr("api.observability.metrics.RETIRED_VERSIONS_KEPT", 2)

    async def main() -> list[Any]:
        observer = PrometheusObserver(process_metrics=False, hostname="h")
        registry = Registry(observer)
        observer.track(registry)

        async def serve(version: str) -> None:
            backend = factory(EchoBackend(version))
            await registry.register("m", version, "m.mar", backend, ModelSettings())
            named = request()
            named.version_named = version
            observer.request_finished(named, "m", version, 200, 0.001, answered(0.0))
            observer.batch_finished("m", version, 1, 0.001)
            observer.request_rejected("m", version, REJECT_QUEUE_FULL)

        for version in ("1.0", "2.0", "3.0", "4.0"):
            await serve(version)
        await registry.unregister("m", "2.0")
        await registry.unregister("m", "3.0")
        kept = {s.labels.get("version") for s in scrape(observer)[0]}
        assert {"2.0", "3.0"} <= kept  # the last two gone are still exported
        await serve("3.0")  # registered again: its series go on
        await registry.unregister("m", "4.0")  # three gone: 2.0's series go
        for version in ("5.0", "6.0"):
            await serve(version)
            await registry.unregister("m", version)
        samples = scrape(observer)[0]
        await registry.close()
        return samples

    samples = asyncio.run(main())
    versions = {s.labels.get("version") for s in samples if s.name.startswith("torchgate_")}
    named = {s.labels.get("model_version") for s in samples if s.name.startswith("ts_")}
    assert "2.0" not in versions and "2.0" not in named
    assert "4.0" not in versions and "4.0" not in named  # pushed out by 5.0 and 6.0
    assert {"1.0", "3.0", "5.0", "6.0"} <= versions
    assert {"1.0", "3.0", "5.0", "6.0"} <= named
