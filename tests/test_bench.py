"""`benchmarks.load` (closed-loop load) and the benchmark suite's tables: parsing and aggregation
without load, then short real runs (python engine always, wrk when installed) against a stdlib
HTTP server."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from benchmarks import load as bench
from benchmarks import overload, preflight, report, suite
from benchmarks.load import BenchError, LoadSpec, PointResult, Samples
from benchmarks.machine import Machine, cpu_model
from benchmarks.overload import RefusalProbe
from benchmarks.raw import RawResult
from benchmarks.servers import Memory, ProcessMemory, torchgate_threads, torchserve_threads

ROOT = Path(__file__).resolve().parents[1]
WRK_LINE = (
    'TORCHGATE_BENCH {"requests":12000,"duration_us":2000000,"bytes":960000,"latency_us":'
    '{"min":90,"mean":150.5,"stdev":20.1,"max":4000,"p50":140,"p90":180,"p95":200,"p99":350,'
    '"p999":900},"errors":{"connect":0,"read":1,"write":0,"status":3,"timeout":0}}'
)


def point(concurrency: int, rps: float, p50: float, p99: float) -> PointResult:
    return PointResult(concurrency, int(rps * 10), 10.0, rps, p50, p99 * 0.9, p99, p50, p99 * 2)


# --- parsing -------------------------------------------------------------------------------------


def test_parse_wrk_output_reads_the_json_line_among_wrk_text() -> None:
    stdout = f"Running 2s test @ http://x\n  1 threads and 8 connections\n{WRK_LINE}\n"
    result = bench.parse_wrk_output(stdout, concurrency=8)
    assert result.concurrency == 8
    assert result.requests == 12000
    assert result.rps == pytest.approx(5998.5)  # 2xx only: 3 status errors of 12,000
    assert (result.p50_ms, result.p95_ms, result.p99_ms) == (0.14, 0.2, 0.35)
    assert result.mean_ms == pytest.approx(0.1505)
    assert result.errors == {"connect": 0, "read": 1, "write": 0, "status": 3, "timeout": 0}
    assert result.error_count == 4
    assert result.to_json()["error_count"] == 4


def test_parse_wrk_output_without_result_line_is_an_error() -> None:
    with pytest.raises(BenchError, match="no result line"):
        bench.parse_wrk_output("unable to connect to 127.0.0.1:1 Connection refused\n", 1)


def test_wrk_command_caps_threads_rounds_duration_and_passes_headers() -> None:
    spec = LoadSpec(
        "http://127.0.0.1:9/p",
        "POST",
        b"[]",
        (("Content-Type", "application/json"), ("Authorization", "Bearer k")),
        threads=4,
        timeout_s=2.5,
    )
    command = bench.wrk_command(spec, concurrency=2, duration_s=0.4, script=Path("s.lua"))
    assert command[:5] == ["wrk", "-t2", "-c2", "-d1s", "--timeout=3s"]
    assert command[-1] == "http://127.0.0.1:9/p"
    assert command[-3:-1] == ["-H", "Authorization: Bearer k"]


@pytest.mark.parametrize(
    ("text", "seconds"), [("10s", 10.0), ("500ms", 0.5), ("1m", 60.0), ("2", 2.0), ("1.5s", 1.5)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert bench.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten", "5 minutes", "-1s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_duration(text)


@pytest.mark.parametrize("text", ["0", "0s", "500ms", "0.9"])
def test_measured_durations_under_a_second_are_refused(text: str) -> None:
    # wrk runs at least a second whatever it is asked; the in-process timings get ~0 calls.
    with pytest.raises(argparse.ArgumentTypeError, match="at least 1 s"):
        bench.parse_measured_duration(text)
    assert bench.parse_measured_duration("1s") == 1.0
    with pytest.raises(SystemExit):
        suite.build_parser().parse_args(["-d", text])
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--url", "http://h:1/", "-d", text])
    assert suite.build_parser().parse_args(["--warmup", "0"]).warmup == 0  # no warm-up is fine


def test_auto_engine_without_wrk_warns_that_numbers_are_not_comparable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    name, engine = bench.pick_engine("auto")
    assert (name, engine) == ("python", bench.run_python)
    assert "not comparable" in capsys.readouterr().err
    bench.pick_engine("python")  # asked for: no warning
    assert capsys.readouterr().err == ""
    with pytest.raises(BenchError, match="wrk is not on PATH"):
        bench.pick_engine("wrk")


def test_parse_concurrency_and_header() -> None:
    assert bench.parse_concurrency("1, 8,32") == [1, 8, 32]
    for bad in ("0", "a,b", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_concurrency(bad)
    assert bench.parse_header("Authorization: Bearer a:b") == ("Authorization", "Bearer a:b")
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_header("no-colon")


def test_spec_from_args_defaults_to_post_json() -> None:
    options = bench.build_parser().parse_args(
        ["--url", "http://h:1/p", "--body-json", "[1, 2]", "-H", "X-A: b"]
    )
    spec = bench.spec_from_args(options)
    assert spec.method == "POST"
    assert spec.body == b"[1, 2]"
    assert spec.headers == (("X-A", "b"), ("Content-Type", "application/json"))
    get = bench.spec_from_args(bench.build_parser().parse_args(["--url", "http://h:1/ping"]))
    assert (get.method, get.body, get.headers) == ("GET", b"", ())
    with pytest.raises(BenchError, match="not valid JSON"):
        bench.spec_from_args(bench.build_parser().parse_args(["--url", "u", "--body-json", "{"]))


# --- aggregation and tables ----------------------------------------------------------------------


def test_summarize_uses_nearest_rank_percentiles() -> None:
    latencies = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    result = bench.summarize(4, latencies, 2.0, {"status": 2})
    assert result.requests == 100
    assert result.rps == 49.0  # 2xx only: 98 of 100 answers in 2 s
    assert (result.p50_ms, result.p95_ms, result.p99_ms) == pytest.approx((50, 95, 99))
    assert result.max_ms == pytest.approx(100)
    assert result.errors["status"] == 2 and result.errors["connect"] == 0
    assert bench.summarize(1, [], 1.0, {}).p99_ms == 0.0


def test_render_table_aligns_columns() -> None:
    text = bench.render_table(["c", "req/s"], [["1", "9"], ["32", "1,234"]])
    lines = text.splitlines()
    assert lines[0] == "c   req/s"
    assert lines[2] == "1       9"
    assert lines[3] == "32  1,234"
    assert bench.format_errors({"status": 2, "read": 0, "timeout": 1}) == "status 2, timeout 1"


def suite_result() -> report.SuiteResult:
    machine = Machine("Test CPU", 2, 24.0, "6.1", "2025-01-01 00:00 UTC", 0.2, {"wrk": "4.1.0"})
    result = report.SuiteResult(machine, {"engine": "wrk"})
    result.raw = [RawResult("digits 1.0", "TorchScript", 8, 40.0, 1)]
    mib = report.MIB
    result.runs[report.TORCHSERVE] = report.ServerRun(
        report.TORCHSERVE,
        20.0,
        Memory(1000 * mib, 800 * mib),
        Memory(
            1200 * mib,
            900 * mib,
            [
                ProcessMemory("java", 10, 600 * mib, 500 * mib),
                ProcessMemory("worker", 11, 600 * mib, 400 * mib),
            ],
        ),
        {"digits": [point(1, 130, 7.5, 9.0), point(32, 3000, 10.0, 20.0)]},
    )
    result.runs[report.TORCHGATE] = report.ServerRun(
        report.TORCHGATE,
        3.0,
        Memory(400 * mib, 350 * mib),
        Memory(
            420 * mib,
            360 * mib,
            [
                ProcessMemory("frontend", 20, 120 * mib, 100 * mib),
                ProcessMemory("worker", 22, 300 * mib, 260 * mib),
            ],
        ),
        {"digits": [point(1, 2500, 0.4, 0.9), point(32, 7000, 4.0, 12.0)]},
    )
    return result


def test_side_by_side_rows_pair_servers_by_concurrency() -> None:
    rows = report.side_by_side_rows(suite_result(), "digits")
    assert [row[0] for row in rows] == ["1", "32"]
    assert rows[1][1] == "3,000" and rows[1][6] == "7,000"
    assert rows[1][-1] == "2.33x"
    assert report.side_by_side_rows(suite_result(), "minilm") == []


def test_targets_report_what_was_measured() -> None:
    result = suite_result()
    # The burst (best of five) is faster than the host keeps up; the target takes the sustained.
    result.raw.append(RawResult("minilm 1.0", "handler (ONNX Runtime)", 8, 7000.0, 1))
    result.raw.append(RawResult("minilm 1.0", "handler (ONNX Runtime)", 8, 8000.0, 1, 10.0))
    tg = result.runs[report.TORCHGATE]
    tg.points["digits"].append(point(200, 6500, 20.0, 40.0))
    tg.points["minilm"] = [point(32, 950, 30.0, 40.0)]
    found = {t.goal: t for t in report.targets(result)}
    c32 = found["digits c=32: torchgate req/s >= 5x TorchServe's"]
    assert c32.met is False and c32.measured.startswith("2.33x")
    c200 = found[report.GOAL_C200]
    assert c200.measured.startswith("93%")  # goodput 6,500 of 7,000 req/s
    assert (c200.met, c200.verdict) == (None, "goodput yes; refusals not measured")
    c1 = found["digits c=1: torchgate p50 <= 0.3 ms"]
    assert c1.met is False and c1.measured == "0.400 ms" and c1.verdict == "NO"
    minilm = found["minilm c=32: >= 90% of the handler's sustained batched throughput in-process"]
    assert minilm.met is True and minilm.measured.startswith("95%")  # 950 of 1,000 items/s
    pss = found["PSS serving the example models <= 50% of TorchServe's"]
    assert pss.met is True and pss.measured.startswith("40%")
    assert found["start-up to all versions ready <= 50% of TorchServe's"].met is True
    assert report.target_rows([c32])[0][2] == "NO"


def refusal_probe(
    statuses: dict[int, int], with_retry_after: int | None = None, p99_ms: float = 2.0
) -> RefusalProbe:
    refused = statuses.get(503, 0)
    return RefusalProbe(
        report.OVERLOAD_C,
        2.0,
        statuses,
        {},
        refused,
        refused if with_retry_after is None else with_retry_after,
        1.0 if refused else 0.0,
        p99_ms if refused else 0.0,
    )


def c200_target(
    probe: RefusalProbe | None, goodput_rps: float = 6500, **errors: int
) -> report.Target:
    result = suite_result()
    tg = result.runs[report.TORCHGATE]
    # wrk's run of the point: 900 refusals among the answers, whatever else `errors` adds.
    tg.points["digits"].append(
        PointResult(
            200, 80_000, 10.0, goodput_rps, 20.0, 36.0, 40.0, 20.0, 80.0, {"status": 900, **errors}
        )
    )
    tg.overload = probe
    return {t.goal: t for t in report.targets(result)}[report.GOAL_C200]


def test_c200_target_needs_goodput_and_quick_503s_with_retry_after() -> None:
    good = c200_target(refusal_probe({200: 800, 503: 1200}))
    assert (good.met, good.verdict) == (True, "yes")
    assert "503 1,200 (all with Retry-After)" in good.measured
    assert "503 p50 1.00 ms, p99 2.00 ms" in good.measured
    # Nothing refused (every answer 2xx): the python client did not overload it, and how
    # refusals look was not seen.
    unseen = c200_target(refusal_probe({200: 2000}))
    assert (unseen.met, unseen.verdict) == (None, "goodput yes; refusals not measured")
    assert overload.judge(refusal_probe({200: 2000}))[1].startswith("no refusals seen")
    bare = c200_target(refusal_probe({200: 800, 503: 1200}, with_retry_after=1100))
    assert (bare.met, bare.verdict) == (False, "NO (refusals: 503 without Retry-After)")
    slow = c200_target(refusal_probe({200: 800, 503: 1200}, p99_ms=250.0))
    assert slow.verdict == "NO (refusals: 503 p99 over 100 ms)"
    other = c200_target(refusal_probe({200: 800, 500: 3, 503: 1200}))
    assert other.verdict == "NO (refusals: failures other than 503)"
    silent = c200_target(refusal_probe({}))
    assert silent.verdict == "NO (refusals: probe got no answers)"
    low = c200_target(refusal_probe({200: 800, 503: 1200}), goodput_rps=5000)
    assert (low.met, low.verdict) == (False, "NO (goodput: under 90%)")
    both = c200_target(refusal_probe({503: 10}, with_retry_after=0), goodput_rps=0)
    assert both.verdict == "NO (goodput: no 2xx; refusals: 503 without Retry-After)"
    # 503s are the point's expected errors; dropped connections are not.
    timeouts = c200_target(refusal_probe({200: 800, 503: 1200}), timeout=4)
    assert timeouts.verdict == "NO (goodput: errors)"
    missing = c200_target(None)
    assert (missing.met, missing.verdict) == (None, "goodput yes; refusals not measured")


def zero_point(concurrency: int, **errors: int) -> PointResult:
    """What wrk reports for a point that got nothing, or nothing but errors."""
    requests = errors.get("status", 0)
    return PointResult(concurrency, requests, 10.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, dict(errors))


def verdicts(result: report.SuiteResult) -> dict[str, str]:
    return {t.goal: t.verdict for t in report.targets(result)}


def test_targets_fail_on_points_without_2xx_or_with_errors() -> None:
    # A point with no requests reports p50 0 (the Lua p() returns 0): that is no pass.
    result = suite_result()
    result.runs[report.TORCHGATE].points["digits"][0] = zero_point(1)
    assert verdicts(result)[report.GOAL_C1] == "NO (no 2xx)"
    result.runs[report.TORCHGATE].points["digits"][0] = zero_point(1, status=500)
    assert verdicts(result)[report.GOAL_C1] == "NO (no 2xx)"
    erring = PointResult(1, 1000, 10.0, 99.0, 0.2, 0.3, 0.4, 0.2, 0.9, {"status": 10})
    result.runs[report.TORCHGATE].points["digits"][0] = erring
    assert verdicts(result)[report.GOAL_C1] == "NO (errors)"
    # A measured 0 req/s on either side of a ratio fails it, naming the side.
    result.runs[report.TORCHGATE].points["digits"][1] = zero_point(32, connect=5)
    assert verdicts(result)[report.GOAL_C32] == "NO (no 2xx)"
    result = suite_result()
    result.runs[report.TORCHSERVE].points["digits"][1] = zero_point(32)
    assert verdicts(result)[report.GOAL_C32] == "NO (TorchServe: no 2xx)"
    result = suite_result()
    result.runs[report.TORCHGATE].memory_loaded = Memory(0, 0)
    assert verdicts(result)[report.GOAL_PSS] == "NO (measured 0)"


def test_points_without_2xx_name_server_workload_and_concurrency() -> None:
    result = suite_result()
    assert report.points_without_2xx(result) == []
    result.runs[report.TORCHSERVE].points["digits"].append(zero_point(200, status=400))
    result.runs[report.TORCHGATE].ping = zero_point(1, connect=3)
    assert report.points_without_2xx(result) == [
        "TorchServe digits c=200",
        "torchgate GET /ping c=1",
    ]


def test_suite_exits_non_zero_when_a_point_got_no_2xx(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_answers(label: str, *args: object) -> report.ServerRun:
        return report.ServerRun(label, 1.0, Memory(1, 1), points={"digits": [zero_point(1)]})

    monkeypatch.setattr(suite, "run_server", no_answers)
    monkeypatch.setattr(suite.machine, "describe", lambda: suite_result().machine)
    argv = ["--servers", "torchgate", "--engine", "python", "--skip-raw"]
    assert suite.main([*argv, "--config", str(ROOT / "config.properties")]) == 1
    captured = capsys.readouterr()
    assert "NO (no 2xx)" in captured.out
    assert "no successful answer at: torchgate digits c=1" in captured.err


def test_suite_says_what_is_missing_instead_of_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(preflight.shutil, "which", lambda name: None)
    monkeypatch.setattr(preflight, "torchserve_launcher", lambda: Path("/nonexistent/torchserve"))
    assert suite.main(["--engine", "wrk"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("benchmark cannot start: ")
    assert "torchserve is not installed at /nonexistent/torchserve" in err
    assert "java is not on PATH" in err and "wrk is not on PATH" in err
    # torchgate alone with the python engine needs none of them.
    assert preflight.missing_tools(torchserve=False, wrk=False) == []


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signal handlers can only be set from the main thread",
)
def test_sigterm_and_sighup_become_system_exit_so_finally_blocks_run() -> None:
    before = signal.getsignal(signal.SIGTERM)
    cleaned = []
    for signum in (signal.SIGTERM, signal.SIGHUP):
        with pytest.raises(SystemExit) as stopped, preflight.exit_on_termination():
            try:
                os.kill(os.getpid(), signum)
                time.sleep(5)  # the handler's SystemExit interrupts it at once
            finally:
                cleaned.append(signum)
                # A second signal during the shutdown is ignored, not another SystemExit.
                os.kill(os.getpid(), signum)
        assert stopped.value.code == 128 + signum
    assert cleaned == [signal.SIGTERM, signal.SIGHUP]
    assert signal.getsignal(signal.SIGTERM) == before


# --- the refusal probe's bookkeeping -------------------------------------------------------------


def read_answer(raw: bytes) -> bench.Answer:
    async def parse() -> bench.Answer:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        return await bench.read_answer(reader)

    return asyncio.run(parse())


def test_read_answer_sees_status_keep_alive_and_retry_after() -> None:
    refused = read_answer(
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\ncontent-length: 2\r\n\r\n{}"
    )
    assert refused == bench.Answer(503, keep_alive=True, retry_after=True)
    bare = read_answer(b"HTTP/1.1 503 Busy\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert bare == bench.Answer(503, keep_alive=False, retry_after=False)
    chunked = read_answer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    )
    assert chunked == bench.Answer(200, keep_alive=True, retry_after=False)


def test_refusal_probe_summarizes_statuses_and_503_latencies() -> None:
    samples = Samples(
        latencies_s=[0.01] * 6,
        elapsed_s=2.0,
        errors=Counter({"status": 4, "timeout": 1}),
        statuses=Counter({200: 2, 503: 4}),
        refusals=[(0.001, True), (0.002, True), (0.003, False), (0.004, True)],
    )
    probe = overload.from_samples(200, samples)
    assert probe.statuses == {200: 2, 503: 4}
    assert probe.no_answer == {"timeout": 1}
    assert (probe.refused, probe.refused_with_retry_after) == (4, 3)
    assert (probe.refused_p50_ms, probe.refused_p99_ms) == pytest.approx((2.0, 4.0))
    assert overload.judge(probe) == (
        False,
        "requests without an answer, 503 without Retry-After",
    )
    assert overload.describe(probe) == (
        "2xx 2, 503 4 (3 of 4 with Retry-After), 503 p50 2.00 ms, p99 4.00 ms, no answer: timeout 1"
    )
    assert overload.judge(None) == (None, "refusals not measured")
    assert overload.probe_rows([("torchgate", probe)]) == [
        ["torchgate", "200", "2xx 2, 503 4", "3 of 4", "2.00", "4.00", "timeout 1"]
    ]


def test_targets_without_torchserve_are_not_measured() -> None:
    result = suite_result()
    del result.runs[report.TORCHSERVE]
    verdicts = [t.met for t in report.targets(result)]
    assert verdicts == [None, None, False, None, None, None]


def test_markdown_method_follows_the_run_settings() -> None:
    result = suite_result()
    result.settings.update(
        torchgate_threads="2 intra-op threads each",
        torchserve_threads="OMP_NUM_THREADS=1",
        digits_max_batch_delay="5 ms",
    )
    text = report.markdown(result)
    assert "torchgate's CPU workers use 2 intra-op threads each; TorchServe runs with " in text
    # Derived from the run: one TorchServe worker measured, 2 cores; no unmeasured claim.
    assert "a thread per core: 2 in each of its 1 workers, 2 threads on 2 cores" in text
    assert "several-fold" not in text
    assert "TorchServe waits up to maxBatchDelay (5 ms for digits)" in text
    assert "dispatches a batch at once when its worker is idle" in text
    assert "Latency percentiles are over all answers" in text
    assert "over all answers (errors included, not only 2xx)" in text
    assert "HTTP status >= 400 (wrk's rule)" in text
    assert "torchgate: its frontend, the zygote and the workers forked from it" in text
    assert "one process" not in text
    assert "cannot tell whether other work joined during the run" in text
    result.settings.update(engine="python", torchserve_threads="torch's default threads")
    text = report.markdown(result)
    assert "(wrk's rule)" not in text and "every HTTP status outside 2xx" in text
    assert "not comparable to a run with wrk" in text
    assert "torch's default would be" not in text
    assert "load: python" in report.console(result)


def test_markdown_shows_the_refusal_probe_when_there_was_one() -> None:
    result = suite_result()
    assert "## Refusals at c=200" not in report.markdown(result)
    assert "- Refusals:" not in report.markdown(result)
    result.runs[report.TORCHGATE].overload = refusal_probe({200: 800, 503: 1200})
    text = report.markdown(result)
    assert "## Refusals at c=200" in text and "- Refusals:" in text
    assert "| torchgate | 200 | 2xx 800, 503 1,200 | 1,200 of 1,200 | 1.00 | 2.00 | 0 |" in text
    assert "refusals at c=200" in report.console(result)


def test_with_section_replaces_an_earlier_run_and_appends_otherwise() -> None:
    heading = "## KServe v2"
    first = report.with_section("# Benchmarks\n\ntext\n", heading, f"{heading}\n\nrun 1\n")
    assert first == "# Benchmarks\n\ntext\n\n## KServe v2\n\nrun 1\n"
    again = report.with_section(first, heading, f"{heading}\n\nrun 2\n")
    assert again == "# Benchmarks\n\ntext\n\n## KServe v2\n\nrun 2\n"
    followed = report.with_section(first + "\n## Later\n\nkept\n", heading, f"{heading}\n\nrun 3\n")
    assert followed == "# Benchmarks\n\ntext\n\n## KServe v2\n\nrun 3\n\n## Later\n\nkept\n"
    assert report.with_section("", heading, f"{heading}\n") == f"{heading}\n"


def test_v2_caption_names_both_servers_thread_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    v2 = pytest.importorskip("benchmarks.v2_throughput")  # needs the generated gRPC stubs
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    caption = v2.caption(v2.build_parser().parse_args([]))
    assert "threads: torchgate 1 intra-op thread each, TorchServe OMP_NUM_THREADS=1;" in caption
    default = v2.caption(v2.build_parser().parse_args(["--torchserve-threads", "0"]))
    assert "TorchServe torch's default threads (OMP_NUM_THREADS unset)" in default


def test_thread_settings_in_words(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert torchgate_threads(None) == "1 intra-op thread each"
    assert torchgate_threads(3) == "3 intra-op threads each"
    assert torchserve_threads(1) == "OMP_NUM_THREADS=1"
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # inherited by both servers' workers
    assert torchgate_threads(None) == "OMP_NUM_THREADS=2 (from the environment)"
    assert torchserve_threads(None) == "OMP_NUM_THREADS=2 (from the environment)"


def test_markdown_holds_machine_tables_and_targets() -> None:
    text = report.markdown(suite_result())
    assert "Test CPU, 2 cores" in text
    assert "| c | TS req/s |" in text
    assert "| 32 | 3,000 | 10.00 |" in text
    assert "| torchgate | 400 | 420 | 360 | frontend, worker |" in text
    assert "share the same 2 cores" in text
    assert "| digits 1.0 | TorchScript | 1 | 8 | best of 5 | 40.0 | 5.0 |" in text
    assert "GET /ping" not in text  # not measured: no floor line
    result = suite_result()
    result.runs[report.TORCHSERVE].ping = point(1, 900, 1.1, 1.5)
    result.runs[report.TORCHGATE].ping = point(1, 5000, 0.2, 0.3)
    assert "p50: TorchServe 1.100 ms, torchgate 0.200 ms." in report.markdown(result)
    console = report.console(suite_result())
    assert "POST /predictions/digits" in console and "targets" in console


def test_cpu_model_from_cpuinfo() -> None:
    assert cpu_model("processor\t: 0\nmodel name\t: AMD EPYC 7B13\n") == "AMD EPYC 7B13"
    assert cpu_model("") == "unknown"


# --- real runs against a tiny server -------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    server: _Server

    def do_POST(self) -> None:
        received = self.rfile.read(int(self.headers.get("content-length", 0)))
        if len(self.server.seen) < 5:
            self.server.seen.append(
                (self.command, self.headers.get("content-type"), self.headers["x-check"], received)
            )
        body = b'{"ok": true}'
        self.send_response(500 if self.path == "/fail" else 200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    """Keeps the first requests it saw: (method, content type, X-Check, body)."""

    seen: list[tuple[str, str | None, str | None, bytes]]

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # load generators reset connections when they stop; that is not a failure


@pytest.fixture
def server() -> Iterator[_Server]:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.seen = []
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def tiny_server(server: _Server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_python_engine_counts_requests_and_non_2xx(tiny_server: str) -> None:
    spec = LoadSpec(f"{tiny_server}/ok", "POST", b"[1]", (("Content-Type", "application/json"),))
    result = bench.run_python(spec, concurrency=2, duration_s=0.3)
    assert result.engine == "python"
    assert result.requests > 0 and result.error_count == 0
    failing = bench.run_python(LoadSpec(f"{tiny_server}/fail"), concurrency=1, duration_s=0.2)
    assert failing.requests > 0 and failing.errors["status"] == failing.requests


def test_python_engine_counts_connect_errors() -> None:
    spec = LoadSpec("http://127.0.0.1:1/nothing-listens")
    result = bench.run_python(spec, concurrency=1, duration_s=0.1)
    assert result.requests == 0 and result.errors["connect"] > 0


def test_load_main_fails_when_a_point_got_no_successful_answer() -> None:
    argv = ["--url", "http://127.0.0.1:1/nothing-listens", "-c", "1", "-d", "1s", "--warmup", "0"]
    assert bench.main([*argv, "--engine", "python", "--json"]) == 1


def test_main_prints_one_json_document(
    tiny_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--url", f"{tiny_server}/ok", "--body-json", "[0.5]", "-c", "1,2"]
    code = bench.main([*argv, "-d", "1s", "--warmup", "0", "--engine", "python", "--json"])
    document = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [r["concurrency"] for r in document["results"]] == [1, 2]
    assert all(r["requests"] > 0 and r["error_count"] == 0 for r in document["results"])


needs_wrk = pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (scripts/install_tools.sh wrk)"
)


@needs_wrk
def test_wrk_posts_the_body_with_headers_and_reports_json(
    server: _Server, tiny_server: str
) -> None:
    spec = LoadSpec(
        f"{tiny_server}/ok",
        "POST",
        b'{"x": 1}',
        (("Content-Type", "application/json"), ("X-Check", "yes")),
        timeout_s=5,
    )
    result = bench.run_wrk(spec, concurrency=2, duration_s=1)
    assert result.engine == "wrk"
    assert result.requests > 0 and result.error_count == 0
    assert 0 < result.p50_ms <= result.p95_ms <= result.p99_ms <= result.max_ms
    assert server.seen[0] == ("POST", "application/json", "yes", b'{"x": 1}')


@needs_wrk
def test_wrk_counts_error_statuses(tiny_server: str) -> None:
    result = bench.run_wrk(LoadSpec(f"{tiny_server}/fail", timeout_s=5), 1, 1)
    assert result.requests > 0 and result.errors["status"] == result.requests


def test_memory_is_reported_per_process() -> None:
    rows = report.process_rows(suite_result())
    assert rows == [
        [report.TORCHSERVE, "java", "10", "600", "500"],
        [report.TORCHSERVE, "worker", "11", "600", "400"],
        [report.TORCHGATE, "frontend", "20", "120", "100"],
        [report.TORCHGATE, "worker", "22", "300", "260"],
    ]
    assert "| torchgate | frontend | 20 | 120 | 100 |" in report.markdown(suite_result())
