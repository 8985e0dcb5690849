"""`python -m benchmarks.load`: closed-loop HTTP load against one URL at several concurrencies.

    python -m benchmarks.load --url http://127.0.0.1:8080/predictions/digits \\
        --body-json "$(python -c 'print([0.0] * 64)')" --concurrency 1,8,32 --duration 10s

Each concurrency level is one point: `concurrency` keep-alive connections, each sending its next
request as soon as the previous answer arrived (closed loop), first for `--warmup` (discarded),
then for `--duration` (measured). A point reports requests/s, latency p50/p95/p99 and errors.

Engines:

    wrk     (primary) Debian's wrk driven by the Lua script below; its `done()` hook prints one
            JSON line. `scripts/install_tools.sh wrk` installs it. C, epoll: ~100k req/s per thread,
            so it is not the bottleneck of anything this project serves.
    python  asyncio + raw sockets, HTTP/1.1 keep-alive. About an order of magnitude slower
            than wrk: fine for slow models, it saturates before a fast server does. `auto`
            falls back to it when wrk is missing, with a warning on stderr. It also sees each
            answer's status and headers (`python_load`), which the suite's refusal probe uses.

Errors: "status" counts answers the engine deems failed. wrk counts HTTP status >= 400 (a 3xx
counts as a success there); the python engine counts every non-2xx. Both also count connect,
read, write and timeout errors; a point with errors is still reported, never hidden, and its
latency percentiles are over every answer, failed ones included (wrk records them all).
Exit status 1 when a point got no successful answer.

The repository's benchmark suite (`python -m benchmarks`, `make bench`) drives its load
through this module.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import mimetypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

DEFAULT_CONCURRENCY = (1, 8, 32)
RESULT_MARKER = "TORCHGATE_BENCH "
ERROR_KINDS = ("connect", "read", "write", "status", "timeout")

T = TypeVar("T")

# Runs in every wrk thread's Lua state. The method and body file come through the environment
# (robust against how wrk hands arguments to scripts); headers, including Content-Type, are wrk
# -H flags. No `response()` hook on purpose: defining one makes wrk parse every answer in Lua.
WRK_SCRIPT = r"""
wrk.method = os.getenv("TORCHGATE_BENCH_METHOD") or "GET"
local body_file = os.getenv("TORCHGATE_BENCH_BODY_FILE")
if body_file and body_file ~= "" then
  local f = assert(io.open(body_file, "rb"))
  wrk.body = f:read("*a")
  f:close()
end

local function num(x)
  if x ~= x or x == math.huge or x == -math.huge then return 0 end
  return x
end

