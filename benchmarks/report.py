"""The suite's results as tables: console text and docs/benchmarks.md, targets included."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from benchmarks.load import PointResult, format_errors, render_table
from benchmarks.machine import Machine
from benchmarks.raw import RawResult
from benchmarks.servers import Memory

TORCHSERVE, TORCHGATE = "TorchServe", "torchgate"
SERVERS = (TORCHSERVE, TORCHGATE)
TARGET_WORKLOAD = "digits"
MIB = 2**20


@dataclass
class ServerRun:
    """What one server did: per workload, one point per concurrency; memory; startup."""

    server: str
    startup_s: float
    memory_idle: Memory
    memory_loaded: Memory | None = None  # after all its load points
    points: dict[str, list[PointResult]] = field(default_factory=dict)
    # GET /ping at one connection: an HTTP round trip with no model and no worker, which
    # bounds what the client and loopback TCP take of the c=1 latency on this machine.
    ping: PointResult | None = None

    def point(self, workload: str, concurrency: int) -> PointResult | None:
        return next(
            (p for p in self.points.get(workload, []) if p.concurrency == concurrency), None
        )


@dataclass
class SuiteResult:
    machine: Machine
    settings: dict[str, str]  # how it was run, for the method section
    raw: list[RawResult] = field(default_factory=list)
    runs: dict[str, ServerRun] = field(default_factory=dict)

    def pair(
        self, workload: str, concurrency: int
    ) -> tuple[PointResult | None, PointResult | None]:
        """(TorchServe, torchgate) points of a workload at a concurrency, None if not run."""
        ts, tg = self.runs.get(TORCHSERVE), self.runs.get(TORCHGATE)
        return (
            ts.point(workload, concurrency) if ts else None,
            tg.point(workload, concurrency) if tg else None,
        )


@dataclass(frozen=True, slots=True)
class Target:
    goal: str
    measured: str
    met: bool | None  # None: not measured


def targets(result: SuiteResult) -> list[Target]:
    """The worker-process issue's targets, each with what was measured in this run."""
    found = []
    ts32, tg32 = result.pair(TARGET_WORKLOAD, 32)
    found.append(
        _ratio_target(
            "digits c=32: torchgate req/s >= 5x TorchServe's",
            tg32.rps if tg32 else None,
            ts32.rps if ts32 else None,
            5.0,
            "req/s",
        )
    )
    _, tg200 = result.pair(TARGET_WORKLOAD, 200)
    found.append(
        _ratio_target(
            "digits c=200: 2xx goodput >= 90% of torchgate's c=32 req/s",
            tg200.rps if tg200 else None,
            tg32.rps if tg32 else None,
            0.9,
            "req/s",
        )
    )
    _, tg1 = result.pair(TARGET_WORKLOAD, 1)
    found.append(
        Target(
            "digits c=1: torchgate p50 <= 0.3 ms",
            f"{tg1.p50_ms:.3f} ms" if tg1 else "not measured",
            tg1.p50_ms <= 0.3 if tg1 else None,
        )
    )
    _, minilm32 = result.pair("minilm", 32)
    raw_minilm = next(
        (r for r in result.raw if r.model.startswith("minilm") and r.sustained_s), None
    )
    found.append(
        _ratio_target(
            "minilm c=32: >= 90% of the handler's sustained batched throughput in-process",
            minilm32.rps if minilm32 else None,
            1e6 / raw_minilm.per_item_us if raw_minilm else None,
            0.9,
            "items/s",
        )
    )
    ts_run, tg_run = (result.runs.get(name) for name in SERVERS)
    ts_mem = ts_run.memory_loaded if ts_run else None
    tg_mem = tg_run.memory_loaded if tg_run else None
    found.append(
        _ratio_target(
            "PSS serving the example models <= 50% of TorchServe's",
            tg_mem.pss / MIB if tg_mem else None,
            ts_mem.pss / MIB if ts_mem else None,
            0.5,
            "MiB",
            at_most=True,
        )
    )
    found.append(
        _ratio_target(
            "start-up to all versions ready <= 50% of TorchServe's",
            tg_run.startup_s if tg_run else None,
            ts_run.startup_s if ts_run else None,
            0.5,
            "s",
            at_most=True,
        )
    )
    return found


def _ratio_target(
    goal: str,
    ours: float | None,
    theirs: float | None,
    bound: float,
    unit: str,
    *,
    at_most: bool = False,
) -> Target:
    if ours is None or not theirs:
        return Target(goal, "not measured", None)
    ratio = ours / theirs
    shown = f"{ratio:.0%}" if bound < 1 else f"{ratio:.2f}x"
    measured = f"{shown} ({ours:,.1f} vs {theirs:,.1f} {unit})"
    return Target(goal, measured, ratio <= bound if at_most else ratio >= bound)


# --- tables (rows of strings; rendered as text or markdown) --------------------------------------

