"""Run the abuse cases one after another against one real server under good traffic, and
measure what each cost everyone else.

For each case: a baseline window of good traffic, then the attack; the case's window lasts at
least `MIN_WINDOW` and until the attack has its answers. Good requests are counted in the
window they started in, and the window closes only once each client has answered past it, so a
request the attack stalled is counted (and its latency is the stall). RSS is the whole tree's
(frontend, zygote, workers), just before the attack and once its window closed.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.servers import tree_memory
from tests.abuse.cases import CASES, HEADER_TIMEOUT, Case
from tests.abuse.traffic import GoodTraffic, Sample
from tests.support.bombs import many_small_members_bomb
from tests.support.server import ROOT, TorchgateServer, running_torchgate

BASELINE = 1.0  # seconds of good traffic before each attack
MIN_WINDOW = 1.0  # seconds an attack's window lasts at least
MB = 1e6


@dataclass(frozen=True)
class Outcome:
    case: Case
    answer: str
    attack_seconds: float  # until the attacker had every answer
    good_requests: int  # started during the attack's window
    good_errors: list[str]  # "status error" of each failed one
    p99_before: float  # seconds
    p99_during: float
    rss_before: int  # bytes
    rss_after: int


def p99(samples: Sequence[Sample]) -> float:
    return float(np.percentile([s.latency for s in samples], 99)) if samples else float("nan")


@contextmanager
def abuse_server(
    workdir: Path, extra_config: str = ""
) -> Iterator[tuple[TorchgateServer, Path, GoodTraffic]]:
    """digits 1.0 and minilm with the model API on and token auth off, good traffic flowing.
    `extra_config` is appended to config.properties (to see what a limit is worth by lifting it).

    A private model store (links to the built archives, and the bomb), so registration
    attacks never touch the repository's; `outside` is a real archive outside it.
    """
    store, elsewhere = workdir / "store", workdir / "elsewhere"
    store.mkdir(parents=True)
    elsewhere.mkdir()
    for name in ("digits.mar", "minilm.mar"):
        (store / name).symlink_to((ROOT / "model_store" / name).resolve())
    many_small_members_bomb(store / "bomb.mar")
    outside = elsewhere / "digits.mar"
    outside.write_bytes((ROOT / "model_store" / "digits.mar").read_bytes())
    config = (
        f"model_store={store}\nload_models=digits.mar,minilm.mar\nenable_model_api=true\n"
        "disable_token_authorization=true\n"
        f"torchgate.header_timeout={HEADER_TIMEOUT}\n{extra_config}"
    )
    with running_torchgate(config, workdir=workdir / "server", startup_timeout=180) as server:
        traffic = GoodTraffic.start(server.inference_url, workdir / "good-traffic.log")
        try:
            yield server, outside, traffic
        finally:
            traffic.stop()


def run_case(case: Case, server: TorchgateServer, outside: Path, traffic: GoodTraffic) -> Outcome:
    baseline_from = time.monotonic()
    time.sleep(BASELINE)
    rss_before = tree_memory(server.process.pid).rss
    started = time.monotonic()
    try:
        answer = case.attack(server, outside)
    except Exception as exc:
        # Name the case, and show what the server logged (a crash, a shutdown) meanwhile.
        tail = "\n".join(server.log_text().splitlines()[-30:])
        raise RuntimeError(f"{case.name}: {exc!r}; the server's log ends:\n{tail}") from exc
    attack_seconds = time.monotonic() - started
    time.sleep(max(0.0, started + MIN_WINDOW - time.monotonic()))
    ended = time.monotonic()
    traffic.wait_past(ended)
    rss_after = tree_memory(server.process.pid).rss
    samples = traffic.samples()
    before = [s for s in samples if baseline_from <= s.started < started]
    during = [s for s in samples if started <= s.started < ended]
    return Outcome(
        case=case,
        answer=answer,
        attack_seconds=attack_seconds,
        good_requests=len(during),
        good_errors=[f"{s.status} {s.error}".strip() for s in during if not s.ok],
        p99_before=p99(before),
        p99_during=p99(during),
        rss_before=rss_before,
        rss_after=rss_after,
    )


def run_battery(
    workdir: Path, cases: Sequence[Case] = CASES, extra_config: str = ""
) -> list[Outcome]:
    with abuse_server(workdir, extra_config) as (server, outside, traffic):
        return [run_case(case, server, outside, traffic) for case in cases]


def table(outcomes: Sequence[Outcome]) -> str:
    """A Markdown table, for the log and the closing note."""
    rows = [
        "| case | answer | attack s | good requests | good errors | p99 before ms | p99 during ms "
        "| RSS before MB | RSS after MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for o in outcomes:
        rows.append(
            f"| {o.case.name} | {o.answer} | {o.attack_seconds:.2f} "
            f"| {o.good_requests} | {len(o.good_errors)} "
            f"| {o.p99_before * 1000:.0f} | {o.p99_during * 1000:.0f} "
            f"| {o.rss_before / MB:.0f} | {o.rss_after / MB:.0f} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str]) -> None:
    """`python -m tests.abuse [KEY=VALUE ...] [--only TEXT]`: run the battery once and print
    the table. KEY=VALUE lines are added to the config (`limit_max_image_pixels=false` shows
    what that limit is worth); `--only TEXT` runs the cases whose name contains TEXT."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = list(argv)
    cases = CASES
    if "--only" in args:
        at = args.index("--only")
        text = args[at + 1]
        del args[at : at + 2]
        cases = [case for case in CASES if text in case.name]
    extra = "".join(f"{line}\n" for line in args)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="torchgate-abuse-") as workdir:
        outcomes = run_battery(Path(workdir), cases, extra)
    print(table(outcomes))
    print(f"\n{len(outcomes)} cases in {time.monotonic() - started:.0f} s")