function done(summary, latency, requests)
  local e = summary.errors
  local n = summary.requests
  local function p(q) if n == 0 then return 0 end return num(latency:percentile(q)) end
  io.write(string.format(
    'TORCHGATE_BENCH {"requests":%d,"duration_us":%d,"bytes":%d,"latency_us":' ..
    '{"min":%d,"mean":%.3f,"stdev":%.3f,"max":%d,"p50":%d,"p90":%d,"p95":%d,"p99":%d,' ..
    '"p999":%d},"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}\n',
    n, summary.duration, summary.bytes,
    n == 0 and 0 or num(latency.min), n == 0 and 0 or num(latency.mean),
    n == 0 and 0 or num(latency.stdev), n == 0 and 0 or num(latency.max),
    p(50), p(90), p(95), p(99), p(99.9),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


class BenchError(RuntimeError):
    """The load could not be run or its result not read (not: the server answered errors)."""


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What every request of a run looks like, and how the engine runs."""

    url: str
    method: str = "GET"
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()  # Content-Type included, when there is one
    threads: int = 1  # wrk threads; capped at the concurrency
    timeout_s: float = 30.0


@dataclass(frozen=True, slots=True)
class PointResult:
    """One concurrency level, measured. Latencies in milliseconds."""

    concurrency: int
    requests: int
    duration_s: float
    rps: float  # successful (non-error) answers per second
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    errors: dict[str, int] = field(default_factory=dict)
    engine: str = "wrk"

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def successes(self) -> int:
        """Answers that were not failed ones (2xx; for wrk, any status below 400)."""
        return self.requests - self.errors.get("status", 0)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "error_count": self.error_count}


Engine = Callable[[LoadSpec, int, float], PointResult]


# --- wrk -----------------------------------------------------------------------------------------


def parse_wrk_output(stdout: str, concurrency: int) -> PointResult:
    """The `PointResult` in wrk's stdout (the JSON line our Lua `done()` hook printed)."""
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            raw = json.loads(line[len(RESULT_MARKER) :])
            break
    else:
        raise BenchError(f"wrk printed no result line:\n{stdout[-2000:]}")
    latency = raw["latency_us"]
    duration_s = raw["duration_us"] / 1e6
    requests = int(raw["requests"])
    # Throughput counts successful answers only: a 503 storm is not throughput.
    ok = requests - int(raw["errors"].get("status", 0))
    return PointResult(
        concurrency=concurrency,
        requests=requests,
        duration_s=duration_s,
        rps=ok / duration_s if duration_s > 0 else 0.0,
        p50_ms=latency["p50"] / 1000,
        p95_ms=latency["p95"] / 1000,
        p99_ms=latency["p99"] / 1000,
        mean_ms=latency["mean"] / 1000,
        max_ms=latency["max"] / 1000,
        errors={kind: int(raw["errors"].get(kind, 0)) for kind in ERROR_KINDS},
        engine="wrk",
    )


def wrk_command(spec: LoadSpec, concurrency: int, duration_s: float, script: Path) -> list[str]:
    """wrk's command line for one run (wrk takes whole seconds; at least 1)."""
    command = [
        "wrk",
        f"-t{max(1, min(spec.threads, concurrency))}",
        f"-c{concurrency}",
        f"-d{max(1, round(duration_s))}s",
        f"--timeout={max(1, math.ceil(spec.timeout_s))}s",
        "-s",
        str(script),
    ]
    for name, value in spec.headers:
        command += ["-H", f"{name}: {value}"]
    return [*command, spec.url]


def run_wrk(spec: LoadSpec, concurrency: int, duration_s: float) -> PointResult:
    """One wrk run of `duration_s` at `concurrency` connections."""
    if shutil.which("wrk") is None:
        raise BenchError("wrk is not on PATH (scripts/install_tools.sh wrk installs it)")
    with tempfile.TemporaryDirectory(prefix="torchgate-bench-") as tmp:
        script, body = Path(tmp, "bench.lua"), Path(tmp, "body")
        script.write_text(WRK_SCRIPT)
        body.write_bytes(spec.body)
        env = {
            **os.environ,
            "TORCHGATE_BENCH_METHOD": spec.method,
            "TORCHGATE_BENCH_BODY_FILE": str(body) if spec.body else "",
        }
        completed = subprocess.run(
            wrk_command(spec, concurrency, duration_s, script),
            env=env,
            capture_output=True,
            text=True,
            timeout=duration_s + spec.timeout_s + 30,
            check=False,
        )
    if completed.returncode != 0:
        raise BenchError(f"wrk exited with {completed.returncode}: {completed.stderr.strip()}")
    return parse_wrk_output(completed.stdout, concurrency)


def wrk_version() -> str | None:
    """wrk's version string ("debian/4.1.0-3+b2"), or None without wrk."""
    if shutil.which("wrk") is None:
        return None
    completed = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    match = re.search(r"wrk (\S+)", completed.stdout + completed.stderr)
    return match.group(1) if match else "unknown"


# --- pure-Python fallback ------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending sequence; 0 when empty."""
    if not sorted_values:
        return 0.0
    rank = math.ceil(q / 100 * len(sorted_values))
    return float(sorted_values[min(max(rank, 1), len(sorted_values)) - 1])


def summarize(
    concurrency: int, latencies_s: list[float], duration_s: float, errors: dict[str, int]
) -> PointResult:
    """A `PointResult` from raw per-request latencies (seconds)."""
    ordered = sorted(latencies_s)
    ok = len(ordered) - errors.get("status", 0)  # answers with a non-2xx status are not
    return PointResult(
        concurrency=concurrency,
        requests=len(ordered),
        duration_s=duration_s,
        rps=ok / duration_s if duration_s > 0 else 0.0,
        p50_ms=percentile(ordered, 50) * 1000,
        p95_ms=percentile(ordered, 95) * 1000,
        p99_ms=percentile(ordered, 99) * 1000,
        mean_ms=(sum(ordered) / len(ordered) * 1000) if ordered else 0.0,
        max_ms=(ordered[-1] * 1000) if ordered else 0.0,
        errors={kind: errors.get(kind, 0) for kind in ERROR_KINDS},
        engine="python",
    )


def _request_bytes(spec: LoadSpec) -> tuple[str, int, bytes]:
    parts = urlsplit(spec.url)
    if parts.scheme != "http" or not parts.hostname:
        raise BenchError(f"the python engine speaks plain http only: {spec.url}")
    port = parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"{spec.method} {target} HTTP/1.1", f"Host: {parts.hostname}:{port}"]
    lines += [f"{name}: {value}" for name, value in spec.headers]
    if spec.body or spec.method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(spec.body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return parts.hostname, port, head + spec.body


@dataclass(frozen=True, slots=True)
class Answer:
    """What the python engine keeps of one HTTP/1.1 response (its body is read and dropped)."""

    status: int
    keep_alive: bool
    retry_after: bool  # a Retry-After header came with it


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One HTTP/1.1 response from `reader`, body consumed."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, _, header_block = head.partition(b"\r\n")
    status = int(status_line.split(b" ", 2)[1])
    headers = {}
    for line in header_block.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep:
            headers[name.strip().lower()] = value.strip().lower()
    if headers.get(b"transfer-encoding") == b"chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return Answer(status, headers.get(b"connection") != b"close", b"retry-after" in headers)


@dataclass(slots=True)
class Samples:
    """Everything one python-engine run saw. Latencies of every answer, whatever its status;
    a request that got no answer (connect/read/timeout) has none."""

    latencies_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)  # answers by HTTP status
    # Each 503 (a refusal): its latency, and whether it said when to retry.
    refusals: list[tuple[float, bool]] = field(default_factory=list)


async def python_load(spec: LoadSpec, concurrency: int, duration_s: float) -> Samples:
    """`concurrency` keep-alive connections in a closed loop for `duration_s`."""
    host, port, request = _request_bytes(spec)
    samples = Samples()
    latencies, errors, statuses = samples.latencies_s, samples.errors, samples.statuses
    clock = time.perf_counter
    started = clock()
    deadline = started + duration_s

    async def connection() -> None:
        writer: asyncio.StreamWriter | None = None
        reader: asyncio.StreamReader | None = None
        while clock() < deadline:
            if writer is None:
                try:
                    reader, writer = await asyncio.open_connection(host, port)
                except OSError:
                    errors["connect"] += 1
                    await asyncio.sleep(0.01)
                    continue
            assert reader is not None
            sent = clock()
            keep_alive = False
            try:
                writer.write(request)
                async with asyncio.timeout(spec.timeout_s):
                    answer = await read_answer(reader)
            except TimeoutError:
                errors["timeout"] += 1
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                errors["read"] += 1
            else:
                latency = clock() - sent
                latencies.append(latency)
                statuses[answer.status] += 1
                keep_alive = answer.keep_alive
                if not 200 <= answer.status < 300:
                    errors["status"] += 1
                    if answer.status == 503:
                        samples.refusals.append((latency, answer.retry_after))
            if not keep_alive:
                writer.close()
                writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(concurrency)))
    samples.elapsed_s = clock() - started
    return samples