SIDE_BY_SIDE = (
    "c",
    "TS req/s",
    "TS p50",
    "TS p95",
    "TS p99",
    "TS errors",
    "tg req/s",
    "tg p50",
    "tg p95",
    "tg p99",
    "tg errors",
    "tg/TS req/s",
)


def _point_cells(point: PointResult | None) -> list[str]:
    if point is None:
        return ["-"] * 5
    return [
        f"{point.rps:,.0f}",
        f"{point.p50_ms:.2f}",
        f"{point.p95_ms:.2f}",
        f"{point.p99_ms:.2f}",
        format_errors(point.errors),
    ]


def side_by_side_rows(result: SuiteResult, workload: str) -> list[list[str]]:
    """One row per concurrency: TorchServe's numbers, torchgate's, the req/s ratio."""
    levels = sorted(
        {p.concurrency for run in result.runs.values() for p in run.points.get(workload, [])}
    )
    rows = []
    for level in levels:
        ts, tg = result.pair(workload, level)
        ratio = f"{tg.rps / ts.rps:.2f}x" if ts and tg and ts.rps > 0 else "-"
        rows.append([str(level), *_point_cells(ts), *_point_cells(tg), ratio])
    return rows


MEMORY_COLUMNS = ("server", "RSS idle MiB", "RSS after load MiB", "PSS after load MiB", "processes")


def memory_rows(result: SuiteResult) -> list[list[str]]:
    rows = []
    for name in SERVERS:
        run = result.runs.get(name)
        if run is None:
            continue
        loaded = run.memory_loaded or run.memory_idle
        names: dict[str, int] = {}
        for process in loaded.processes:
            names[process.role] = names.get(process.role, 0) + 1
        rows.append(
            [
                name,
                f"{run.memory_idle.rss / MIB:,.0f}",
                f"{loaded.rss / MIB:,.0f}" if run.memory_loaded else "-",
                f"{loaded.pss / MIB:,.0f}" if run.memory_loaded else "-",
                ", ".join(f"{n} x{c}" if c > 1 else n for n, c in names.items()),
            ]
        )
    return rows


PROCESS_COLUMNS = ("server", "process", "pid", "RSS MiB", "PSS MiB")


def process_rows(result: SuiteResult) -> list[list[str]]:
    """Each process of each server after its load points: RSS counts shared pages (torch's
    libraries, the zygote's imports) in every process mapping them, PSS splits them."""
    rows = []
    for name in SERVERS:
        run = result.runs.get(name)
        if run is None:
            continue
        for process in (run.memory_loaded or run.memory_idle).processes:
            rows.append(
                [
                    name,
                    process.role,
                    str(process.pid),
                    f"{process.rss / MIB:,.0f}",
                    f"{process.pss / MIB:,.0f}",
                ]
            )
    return rows


RAW_COLUMNS = ("model", "runtime", "threads", "batch", "timing", "us/call", "us/item")


def raw_rows(raw: Sequence[RawResult]) -> list[list[str]]:
    return [
        [
            r.model,
            r.runtime,
            "default" if r.threads is None else str(r.threads),
            str(r.batch),
            "best of 5" if r.sustained_s is None else f"{r.sustained_s:g} s back to back",
            f"{r.per_call_us:.1f}",
            f"{r.per_item_us:.1f}",
        ]
        for r in raw
    ]


TARGET_COLUMNS = ("target", "measured", "met")


def target_rows(found: Sequence[Target]) -> list[list[str]]:
    verdict = {True: "yes", False: "NO", None: "not measured"}
    return [[t.goal, t.measured, verdict[t.met]] for t in found]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# --- documents ----------------------------------------------------------------------------------


def _floor(result: SuiteResult) -> list[str]:
    """How much of the c=1 latency the client and loopback TCP take on this machine."""
    pings = [(run.server, run.ping) for run in result.runs.values() if run.ping]
    if not pings:
        return []
    each = ", ".join(f"{name} {ping.p50_ms:.3f} ms" for name, ping in pings)
    return [
        f"`GET /ping` at one connection, p50: {each}. No model and no worker: the lower figure "
        "bounds what wrk and loopback TCP take of every c=1 request on this machine. "
        "(Both servers answer /ping in their frontend: torchgate's is plain ASGI, as its "
        "prediction paths.)",
        "",
    ]


def workloads(result: SuiteResult) -> list[str]:
    seen: list[str] = []
    for run in result.runs.values():
        seen += [name for name in run.points if name not in seen]
    return seen


