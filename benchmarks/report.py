"""The suite's results as tables: console text and docs/benchmarks.md, targets included."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from benchmarks import overload, raw
from benchmarks.load import PointResult, format_errors, render_table
from benchmarks.machine import Machine
from benchmarks.overload import RefusalProbe
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
    # How the excess was refused at the overload point (benchmarks.overload); None: not probed.
    overload: RefusalProbe | None = None

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
    met: bool | None  # None: not measured, wholly or in part
    verdict: str  # "yes", "NO", "NO (no 2xx)", "not measured", "goodput yes; refusals not ..."


def _target(goal: str, measured: str, met: bool | None, why: str = "") -> Target:
    word = {True: "yes", False: "NO", None: "not measured"}[met]
    return Target(goal, measured, met, f"{word} ({why})" if why else word)


OVERLOAD_C = 200  # the overload point: more connections than the queue holds
C1_P50_BOUND_MS = 0.3
GOAL_C32 = "digits c=32: torchgate req/s >= 5x TorchServe's"
GOAL_C200 = (
    f"digits c={OVERLOAD_C}: 2xx goodput >= 90% of torchgate's c=32 req/s; the excess refused "
    f"with 503 + Retry-After, 503 p99 <= {overload.REFUSAL_P99_BOUND_MS:g} ms"
)
GOAL_C1 = f"digits c=1: torchgate p50 <= {C1_P50_BOUND_MS:g} ms"
GOAL_MINILM = "minilm c=32: >= 90% of the handler's sustained batched throughput in-process"
GOAL_PSS = "PSS serving the example models <= 50% of TorchServe's"
GOAL_STARTUP = "start-up to all versions ready <= 50% of TorchServe's"


def point_problem(point: PointResult, *, allowed: Sequence[str] = ()) -> str:
    """Why `point` cannot count towards a target ("" when it can): "no 2xx" when nothing
    succeeded (or nothing ran: wrk's percentiles are then 0, which would pass a latency bound),
    "errors" when it had errors of a kind not `allowed`."""
    if point.successes <= 0 or point.rps <= 0:
        return "no 2xx"
    if any(count for kind, count in point.errors.items() if kind not in allowed):
        return "errors"
    return ""


@dataclass(frozen=True, slots=True)
class Measure:
    """One side of a ratio: a value, and why it cannot count ("" when it can)."""

    value: float
    problem: str = ""


def _rate(point: PointResult | None, *, allowed: Sequence[str] = ()) -> Measure | None:
    return Measure(point.rps, point_problem(point, allowed=allowed)) if point else None


def targets(result: SuiteResult) -> list[Target]:
    """The worker-process issue's targets, each with what was measured in this run. A target is
    met only on clean points: some 2xx, and no errors except where the goal expects them."""
    ts32, tg32 = result.pair(TARGET_WORKLOAD, 32)
    _, tg200 = result.pair(TARGET_WORKLOAD, OVERLOAD_C)
    _, tg1 = result.pair(TARGET_WORKLOAD, 1)
    _, minilm32 = result.pair("minilm", 32)
    raw_minilm = next(
        (r for r in result.raw if r.model.startswith("minilm") and r.sustained_s), None
    )
    in_process = (
        Measure(1e6 / raw_minilm.per_item_us if raw_minilm.per_item_us > 0 else 0.0)
        if raw_minilm
        else None
    )
    ts_run, tg_run = (result.runs.get(name) for name in SERVERS)
    ts_mem = ts_run.memory_loaded if ts_run else None
    tg_mem = tg_run.memory_loaded if tg_run else None
    return [
        _ratio_target(GOAL_C32, _rate(tg32), _rate(ts32), 5.0, "req/s", baseline=TORCHSERVE),
        _overload_target(tg200, tg32, tg_run.overload if tg_run else None),
        _latency_target(tg1),
        _ratio_target(
            GOAL_MINILM, _rate(minilm32), in_process, 0.9, "items/s", baseline="in-process"
        ),
        _ratio_target(
            GOAL_PSS,
            Measure(tg_mem.pss / MIB) if tg_mem else None,
            Measure(ts_mem.pss / MIB) if ts_mem else None,
            0.5,
            "MiB",
            at_most=True,
        ),
        _ratio_target(
            GOAL_STARTUP,
            Measure(tg_run.startup_s) if tg_run else None,
            Measure(ts_run.startup_s) if ts_run else None,
            0.5,
            "s",
            at_most=True,
        ),
    ]


def _latency_target(point: PointResult | None) -> Target:
    if point is None:
        return _target(GOAL_C1, "not measured", None)
    measured = f"{point.p50_ms:.3f} ms"
    if problem := point_problem(point):
        return _target(GOAL_C1, measured, False, problem)
    return _target(GOAL_C1, measured, point.p50_ms <= C1_P50_BOUND_MS)


def _overload_target(
    point: PointResult | None, c32: PointResult | None, probe: RefusalProbe | None
) -> Target:
    """Goodput from wrk's run of the point (503s expected, no other errors), refusals from the
    probe after it; each half can fail or be missing on its own."""
    measured, goodput, goodput_why = _ratio(
        _rate(point, allowed=("status",)), _rate(c32), 0.9, "req/s", baseline="c=32"
    )
    refused, refused_why = overload.judge(probe)
    if probe is not None:
        measured += "; refusals: " + overload.describe(probe)
    if goodput is False or refused is False:
        reasons = []
        if goodput is False:
            reasons.append(f"goodput: {goodput_why or 'under 90%'}")
        if refused is False:
            reasons.append(f"refusals: {refused_why}")
        return _target(GOAL_C200, measured, False, "; ".join(reasons))
    if goodput is None and refused is None:
        return _target(GOAL_C200, measured, None)
    if goodput is None or refused is None:
        halves = {"goodput": goodput, "refusals": refused}
        verdict = "; ".join(
            f"{half} {'yes' if met else 'not measured'}" for half, met in halves.items()
        )
        return Target(GOAL_C200, measured, None, verdict)
    return _target(GOAL_C200, measured, True)


def _ratio_target(
    goal: str,
    ours: Measure | None,
    theirs: Measure | None,
    bound: float,
    unit: str,
    *,
    at_most: bool = False,
    baseline: str = TORCHSERVE,
) -> Target:
    return _target(goal, *_ratio(ours, theirs, bound, unit, at_most=at_most, baseline=baseline))


def _ratio(
    ours: Measure | None,
    theirs: Measure | None,
    bound: float,
    unit: str,
    *,
    at_most: bool = False,
    baseline: str = TORCHSERVE,
) -> tuple[str, bool | None, str]:
    """(measured, met, why not) for ours / theirs against `bound` (at least, or `at_most`).
    A side that was measured but cannot count (no 2xx, errors, a measured 0) fails; a side not
    run leaves it not measured, unless ours already failed."""
    if ours is None or theirs is None:
        if ours is not None and ours.problem:
            return f"{ours.value:,.1f} {unit}", False, ours.problem
        return "not measured", None, ""
    measured = f"{ours.value:,.1f} vs {theirs.value:,.1f} {unit}"
    ratio = ours.value / theirs.value if ours.value > 0 and theirs.value > 0 else None
    if ratio is not None:
        measured = f"{ratio:.0%} ({measured})" if bound < 1 else f"{ratio:.2f}x ({measured})"
    problem = ours.problem or (f"{baseline}: {theirs.problem}" if theirs.problem else "")
    if problem or ratio is None:
        return measured, False, problem or "measured 0"
    return measured, ratio <= bound if at_most else ratio >= bound, ""


def points_without_2xx(result: SuiteResult) -> list[str]:
    """ "TorchServe digits c=200", ...: the points (pings included) no request succeeded at."""
    found = []
    for run in result.runs.values():
        for workload, points in run.points.items():
            found += [
                f"{run.server} {workload} c={p.concurrency}" for p in points if p.successes <= 0
            ]
        if run.ping is not None and run.ping.successes <= 0:
            found.append(f"{run.server} GET /ping c=1")
    return found


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


def raw_rows(results: Sequence[RawResult]) -> list[list[str]]:
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
        for r in results
    ]


TARGET_COLUMNS = ("target", "measured", "met")


def target_rows(found: Sequence[Target]) -> list[list[str]]:
    return [[t.goal, t.measured, t.verdict] for t in found]


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
        f"bounds what {_engine(result)} and loopback TCP take of every c=1 request on this "
        "machine. (Both servers answer /ping in their frontend: torchgate's is plain ASGI, as "
        "its prediction paths.)",
        "",
    ]


def workloads(result: SuiteResult) -> list[str]:
    seen: list[str] = []
    for run in result.runs.values():
        seen += [name for name in run.points if name not in seen]
    return seen


def probes(result: SuiteResult) -> list[tuple[str, RefusalProbe]]:
    return [(run.server, run.overload) for run in result.runs.values() if run.overload]


def _engine(result: SuiteResult) -> str:
    return result.settings.get("engine", "wrk")


LATENCIES = "latencies in ms, over all answers (errors included, not only 2xx)"


def console(result: SuiteResult) -> str:
    """The side-by-side tables as plain text (TS = TorchServe, tg = torchgate; ms)."""
    parts = [f"load: {_engine(result)}", ""]
    for workload in workloads(result):
        parts += [f"POST /predictions/{workload} ({LATENCIES})"]
        parts += [render_table(SIDE_BY_SIDE, side_by_side_rows(result, workload)), ""]
    if found := probes(result):
        parts += [f"refusals at c={OVERLOAD_C} (python engine, {overload.PROBE_S:g} s)"]
        parts += [render_table(overload.PROBE_COLUMNS, overload.probe_rows(found)), ""]
    if result.runs:
        parts += ["memory", render_table(MEMORY_COLUMNS, memory_rows(result)), ""]
    if result.raw:
        parts += ["the model in-process", render_table(RAW_COLUMNS, raw_rows(result.raw)), ""]
    parts += ["targets", render_table(TARGET_COLUMNS, target_rows(targets(result)))]
    return "\n".join(parts)


def _load_line(result: SuiteResult) -> str:
    s = result.settings
    engine = _engine(result)
    if engine == "wrk":
        shown, rule = "wrk", "HTTP status >= 400 (wrk's rule)"
    else:
        shown = (
            f"{engine} (benchmarks.load's asyncio client: it saturates about an order of "
            "magnitude earlier than wrk, so these numbers are not comparable to a run with wrk)"
        )
        rule = f"every HTTP status outside 2xx ({engine}'s rule)"
    return (
        f"- Load: {shown}, closed loop, connections = concurrency, {s.get('threads', '1')} "
        f"load-generator thread(s), {s.get('warmup', '')} warm-up (discarded) then "
        f"{s.get('duration', '')} measured per point. Errors: connect/read/write/timeout, and "
        f"{rule}."
    )


def _threads_line(result: SuiteResult) -> str:
    """Each server's thread setting, and what torch's default would give TorchServe here."""
    s = result.settings
    line = (
        f"- Threads: torchgate's CPU workers use {s.get('torchgate_threads', '?')}; TorchServe "
        f"runs with {s.get('torchserve_threads', '?')}."
    )
    ts = result.runs.get(TORCHSERVE)
    loaded = (ts.memory_loaded or ts.memory_idle) if ts else None
    workers = sum(1 for p in loaded.processes if p.role == "worker") if loaded else 0
    cores = result.machine.cores
    if workers and s.get("torchserve_threads", "").startswith("OMP_NUM_THREADS"):
        line += (
            f" (torch's default would be a thread per core: {cores} in each of its {workers} "
            f"workers, {cores * workers} threads on {cores} cores; `--torchserve-threads 0` "
            "measures that.)"
        )
    return line


def _probe_line(result: SuiteResult) -> list[str]:
    if not probes(result):
        return []
    return [
        f"- Refusals: right after the c={OVERLOAD_C} point, {overload.PROBE_S:g} s more at "
        f"{OVERLOAD_C} connections with the python engine, which reads every answer's status "
        "and headers (wrk's measured run does not, to stay fast): answers by status, whether "
        "every 503 carried Retry-After, and the 503s' p50/p99, timed by the client on the "
        "same cores (an upper bound). The c=200 target wants every non-2xx answer there to "
        f"be a 503 with Retry-After, their p99 <= {overload.REFUSAL_P99_BOUND_MS:g} ms."
    ]


def markdown(result: SuiteResult) -> str:
    """docs/benchmarks.md."""
    m = result.machine
    s = result.settings
    engine = _engine(result)
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
        f"{s.get('load_end', '?')} at the end. The start figure tells whether other work was "
        "running before the suite began (on a quiet machine it is below ~1; higher means other "
        "work shared the cores and every number here is pessimistic). The end figure is mostly "
        "the suite's own, its servers and load generator having kept the cores busy until "
        "then: it cannot tell whether other work joined during the run.",
        f"- **Versions**: {versions}",
        "",
        "## Method",
        "",
        f"- Same archives (`{s.get('archives', '')}`) and the same `config.properties` for both "
        "servers; each gets a copy with the ports rewritten to free loopback ports and "
        "`disable_token_authorization=true`, everything else unchanged "
        f"(digits: {s.get('digits_batching', '')}).",
        "- Batching: torchgate dispatches a batch at once when its worker is idle, and holds "
        "one for more requests only while another batch runs; TorchServe waits up to "
        f"maxBatchDelay ({s.get('digits_max_batch_delay', '?')} for digits) for every partial "
        "batch to fill, so TorchServe's c=1 latency is mostly that wait.",
        _threads_line(result),
        "- Logging: each server's default, one access-log line per request written to a file "
        "(TorchServe's `logs/access_log.log`; torchgate's JSON access log on stdout, sent to a "
        "file).",
        "- req/s counts successful (2xx) answers only; refused ones (503 when the queue is "
        "full) are in the errors column. Latency percentiles are over all answers, refused and "
        f"failed ones included, not only the 2xx ({engine} records every answer).",
        "- One server at a time: start it, wait until every model version is ready, run every "
        "point, measure memory, stop it; then the other.",
        _load_line(result),
        *_probe_line(result),
        f"- Bodies: digits `{s.get('digits_body', '')}`; minilm `{s.get('minilm_body', '')}`.",
        f"- **The load generator and the server share the same {m.cores} cores**: at high "
        f"concurrency {engine} takes CPU the server would otherwise use, for both servers "
        "alike. Absolute numbers are lower than on a separate client machine; the ratios are "
        "the point.",
        "- Memory: resident set summed over the server's process tree after its load points "
        "(torchgate: its frontend, the zygote and the workers forked from it; TorchServe: the "
        "Java frontend plus every Python worker, launcher excluded). PSS (shared pages split "
        "between processes) is shown beside it.",
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
            f"TS = TorchServe, tg = torchgate; {LATENCIES}.",
            "",
            markdown_table(SIDE_BY_SIDE, side_by_side_rows(result, workload)),
            "",
        ]
    if found := probes(result):
        out += [
            f"## Refusals at c={OVERLOAD_C}",
            "",
            f"{overload.PROBE_S:g} s with the python engine right after the c={OVERLOAD_C} "
            "point; 503 latencies in ms, as the client saw them.",
            "",
            markdown_table(overload.PROBE_COLUMNS, overload.probe_rows(found)),
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
        threads = raw.HANDLER_THREADS
        out += [
            "## The model itself, in-process",
            "",
            "`timeit`, best of 5, no server: the bare runtime on a ready tensor (threads: "
            "intra-op threads), and the archive's handler (`handle()`: decode the parsed JSON "
            f"body, collate, run, top-5 answer) with {threads} intra-op "
            f"thread{'s' if threads != 1 else ''}, torchgate's default for a CPU worker (the "
            "servers' own settings in this run are under Method). The minilm handler also runs "
            "back to back for as long as a load point: a server keeps up that rate, not a "
            "burst's, and its target compares with it.",
            "",
            markdown_table(RAW_COLUMNS, raw_rows(result.raw)),
            "",
        ]
    return "\n".join(out)


def with_section(document: str, heading: str, section: str) -> str:
    """`document` with its section under the line `heading` (up to the next "## " heading)
    replaced by `section` (which starts with that heading), or with `section` appended: a
    report section written by a separate command (`v2_throughput --append`) is there once,
    however often that command runs."""
    lines = document.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == heading), None)
    if start is None:
        return (document.rstrip("\n") + "\n\n" if document.strip() else "") + section
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    following = "".join(lines[end:])
    return "".join(lines[:start]) + section + ("\n" + following if following else "")