def run_async(work: Coroutine[Any, Any, T]) -> T:
    """`work` on a fresh event loop: uvloop's when installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        return asyncio.run(work)
    return uvloop.run(work)


def run_python(spec: LoadSpec, concurrency: int, duration_s: float) -> PointResult:
    """One run of the asyncio engine (uvloop when installed)."""
    samples = run_async(python_load(spec, concurrency, duration_s))
    return summarize(concurrency, samples.latencies_s, samples.elapsed_s, dict(samples.errors))


FALLBACK_WARNING = (
    "warning: wrk is not installed (scripts/install_tools.sh wrk): the load comes from the "
    "python engine, which saturates about an order of magnitude earlier than wrk; these numbers "
    "are not comparable to a run with wrk"
)


def pick_engine(name: str) -> tuple[str, Engine]:
    """("wrk" | "python", run function) for --engine auto|wrk|python.

    `auto` without wrk falls back to the python engine and says so on stderr: call it once
    per run, and name the engine wherever the numbers go.
    """
    if name == "python":
        return "python", run_python
    if shutil.which("wrk") is None:
        if name == "auto":
            print(FALLBACK_WARNING, file=sys.stderr, flush=True)
            return "python", run_python
        raise BenchError("wrk is not on PATH (scripts/install_tools.sh wrk installs it)")
    return "wrk", run_wrk


def run_points(
    spec: LoadSpec,
    concurrencies: Sequence[int],
    duration_s: float,
    warmup_s: float,
    engine: Engine,
    on_point: Callable[[PointResult], None] | None = None,
) -> list[PointResult]:
    """Warm up, then measure, each concurrency level in turn."""
    results = []
    for concurrency in concurrencies:
        if warmup_s > 0:
            engine(spec, concurrency, warmup_s)
        result = engine(spec, concurrency, duration_s)
        if on_point is not None:
            on_point(result)
        results.append(result)
    return results


# --- rendering -----------------------------------------------------------------------------------

COLUMNS = ("concurrency", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors")


def result_row(result: PointResult) -> list[str]:
    return [
        str(result.concurrency),
        f"{result.rps:,.0f}",
        f"{result.p50_ms:.2f}",
        f"{result.p95_ms:.2f}",
        f"{result.p99_ms:.2f}",
        format_errors(result.errors),
    ]


def format_errors(errors: dict[str, int]) -> str:
    """ "0", or the non-zero kinds: "status 12, timeout 1"."""
    parts = [f"{kind} {count}" for kind, count in errors.items() if count]
    return ", ".join(parts) if parts else "0"


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table, columns padded; the first column left-aligned, the rest right."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(padded).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


# --- command line --------------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """Seconds from "10s", "500ms", "1m", "2h" or a bare number of seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 10s, 500ms, 1m)")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2) or "s"]
    return float(match.group(1)) * scale


