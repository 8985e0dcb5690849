"""`make bench`: the model in-process, then TorchServe, then torchgate, on one machine.

    python -m benchmarks --out docs/benchmarks.md                 # everything, ~5 minutes
    python -m benchmarks --servers torchgate --models digits -d 3s  # a quick look

Prints the side-by-side table and, with --out, writes the markdown report. Exits 0 when the
suite ran, whether or not the targets were met (the report says which were); 1 when a tool it
needs is missing (torchserve, java, wrk), a server could not be started or did not answer a
smoke request, or a point got no successful answer at all (the report is still written: its
targets say "NO (no 2xx)"). SIGTERM and SIGHUP stop it as Ctrl-C does, servers stopped and
their temporary directories removed (`benchmarks.preflight`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from api.config import load_config
from benchmarks import machine, overload, preflight, raw, report, servers
from benchmarks.load import (
    Engine,
    LoadSpec,
    PointResult,
    parse_concurrency,
    parse_duration,
    parse_measured_duration,
    pick_engine,
    run_points,
)


@dataclass(frozen=True, slots=True)
class Workload:
    """One kind of request: same bytes to both servers."""

    model: str
    body: bytes
    content_type: str

    @property
    def path(self) -> str:
        return f"/predictions/{self.model}"


def digits_body() -> bytes:
    """A JSON array of 64 floats 0..16, like one sklearn digit."""
    return json.dumps([round(float(v), 2) for v in raw.sample_pixels(1)[0]]).encode()


WORKLOADS = {
    "digits": Workload("digits", digits_body(), "application/json"),
    "minilm": Workload(
        "minilm", b"torchgate serves TorchServe model archives without Java.", "text/plain"
    ),
}

MINILM_MAX_C = 32

ServerFactory = Callable[[Path, Path], AbstractContextManager[servers.Server]]
SERVER_FACTORIES: dict[str, tuple[str, ServerFactory]] = {
    "torchserve": (report.TORCHSERVE, servers.torchserve),
    "torchgate": (report.TORCHGATE, servers.torchgate),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    parser.add_argument("--json-out", type=Path, help="write every measured point as JSON here")
    parser.add_argument("--config", type=Path, default=Path("config.properties"))
    parser.add_argument("--model-store", type=Path, default=Path("model_store"))
    parser.add_argument(
        "--concurrency",
        "-c",
        type=parse_concurrency,
        default=[1, 8, 32, 200],
        help="connections per point (minilm stops at 32: at 200 it only measures the queue)",
    )
    parser.add_argument(
        "--duration", "-d", type=parse_measured_duration, default=10.0, help="measured, per point"
    )
    parser.add_argument("--warmup", type=parse_duration, default=2.0)
    parser.add_argument("--threads", "-t", type=int, default=1, help="wrk threads")
    parser.add_argument("--engine", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument(
        "--models", type=_names(WORKLOADS), default=list(WORKLOADS), help="digits,minilm"
    )
    parser.add_argument(
        "--servers",
        type=_names(SERVER_FACTORIES),
        default=list(SERVER_FACTORIES),
        help="torchserve,torchgate (run in this order)",
    )
    parser.add_argument(
        "--torchserve-threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS for TorchServe's workers, as torchgate's workers use (default: 1;"
        " 0: torch's default, a thread per core in each worker)",
    )
    parser.add_argument("--skip-raw", action="store_true", help="skip the in-process model")
    return parser


def _names(known: Mapping[str, object]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(known)}: {text!r}")
        return names

    return parse


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _smoke(server: servers.Server, workload: Workload) -> None:
    """One request must answer 200 before load is worth measuring."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        server.inference_url + workload.path,
        data=workload.body,
        headers={"Content-Type": workload.content_type},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        raise RuntimeError(
            f"{server.name} answered {exc.code} to {workload.path}: {exc.read()[:500]!r}"
        ) from exc


def run_server(
    label: str,
    factory: ServerFactory,
    options: argparse.Namespace,
    workloads: list[Workload],
    engine: tuple[str, Engine],
) -> report.ServerRun:
    """Start one server, load it with every workload at every concurrency, stop it."""
    engine_name, run_engine = engine
    started = time.monotonic()
    _say(f"starting {label} ...")
    with factory(options.model_store, options.config) as server:
        run = report.ServerRun(label, time.monotonic() - started, server.memory())
        _say(f"{label} ready in {run.startup_s:.1f} s")
        for workload in workloads:
            _smoke(server, workload)
            spec = LoadSpec(
                url=server.inference_url + workload.path,
                method="POST",
                body=workload.body,
                headers=(("Content-Type", workload.content_type),),
                threads=options.threads,
            )

            def progress(point: PointResult, model: str = workload.model) -> None:
                _say(
                    f"  {label} {model} c={point.concurrency}: {point.rps:,.0f} req/s, "
                    f"p50 {point.p50_ms:.2f} ms, p99 {point.p99_ms:.2f} ms, "
                    f"errors {point.error_count} [{engine_name}]"
                )

            levels = [
                c for c in options.concurrency if workload.model == "digits" or c <= MINILM_MAX_C
            ]
            run.points[workload.model] = run_points(
                spec, levels, options.duration, options.warmup, run_engine, progress
            )
            if workload.model == report.TARGET_WORKLOAD and report.OVERLOAD_C in levels:
                run.overload = overload.probe_refusals(spec, report.OVERLOAD_C)
                _say(f"  {label} {workload.model} refusals: {overload.describe(run.overload)}")
        ping = LoadSpec(url=server.inference_url + "/ping", threads=options.threads)
        [run.ping] = run_points(ping, [1], options.duration, options.warmup, run_engine)
        _say(f"  {label} GET /ping c=1: p50 {run.ping.p50_ms:.3f} ms")
        run.memory_loaded = server.memory()
    return run


