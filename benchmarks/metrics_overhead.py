"""What metrics (and the access log) cost on the hot path: `python -m benchmarks.metrics_overhead`.

The same fake, instant backend behind `POST /predictions/echo` (batchSize 8, maxBatchDelay 5 ms,
a 64-float JSON body), built three times in one process with different observers:

    none        NullObserver: records nothing (the baseline)
    metrics     PrometheusObserver as `torchgate serve` builds it (registry gauges, GPU and
                handler collectors)
    metrics+log the same plus the JSON access log, written to /dev/null (one os.write per line)

Two ways to drive them, each in interleaved rounds (every round runs every variant, in a rotated
order) so drift in machine speed hits all variants alike. Each run records the throughput and
the CPU time the serving thread (the event loop) spent per request; the overhead is reported
from the medians of both. Throughput is what users see, but on a shared machine other processes
move it by tens of percent from run to run; the loop's CPU time per request is what bounds a
dedicated core's throughput (the loop is the bottleneck) and barely moves with the neighbours:

    asgi   calls the ASGI app directly, no sockets: the least work per request, so the largest
           share for metrics; an upper bound on what a real server sees
    http   real uvicorn servers (httptools, uvloop) in a thread of this process, loaded by wrk

In asgi mode the variants also run once more wrapped in a timing proxy, which adds up the time
spent inside observer calls per request (`observer_ns_per_request`, net of timing an empty
call): the cost itself, which other processes barely disturb, and its share of the baseline's
CPU time per request.

Scrapes are measured apart: a scrape renders every series (a few ms for a few hundred), once
per scrape interval, not per request; timing one per run would charge a 0.2 s run with a 5 s
interval's share. `scrape_ms` is one render() of the `metrics` variant after its traffic.

Nothing here asserts: the numbers go to stdout (and `--json`), for docs/observability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import uvicorn

from api.core.dataplane import DataPlane
from api.core.registry import Registry
from api.core.types import (
    Backend,
    InferenceRequest,
    ModelSettings,
    NullObserver,
    Observer,
    Observers,
    Prediction,
)
from api.observability.access_log import AccessLog
from api.observability.gpu import GpuCollector
from api.observability.handler_metrics import HandlerMetrics
from api.observability.metrics import PrometheusObserver
from api.rest.apps import build_inference_app
from api.rest.asgi import ASGIApp, Message
from tests.support.torchserve import free_ports

BODY = json.dumps([0.5] * 64).encode()
SETTINGS = ModelSettings(batch_size=8, max_batch_delay_ms=5.0, job_queue_size=1000)
VARIANTS = ("none", "metrics", "metrics+log")


class InstantWorker:
    device = "cpu"

    async def predict(self, batch: Sequence[InferenceRequest]) -> list[Prediction]:
        return [
            Prediction(b'{"ok":true}', headers={"content-type": "application/json"}) for _ in batch
        ]

    async def close(self) -> None:
        pass


class InstantBackend:
    batches = True
    signature: Mapping[str, Any] | None = None
    manifest: Mapping[str, Any] = {}

    async def start_worker(self, index: int) -> InstantWorker:
        return InstantWorker()

    async def close(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Run:
    requests: int
    wall_s: float
    cpu_s: float  # CPU time of the thread running the event loop

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s

    @property
    def cpu_us(self) -> float:
        return 1e6 * self.cpu_s / self.requests


@dataclass(eq=False)
class Variant:
    name: str
    app: ASGIApp
    scrape: Callable[[], object]
    timer: TimedObserver | None = None


def _no_scrape() -> None:
    pass


async def build_variant(name: str, *, timed: bool = False) -> Variant:
    observer: Observer = NullObserver()
    scrape: Callable[[], object] = _no_scrape
    metrics: PrometheusObserver | None = None
    if name != "none":
        metrics = PrometheusObserver()
        handler_metrics = HandlerMetrics(hostname=metrics.hostname)
        metrics.add_collector(handler_metrics)
        metrics.add_text(handler_metrics.counters_text)
        metrics.add_collector(GpuCollector(hostname=metrics.hostname))
        observer, scrape = metrics, metrics.render
        if name == "metrics+log":
            devnull = os.open(os.devnull, os.O_WRONLY)
            observer = Observers(metrics, AccessLog(lambda line: os.write(devnull, line)))
    timer = None
    if timed:
        observer = timer = TimedObserver(observer)
    registry = Registry(observer)
    if metrics is not None:
        metrics.track(registry)

    async def backend() -> Backend:
        return InstantBackend()

    await registry.register("echo", "1.0", "echo.mar", backend, SETTINGS)
    dataplane = DataPlane(registry, observer=observer)
    app = build_inference_app(
        dataplane, max_request_size=1 << 20, max_response_size=1 << 20, auth=None, max_items=1024
    )
    return Variant(name, app, scrape, timer)


class TimedObserver:
    """Wraps an observer and adds up the time spent in its calls (perf_counter_ns)."""

    def __init__(self, inner: Observer) -> None:
        self.inner = inner
        self.ns = 0
        self.requests = 0

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
        started = time.perf_counter_ns()
        self.inner.request_finished(request, model, version, status, latency_s, prediction, shadow)
        self.ns += time.perf_counter_ns() - started
        self.requests += 1

    def request_rejected(self, model: str, version: str, reason: str) -> None:
        started = time.perf_counter_ns()
        self.inner.request_rejected(model, version, reason)
        self.ns += time.perf_counter_ns() - started

    def batch_finished(self, model: str, version: str, size: int, inference_s: float) -> None:
        started = time.perf_counter_ns()
        self.inner.batch_finished(model, version, size, inference_s)
        self.ns += time.perf_counter_ns() - started

    def queue_changed(self, model: str, version: str, depth: int) -> None:
        started = time.perf_counter_ns()
        self.inner.queue_changed(model, version, depth)
        self.ns += time.perf_counter_ns() - started


async def attribute(rounds: int, requests: int, concurrency: int) -> dict[str, float]:
    """Nanoseconds per request spent inside observer calls, net of the timing itself.

    The NullObserver's figure is what timing an empty call costs; it is subtracted. Noise from
    other processes only touches the few hundred nanoseconds measured, not whole requests.
    """
    variants = [await build_variant(name, timed=True) for name in VARIANTS]
    per_request: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for index in range(rounds):
        for variant in variants[index % 3 :] + variants[: index % 3]:
            timer = variant.timer
            assert timer is not None
            timer.ns = timer.requests = 0
            await asgi_run(variant, requests, concurrency)
            per_request[variant.name].append(timer.ns / timer.requests)
    medians = {name: statistics.median(values) for name, values in per_request.items()}
    return {name: medians[name] - medians["none"] for name in VARIANTS if name != "none"}


# -- asgi: no sockets -----------------------------------------------------------------------------


SCOPE: dict[str, Any] = {
    "type": "http",
    "method": "POST",
    "path": "/predictions/echo",
    "query_string": b"",
    "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(BODY)).encode()),
    ],
}


async def call(app: ASGIApp) -> int:
    status = 0
    sent = False
    never = asyncio.Event()

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await never.wait()  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(dict(SCOPE), receive, send)
    return status


async def asgi_run(variant: Variant, requests: int, concurrency: int) -> Run:
    """`requests` calls from `concurrency` concurrent clients, all on this thread's loop."""
    left = requests
    failures = 0

    async def client() -> None:
        nonlocal left, failures
        while left > 0:
            left -= 1
            if await call(variant.app) != 200:
                failures += 1

    started, cpu_started = time.perf_counter(), time.thread_time()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    run = Run(requests, time.perf_counter() - started, time.thread_time() - cpu_started)
    if failures:
        raise RuntimeError(f"{variant.name}: {failures} requests failed")
    return run