def console(result: SuiteResult) -> str:
    """The side-by-side tables as plain text (TS = TorchServe, tg = torchgate; ms)."""
    parts = []
    for workload in workloads(result):
        parts += [f"POST /predictions/{workload} (latencies in ms)"]
        parts += [render_table(SIDE_BY_SIDE, side_by_side_rows(result, workload)), ""]
    if result.runs:
        parts += ["memory", render_table(MEMORY_COLUMNS, memory_rows(result)), ""]
    if result.raw:
        parts += ["the model in-process", render_table(RAW_COLUMNS, raw_rows(result.raw)), ""]
    parts += ["targets", render_table(TARGET_COLUMNS, target_rows(targets(result)))]
    return "\n".join(parts)


def markdown(result: SuiteResult) -> str:
    """docs/benchmarks.md."""
    m = result.machine
    s = result.settings
    versions = ", ".join(f"{name} {version}" for name, version in m.versions.items())
    out = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`python -m benchmarks`); do not edit by hand.",
        "",
        f"- **Machine**: {m.cpu_model}, {m.cores} cores (`nproc`), {m.memory_gib:.0f} GiB, "
        f"Linux {m.kernel}",
        f"- **Date**: {m.date}",
        f"- **Other load**: 1-minute load average {m.load_average:.1f} at the start, "
        f"{s.get('load_end', '?')} at the end (on a quiet machine it stays below ~1 between "
        "runs; higher means other work shared the cores and every number here is pessimistic)",
        f"- **Versions**: {versions}",
        "",
        "## Method",
        "",
        f"- Same archives (`{s.get('archives', '')}`) and the same `config.properties` for both "
        "servers; each gets a copy with the ports rewritten to free loopback ports and "
        "`disable_token_authorization=true`, everything else unchanged "
        f"(digits: {s.get('digits_batching', '')}).",
        f"- Threads: torchgate's CPU workers use 1 intra-op thread each; TorchServe runs with "
        f"{s.get('torchserve_threads', '?')}. (With torch's default, 2 threads in each of its "
        "3 workers on 2 cores, TorchServe's OpenMP pools oversubscribe the cores and its "
        "throughput drops several-fold; `--torchserve-threads 0` measures that.)",
        "- Logging: each server's default, one access-log line per request written to a file "
        "(TorchServe's `logs/access_log.log`; torchgate's JSON access log on stdout, sent to a "
        "file).",
        "- req/s counts successful (2xx) answers only; refused ones (503 when the queue is "
        "full) are in the errors column.",
        "- One server at a time: start it, wait until every model version is ready, run every "
        "point, measure memory, stop it; then the other.",
        f"- Load: {s.get('engine', 'wrk')}, closed loop, connections = concurrency, "
        f"{s.get('threads', '1')} load-generator thread(s), {s.get('warmup', '')} warm-up "
        f"(discarded) then {s.get('duration', '')} measured per point. Errors: connect/read/"
        "write/timeout, and HTTP status >= 400 (wrk's rule).",
        f"- Bodies: digits `{s.get('digits_body', '')}`; minilm `{s.get('minilm_body', '')}`.",
        f"- **The load generator and the server share the same {m.cores} cores**: at high "
        "concurrency wrk takes CPU the server would otherwise use, for both servers alike. "
        "Absolute numbers are lower than on a separate client machine; the ratios are the point.",
        "- Memory: resident set summed over the server's process tree after its load points "
        "(torchgate: one process; TorchServe: the Java frontend plus every Python worker, "
        "launcher excluded). PSS (shared pages split between processes) is shown beside it.",
        "",
        "## Targets",
        "",
        markdown_table(TARGET_COLUMNS, target_rows(targets(result))),
        "",
        *_floor(result),
    ]
    for workload in workloads(result):
        out += [
            f"## POST /predictions/{workload}",
            "",
            "TS = TorchServe, tg = torchgate; latencies in ms.",
            "",
            markdown_table(SIDE_BY_SIDE, side_by_side_rows(result, workload)),
            "",
        ]
    if result.runs:
        startup = ", ".join(f"{run.server} {run.startup_s:.1f} s" for run in result.runs.values())
        out += [
            "## Memory",
            "",
            markdown_table(MEMORY_COLUMNS, memory_rows(result)),
            "",
            "Per process, after the load points (RSS counts pages shared between processes in "
            "each of them; PSS splits them):",
            "",
            markdown_table(PROCESS_COLUMNS, process_rows(result)),
            "",
            f"Startup to ready (all model versions loaded): {startup}.",
            "",
        ]
    if result.raw:
        out += [
            "## The model itself, in-process",
            "",
            "`timeit`, best of 5, no server: the bare runtime on a ready tensor (threads: "
            "intra-op threads), and the archive's handler (`handle()`: decode the parsed JSON "
            "body, collate, run, top-5 answer) with one intra-op thread, as torchgate's CPU "
            "workers run it (TorchServe's workers use torch's default, one per core). The "
            "minilm handler also runs back to back for as long as a load point: a server keeps "
            "up that rate, not a burst's, and its target compares with it.",
            "",
            markdown_table(RAW_COLUMNS, raw_rows(result.raw)),
            "",
        ]
    return "\n".join(out)
