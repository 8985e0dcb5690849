"""The overload point's other half: how the requests a server cannot take are refused.

The c=200 target asks for two things: 2xx goodput close to the c=32 throughput (wrk's run of
the point measures that), and the excess refused quickly with 503 and a Retry-After header.
wrk's run cannot see the second without a Lua `response()` hook, which makes wrk parse every
answer in Lua and slows the measured run, so it stays as it is. Instead, right after it, a short
probe at the same concurrency with the python engine (`benchmarks.load.python_load`) records
every answer's status, whether each 503 carried Retry-After, and how long the 503s took.

The probe's latencies are the python client's, on the cores the server uses too: an upper bound
on the server's own time to refuse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.load import LoadSpec, Samples, percentile, python_load, run_async

PROBE_S = 2.0
# "Quickly": a refusal that took longer waited in some queue first. The python client's own
# delay at 200 connections on a shared 2-core machine fits well inside it.
REFUSAL_P99_BOUND_MS = 100.0


@dataclass(frozen=True, slots=True)
class RefusalProbe:
    """What a short python-engine run at the overload point saw. Latencies in milliseconds."""

    concurrency: int
    duration_s: float
    statuses: dict[int, int]  # answers by HTTP status
    no_answer: dict[str, int]  # connect / read / timeout: requests that got no answer at all
    refused: int  # 503 answers
    refused_with_retry_after: int
    refused_p50_ms: float
    refused_p99_ms: float

    @property
    def answers(self) -> int:
        return sum(self.statuses.values())

    @property
    def other_failures(self) -> int:
        """Answers neither 2xx nor 503: failures that are not refusals."""
        return sum(n for status, n in self.statuses.items() if not _ok(status) and status != 503)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _ok(status: int) -> bool:
    return 200 <= status < 300


def from_samples(concurrency: int, samples: Samples) -> RefusalProbe:
    latencies = sorted(latency for latency, _ in samples.refusals)
    return RefusalProbe(
        concurrency=concurrency,
        duration_s=samples.elapsed_s,
        statuses=dict(sorted(samples.statuses.items())),
        no_answer={kind: n for kind, n in sorted(samples.errors.items()) if kind != "status" and n},
        refused=len(latencies),
        refused_with_retry_after=sum(1 for _, retry_after in samples.refusals if retry_after),
        refused_p50_ms=percentile(latencies, 50) * 1000,
        refused_p99_ms=percentile(latencies, 99) * 1000,
    )


def probe_refusals(spec: LoadSpec, concurrency: int, duration_s: float = PROBE_S) -> RefusalProbe:
    """`concurrency` connections for `duration_s`, every answer's status and headers read."""
    return from_samples(concurrency, run_async(python_load(spec, concurrency, duration_s)))


def judge(probe: RefusalProbe | None) -> tuple[bool | None, str]:
    """(met, why not) for "the excess refused quickly with 503 + Retry-After"; met is None when
    there was no probe, or when it saw no refusal (every answer 2xx)."""
    if probe is None:
        return None, "refusals not measured"
    if probe.answers == 0:
        return False, "probe got no answers"
    if not probe.refused and not probe.other_failures and not probe.no_answer:
        # The python client may not load a fast server past what it takes: nothing was
        # refused, so how refusals look was not seen.
        return None, "no refusals seen (the probe did not overload it)"
    problems = []
    if probe.no_answer:
        problems.append("requests without an answer")
    if probe.other_failures:
        problems.append("failures other than 503")
    if probe.refused_with_retry_after < probe.refused:
        problems.append("503 without Retry-After")
    if probe.refused and probe.refused_p99_ms > REFUSAL_P99_BOUND_MS:
        problems.append(f"503 p99 over {REFUSAL_P99_BOUND_MS:g} ms")
    return not problems, ", ".join(problems)


def describe(probe: RefusalProbe) -> str:
    """ "2xx 1,234, 503 5,678 (all with Retry-After), 503 p50 1.20 ms, p99 4.50 ms"."""
    parts = [format_statuses(probe.statuses)]
    if probe.refused:
        with_header = (
            "all"
            if probe.refused_with_retry_after == probe.refused
            else f"{probe.refused_with_retry_after:,} of {probe.refused:,}"
        )
        parts[-1] += f" ({with_header} with Retry-After)"
        parts.append(f"503 p50 {probe.refused_p50_ms:.2f} ms, p99 {probe.refused_p99_ms:.2f} ms")
    if probe.no_answer:
        parts.append("no answer: " + ", ".join(f"{k} {n:,}" for k, n in probe.no_answer.items()))
    return ", ".join(parts)


def format_statuses(statuses: dict[int, int]) -> str:
    """ "2xx 1,234, 503 56": successes summed, every other status on its own."""
    ok = sum(n for status, n in statuses.items() if _ok(status))
    parts = [f"2xx {ok:,}"] + [f"{s} {n:,}" for s, n in sorted(statuses.items()) if not _ok(s)]
    return ", ".join(parts)


PROBE_COLUMNS = (
    "server",
    "c",
    "answers by status",
    "503 with Retry-After",
    "503 p50 ms",
    "503 p99 ms",
    "no answer",
)


def probe_row(server: str, probe: RefusalProbe) -> list[str]:
    return [
        server,
        str(probe.concurrency),
        format_statuses(probe.statuses),
        f"{probe.refused_with_retry_after:,} of {probe.refused:,}",
        f"{probe.refused_p50_ms:.2f}" if probe.refused else "-",
        f"{probe.refused_p99_ms:.2f}" if probe.refused else "-",
        ", ".join(f"{k} {n:,}" for k, n in probe.no_answer.items()) or "0",
    ]


def probe_rows(probes: Sequence[tuple[str, RefusalProbe]]) -> list[list[str]]:
    return [probe_row(server, probe) for server, probe in probes]