MIN_MEASURED_S = 1.0


def parse_measured_duration(text: str) -> float:
    """`parse_duration` for a measured period: at least a second. wrk runs whole seconds (at
    least one, whatever it is asked), and a shorter period gives the in-process timings next to
    nothing to average."""
    seconds = parse_duration(text)
    if seconds < MIN_MEASURED_S:
        raise argparse.ArgumentTypeError(
            f"a measured duration must be at least {MIN_MEASURED_S:g} s: {text!r}"
        )
    return seconds


def parse_concurrency(text: str) -> list[int]:
    """[1, 8, 32] from "1,8,32"; every level a positive integer."""
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None
    if not levels or any(level < 1 for level in levels):
        raise argparse.ArgumentTypeError(f"concurrency levels must be >= 1: {text!r}")
    return levels


def parse_header(text: str) -> tuple[str, str]:
    """("Authorization", "Bearer x") from "Authorization: Bearer x" or "Authorization:Bearer x"."""
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"header must be NAME:VALUE, got {text!r}")
    return name.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.load",
        description="Closed-loop HTTP load at several concurrencies (wrk, or a Python fallback).",
    )
    parser.add_argument("--url", required=True, help="the URL every request goes to")
    parser.add_argument(
        "--concurrency",
        "-c",
        type=parse_concurrency,
        default=list(DEFAULT_CONCURRENCY),
        help="comma-separated connection counts, one point each (default: 1,8,32)",
    )
    parser.add_argument(
        "--duration",
        "-d",
        type=parse_measured_duration,
        default=10.0,
        help="measured, per point (default: 10s)",
    )
    parser.add_argument(
        "--warmup", type=parse_duration, default=2.0, help="per point, discarded (default: 2s)"
    )
    body = parser.add_mutually_exclusive_group()
    body.add_argument("--body", type=Path, metavar="FILE", help="request body from a file")
    body.add_argument("--body-json", metavar="STRING", help="request body, JSON text")
    parser.add_argument("--content-type", help="default: application/json for --body-json")
    parser.add_argument("--method", "-X", help="default: POST with a body, else GET")
    parser.add_argument(
        "--header",
        "-H",
        type=parse_header,
        action="append",
        default=[],
        metavar="K:V",
        help="repeatable, e.g. 'Authorization: Bearer KEY'",
    )
    parser.add_argument(
        "--threads",
        "-t",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="wrk threads (default: half the cores, at least 1; capped at the concurrency)",
    )
    parser.add_argument(
        "--timeout", type=parse_duration, default=30.0, help="per request (default: 30s)"
    )
    parser.add_argument("--engine", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    return parser


def spec_from_args(options: argparse.Namespace) -> LoadSpec:
    body = b""
    content_type = options.content_type
    if options.body is not None:
        body = options.body.read_bytes()
        content_type = content_type or mimetypes.guess_type(options.body.name)[0]
        content_type = content_type or "application/octet-stream"
    elif options.body_json is not None:
        try:
            json.loads(options.body_json)
        except json.JSONDecodeError as exc:
            raise BenchError(f"--body-json is not valid JSON: {exc}") from None
        body = options.body_json.encode()
        content_type = content_type or "application/json"
    headers = list(options.header)
    if content_type and not any(name.lower() == "content-type" for name, _ in headers):
        headers.append(("Content-Type", content_type))
    return LoadSpec(
        url=options.url,
        method=(options.method or ("POST" if body else "GET")).upper(),
        body=body,
        headers=tuple(headers),
        threads=max(1, options.threads),
        timeout_s=options.timeout,
    )


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    try:
        spec = spec_from_args(options)
        engine_name, engine = pick_engine(options.engine)
        if not options.json:
            print(
                f"{spec.method} {spec.url}: engine {engine_name}, {options.duration:g}s per point "
                f"after {options.warmup:g}s warm-up, {spec.threads} thread(s)",
                flush=True,
            )
        results = run_points(spec, options.concurrency, options.duration, options.warmup, engine)
    except (BenchError, OSError) as exc:
        print(f"benchmarks.load: {exc}", file=sys.stderr)
        return 1
    if options.json:
        document = {
            "url": spec.url,
            "method": spec.method,
            "engine": engine_name,
            "duration_s": options.duration,
            "warmup_s": options.warmup,
            "results": [result.to_json() for result in results],
        }
        print(json.dumps(document, indent=2))
    else:
        print(render_table(COLUMNS, [result_row(result) for result in results]))
    return 1 if any(result.successes <= 0 for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