def _settings(options: argparse.Namespace, engine_name: str) -> dict[str, str]:
    config = load_config(options.config)
    digits = next((m for m in config.models if m.name == "digits" and m.default), None)
    batching = (
        f"batchSize {digits.settings.batch_size}, maxBatchDelay "
        f"{digits.settings.max_batch_delay_ms:g} ms, {digits.settings.max_workers} worker(s) "
        "per version"
        if digits
        else "not in models={...}"
    )
    return {
        "archives": ", ".join(sorted(p.name for p in options.model_store.glob("*.mar"))),
        "digits_batching": batching,
        "digits_max_batch_delay": (
            f"{digits.settings.max_batch_delay_ms:g} ms" if digits else "as configured"
        ),
        "torchgate_threads": servers.torchgate_threads(config.intra_op_threads),
        "torchserve_threads": servers.torchserve_threads(options.torchserve_threads or None),
        "engine": engine_name,
        "threads": str(options.threads),
        "warmup": f"{options.warmup:g} s",
        "duration": f"{options.duration:g} s",
        "digits_body": f"{WORKLOADS['digits'].content_type}, {len(WORKLOADS['digits'].body)} "
        "bytes (64 floats)",
        "minilm_body": f"{WORKLOADS['minilm'].content_type}, {WORKLOADS['minilm'].body.decode()!r}",
    }


def run_raw(options: argparse.Namespace) -> list[raw.RawResult]:
    config = load_config(options.config)
    results: list[raw.RawResult] = []
    for entry in config.models:
        if entry.name != "digits":
            continue
        batches = sorted({1, entry.settings.batch_size})
        _say(f"timing {entry.mar_name} in-process at batch {batches} ...")
        results += raw.bench_archive(options.model_store / entry.mar_name, batches)
    minilm = next((m for m in config.models if m.name == "minilm" and m.default), None)
    if minilm is not None and "minilm" in options.models:
        _say(f"timing {minilm.mar_name} in-process at batch {minilm.settings.batch_size} ...")
        results += raw.bench_minilm(
            options.model_store / minilm.mar_name, minilm.settings.batch_size, options.duration
        )
    return results


def _write_json(path: Path, result: report.SuiteResult) -> None:
    document = {
        "machine": asdict(result.machine),
        "settings": result.settings,
        "runs": {
            name: {
                "startup_s": run.startup_s,
                "rss_idle": run.memory_idle.rss,
                "rss_loaded": run.memory_loaded.rss if run.memory_loaded else None,
                "pss_loaded": run.memory_loaded.pss if run.memory_loaded else None,
                "points": {w: [p.to_json() for p in pts] for w, pts in run.points.items()},
                "ping": run.ping.to_json() if run.ping else None,
                "overload": run.overload.to_json() if run.overload else None,
            }
            for name, run in result.runs.items()
        },
        "raw": [asdict(r) for r in result.raw],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def _stages(options: argparse.Namespace) -> Iterator[tuple[str, ServerFactory]]:
    for name in options.servers:
        label, factory = SERVER_FACTORIES[name]
        if name == "torchserve":
            factory = partial(servers.torchserve, omp_threads=options.torchserve_threads or None)
        yield label, factory


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    missing = preflight.missing_tools(
        torchserve="torchserve" in options.servers, wrk=options.engine == "wrk"
    )
    if missing:
        _say("benchmark cannot start: " + "; ".join(missing))
        return 1
    with preflight.exit_on_termination():
        return _run(options)


def _run(options: argparse.Namespace) -> int:
    began = time.monotonic()
    engine = pick_engine(options.engine)  # once: `auto` without wrk warns here
    result = report.SuiteResult(machine.describe(), _settings(options, engine[0]))
    if result.machine.load_average > result.machine.cores / 2:
        _say(
            f"warning: load average {result.machine.load_average:.1f} on "
            f"{result.machine.cores} cores: other work will make every number pessimistic"
        )
    if not options.skip_raw:
        result.raw = run_raw(options)
    workloads = [WORKLOADS[name] for name in options.models]
    try:
        for label, factory in _stages(options):
            result.runs[label] = run_server(label, factory, options, workloads, engine)
    except (RuntimeError, TimeoutError, OSError) as exc:  # BenchError is a RuntimeError
        _say(f"benchmark aborted: {exc}")
        return 1
    result.settings["load_end"] = f"{os.getloadavg()[0]:.1f}"
    print(report.console(result))
    if options.out is not None:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(report.markdown(result))
        _say(f"wrote {options.out}")
    if options.json_out is not None:
        _write_json(options.json_out, result)
    _say(f"suite took {time.monotonic() - began:.0f} s")
    if failed := report.points_without_2xx(result):
        _say("no successful answer at: " + ", ".join(failed))
        return 1
    return 0