async def asgi_mode(
    rounds: int, requests: int, concurrency: int, scrapes: dict[str, float]
) -> dict[str, list[Run]]:
    variants = [await build_variant(name) for name in VARIANTS]
    for variant in variants:  # warm up: imports, caches, first series
        await asgi_run(variant, requests // 10, concurrency)
    results: dict[str, list[Run]] = {v.name: [] for v in variants}
    for index in range(rounds):
        for variant in variants[index % 3 :] + variants[: index % 3]:
            results[variant.name].append(await asgi_run(variant, requests, concurrency))
    scrapes["metrics"] = scrape_ms(variants[1])
    return results


def scrape_ms(variant: Variant, repeats: int = 50) -> float:
    """Median time of one render() (the /metrics body), in milliseconds."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        variant.scrape()
        times.append(time.perf_counter() - started)
    return 1000.0 * statistics.median(times)


# -- http: uvicorn + wrk --------------------------------------------------------------------------


def http_mode(
    rounds: int,
    duration_s: float,
    concurrency: int,
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> dict[str, list[Run]]:
    from benchmarks.load import LoadSpec, run_wrk

    loop = new_loop()
    ready = threading.Event()
    servers: list[uvicorn.Server] = []
    ports: dict[str, int] = {}

    async def start_servers() -> None:
        tasks = []
        for name in VARIANTS:
            variant = await build_variant(name)
            [ports[name]] = free_ports(1)
            config = uvicorn.Config(
                variant.app,
                host="127.0.0.1",
                port=ports[name],
                http="httptools",
                loop="none",
                lifespan="off",
                access_log=False,
                log_level="warning",
                backlog=4096,
            )
            server = uvicorn.Server(config)
            servers.append(server)
            tasks.append(asyncio.create_task(server.serve()))
        while not all(server.started for server in servers):
            await asyncio.sleep(0.01)
        ready.set()
        await asyncio.gather(*tasks)

    def run_loop() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start_servers())

    thread = threading.Thread(target=run_loop, name="servers", daemon=True)
    thread.start()
    if not ready.wait(30):
        raise RuntimeError("servers did not start")
    assert thread.ident is not None
    loop_cpu = time.pthread_getcpuclockid(thread.ident)

    def load(name: str, seconds: float) -> Run:
        spec = LoadSpec(
            url=f"http://127.0.0.1:{ports[name]}/predictions/echo",
            method="POST",
            body=BODY,
            headers=(("Content-Type", "application/json"),),
        )
        cpu_started = time.clock_gettime(loop_cpu)
        result = run_wrk(spec, concurrency, seconds)
        if result.error_count:
            raise RuntimeError(f"{name}: wrk saw errors {result.errors}")
        return Run(result.requests, result.duration_s, time.clock_gettime(loop_cpu) - cpu_started)

    results: dict[str, list[Run]] = {name: [] for name in VARIANTS}
    try:
        for name in VARIANTS:
            load(name, 1)  # warm up
        for index in range(rounds):
            for name in VARIANTS[index % 3 :] + VARIANTS[: index % 3]:
                results[name].append(load(name, duration_s))
    finally:
        for server in servers:
            server.should_exit = True
        thread.join(30)
    return results


# -- report ---------------------------------------------------------------------------------------


def summarize(mode: str, results: dict[str, list[Run]]) -> dict[str, Any]:
    rps = {name: statistics.median(r.rps for r in runs) for name, runs in results.items()}
    cpu = {name: statistics.median(r.cpu_us for r in runs) for name, runs in results.items()}
    return {
        "mode": mode,
        "rounds": len(results["none"]),
        "median_rps": {name: round(value, 1) for name, value in rps.items()},
        "rps_overhead_pct": {
            name: round(100.0 * (1.0 - value / rps["none"]), 2)
            for name, value in rps.items()
            if name != "none"
        },
        "median_loop_cpu_us_per_request": {name: round(value, 2) for name, value in cpu.items()},
        "cpu_overhead_pct": {
            name: round(100.0 * (value / cpu["none"] - 1.0), 2)
            for name, value in cpu.items()
            if name != "none"
        },
        # Each round's variants ran back to back: their ratios cancel most of the drift.
        "paired_cpu_overhead_pct": {
            name: round(100.0 * (_paired(runs, results["none"], "cpu_us") - 1.0), 2)
            for name, runs in results.items()
            if name != "none"
        },
        "paired_rps_overhead_pct": {
            name: round(100.0 * (1.0 - _paired(runs, results["none"], "rps")), 2)
            for name, runs in results.items()
            if name != "none"
        },
        # The spread of those paired ratios (25th and 75th percentiles), in percent.
        "paired_cpu_overhead_iqr_pct": {
            name: [round(100.0 * (q - 1.0), 2) for q in _quartiles(runs, results["none"])]
            for name, runs in results.items()
            if name != "none"
        },
        "rps": {name: [round(r.rps, 1) for r in runs] for name, runs in results.items()},
        "cpu_us": {name: [round(r.cpu_us, 2) for r in runs] for name, runs in results.items()},
    }


def _paired(runs: list[Run], baseline: list[Run], field: str) -> float:
    """The median over rounds of this variant's `field` divided by the baseline's."""
    return statistics.median(
        getattr(run, field) / getattr(base, field) for run, base in zip(runs, baseline, strict=True)
    )


def _quartiles(runs: list[Run], baseline: list[Run]) -> tuple[float, float]:
    ratios = [run.cpu_us / base.cpu_us for run, base in zip(runs, baseline, strict=True)]
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return q1, q3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--mode", choices=["asgi", "http", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=20000, help="per asgi run")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per http run")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--json", help="also write the summaries to this file")
    options = parser.parse_args(argv)
    try:
        import uvloop

        new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        new_loop = asyncio.new_event_loop
    summaries = []
    if options.mode in ("asgi", "both"):
        scrapes: dict[str, float] = {}
        with asyncio.Runner(loop_factory=new_loop) as runner:
            results = runner.run(
                asgi_mode(options.rounds, options.requests, options.concurrency, scrapes)
            )
        with asyncio.Runner(loop_factory=new_loop) as runner:
            inside = runner.run(attribute(options.rounds, options.requests, options.concurrency))
        summary = summarize("asgi", results)
        base_us = summary["median_loop_cpu_us_per_request"]["none"]
        summary["observer_ns_per_request"] = {k: round(v) for k, v in inside.items()}
        summary["observer_share_of_baseline_pct"] = {
            name: round(100.0 * ns / 1000.0 / base_us, 2) for name, ns in inside.items()
        }
        summary["scrape_ms"] = round(scrapes["metrics"], 2)
        summaries.append(summary)
    if options.mode in ("http", "both"):
        results = http_mode(options.rounds, options.duration, options.concurrency, new_loop)
        summaries.append(summarize("http", results))
    for summary in summaries:
        print(json.dumps(summary))
    if options.json:
        with open(options.json, "w") as f:
            json.dump(summaries, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
