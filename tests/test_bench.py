"""`benchmarks.load` (closed-loop load) and the benchmark suite's tables: parsing and aggregation
without load, then short real runs (python engine always, wrk when installed) against a stdlib
HTTP server."""

from __future__ import annotations

import argparse
import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from benchmarks import load as bench
from benchmarks import report
from benchmarks.load import BenchError, LoadSpec, PointResult
from benchmarks.machine import Machine, cpu_model
from benchmarks.raw import RawResult
from benchmarks.servers import Memory, ProcessMemory

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
    c200 = found["digits c=200: 2xx goodput >= 90% of torchgate's c=32 req/s"]
    assert c200.met is True and c200.measured.startswith("93%")
    c1 = found["digits c=1: torchgate p50 <= 0.3 ms"]
    assert c1.met is False and c1.measured == "0.400 ms"
    minilm = found["minilm c=32: >= 90% of the handler's sustained batched throughput in-process"]
    assert minilm.met is True and minilm.measured.startswith("95%")  # 950 of 1,000 items/s
    pss = found["PSS serving the example models <= 50% of TorchServe's"]
    assert pss.met is True and pss.measured.startswith("40%")
    assert found["start-up to all versions ready <= 50% of TorchServe's"].met is True


def test_targets_without_torchserve_are_not_measured() -> None:
    result = suite_result()
    del result.runs[report.TORCHSERVE]
    verdicts = [t.met for t in report.targets(result)]
    assert verdicts == [None, None, False, None, None, None]


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


def test_main_prints_one_json_document(
    tiny_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--url", f"{tiny_server}/ok", "--body-json", "[0.5]", "-c", "1,2"]
    code = bench.main([*argv, "-d", "200ms", "--warmup", "0", "--engine", "python", "--json"])
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
