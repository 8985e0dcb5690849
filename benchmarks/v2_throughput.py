"""KServe v2 throughput on digits, next to TorchServe's own REST API, in one run.

    .venv/bin/python -m benchmarks.v2_throughput [--concurrency 32] [--duration 5] [--rounds 3]

Starts `torchgate serve` and a real TorchServe 0.12 side by side, on the same copy of
config.properties with only digits 1.0 loaded (TorchScript, batchSize 8, maxBatchDelay 5 ms, one
worker), and drives each closed-loop at `--concurrency` requests in flight, one image per request,
in interleaved rounds (each row is its median round, so background load hits all rows alike):

    torchgate  v2 gRPC, binary    grpc.aio with pre-serialized ModelInferRequest bytes
                                  (raw_input_contents); the cheapest client Python has
    torchgate  v2 gRPC, binary    tritonclient.grpc.aio, as a Triton user would call it
    torchgate  v2 REST, JSON      wrk (benchmarks.load's Lua script) posting the v2 JSON body
    torchgate  v2 REST, binary    wrk, Triton's binary tensor extension
    torchgate  /predictions       wrk, a JSON array of 64 numbers
    TorchServe /predictions       wrk, the same body

Both servers' workers run one intra-op thread, as in the main suite (`benchmarks.servers`:
TorchServe with OMP_NUM_THREADS=1 unless `--torchserve-threads` says otherwise); the caption
says which. Without wrk (`scripts/install_tools.sh wrk`) the HTTP rows use benchmarks.load's
asyncio client, which saturates an order of magnitude earlier (a warning says so, and the client
column names it). `--append` writes the table into a markdown report, replacing the section an
earlier run wrote there. Clients and servers share the machine's cores, so
besides throughput each row reports the CPU time per request of the server (its whole process
tree: TorchServe's Java frontend and Python worker) and of the client (this process for the gRPC
rows, wrk for the others): on a 2-core machine a Python gRPC client costs about as much CPU per
call as the server does, and the throughput of those rows is the client's as much as the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import resource
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson
import psutil

from api.rpc.generated import grpc_predict_v2_pb2 as pb
from benchmarks import preflight, report, servers
from benchmarks.load import (
    Engine,
    LoadSpec,
    PointResult,
    parse_duration,
    parse_measured_duration,
    pick_engine,
    render_table,
    summarize,
)
from tests.support.server import running_torchgate

ROOT = Path(__file__).resolve().parents[1]
MODEL_STORE = ROOT / "model_store"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
HEADER_LENGTH = "Inference-Header-Content-Length"

# digits 1.0 alone, batched as in the repository's config.properties.
CONFIG = """\
model_store={store}
load_models=digits.mar
disable_token_authorization=true
metrics_mode=prometheus
job_queue_size=100
models={{"digits": {{"1.0": {{"defaultVersion": true, "marName": "digits.mar", \\
  "minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 5, \\
  "responseTimeout": 30}}}}}}
"""

Call = Callable[[], Awaitable[bool]]  # one request; True when it succeeded


class CpuMeter:
    """CPU seconds (user + system) used by a server's process tree and by the client."""

    def __init__(self, server_pid: int) -> None:
        self.server = psutil.Process(server_pid)
        self._start = (0.0, 0.0)
        self.server_s = self.client_s = 0.0

    def start(self) -> None:
        self._start = (self._server_cpu(), self._client_cpu())

    def stop(self) -> None:
        self.server_s = self._server_cpu() - self._start[0]
        self.client_s = self._client_cpu() - self._start[1]

    def _server_cpu(self) -> float:
        total = 0.0
        for process in [self.server, *self.server.children(recursive=True)]:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    @staticmethod
    def _client_cpu() -> float:
        """This process, plus finished children (wrk, once it has exited)."""
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclasses.dataclass(frozen=True, slots=True)
class Measured:
    result: PointResult
    server_us: float  # server CPU per request
    client_us: float  # client CPU per request


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    server: str
    api: str
    client: str
    measured: Measured


def pixels() -> np.ndarray:
    """One digit-like image, [1, 64] FP32 in 0..16."""
    return np.random.default_rng(0).uniform(0, 16, (1, 64)).astype(np.float32)


def v2_json_body(image: np.ndarray) -> bytes:
    tensor = {"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": image.ravel()}
    return orjson.dumps({"inputs": [tensor]}, option=orjson.OPT_SERIALIZE_NUMPY)


def v2_binary_body(image: np.ndarray) -> tuple[bytes, int]:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "shape": [1, 64],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": image.nbytes},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    )
    return header + image.tobytes(), len(header)


def grpc_request(image: np.ndarray) -> bytes:
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(image.tobytes())
    return bytes(request.SerializeToString())


# -- closed-loop gRPC load -----------------------------------------------------------------------


async def closed_loop(call: Call, concurrency: int, duration_s: float) -> PointResult:
    """`concurrency` tasks, each sending its next call when the previous one answered."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    clock = time.perf_counter
    started = clock()
    deadline = started + duration_s

    async def loop() -> None:
        while clock() < deadline:
            sent = clock()
            try:
                ok = await call()
            except grpc.aio.AioRpcError:
                ok = False
            latencies.append(clock() - sent)
            if not ok:
                errors["status"] += 1

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return summarize(concurrency, latencies, clock() - started, dict(errors))


async def raw_grpc(port: int) -> tuple[Call, Callable[[], Awaitable[None]]]:
    """grpc.aio with the request serialized once and the response left unparsed."""
    request = grpc_request(pixels())
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    infer = channel.unary_unary(MODEL_INFER)  # bytes in, bytes out: no (de)serializers
    answer = pb.ModelInferResponse.FromString(await infer(request))
    assert len(answer.raw_output_contents[0]) == 40, answer  # [1, 10] FP32

    async def call() -> bool:
        await infer(request)
        return True

    return call, channel.close


async def tritonclient_grpc(port: int) -> tuple[Call, Callable[[], Awaitable[None]]]:
    """tritonclient.grpc.aio: builds the request and parses the answer on every call."""
    import tritonclient.grpc as triton
    import tritonclient.grpc.aio as triton_aio

    client = triton_aio.InferenceServerClient(f"127.0.0.1:{port}")
    tensor = triton.InferInput("pixels", [1, 64], "FP32")
    tensor.set_data_from_numpy(pixels())

    async def call() -> bool:
        result = await client.infer("digits", [tensor])
        return bool(result.as_numpy("probabilities").shape == (1, 10))

    return call, client.close


GrpcClient = Callable[[int], Coroutine[Any, Any, tuple[Call, Callable[[], Awaitable[None]]]]]


# -- the run ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Case:
    """One row: how to measure it once (concurrency, seconds, warm-up seconds)."""

    server: str
    api: str
    client: str
    measure: Callable[[int, float, float], Measured]


def per_request(meter: CpuMeter, result: PointResult) -> Measured:
    count = max(result.requests, 1)
    return Measured(result, meter.server_s / count * 1e6, meter.client_s / count * 1e6)


def grpc_case(server_pid: int, port: int, client: str, connect: GrpcClient) -> Case:
    async def once(concurrency: int, duration_s: float, warmup_s: float) -> Measured:
        call, close = await connect(port)
        try:
            await closed_loop(call, concurrency, warmup_s)
            meter = CpuMeter(server_pid)
            meter.start()
            result = await closed_loop(call, concurrency, duration_s)
            meter.stop()
            return per_request(meter, result)
        finally:
            await close()

    def run_once(concurrency: int, duration_s: float, warmup_s: float) -> Measured:
        return asyncio.run(once(concurrency, duration_s, warmup_s))

    return Case("torchgate", "v2 gRPC, binary", client, run_once)


def http_case(
    server: str, server_pid: int, api: str, spec: LoadSpec, engine: tuple[str, Engine]
) -> Case:
    engine_name, run_engine = engine

    def once(concurrency: int, duration_s: float, warmup_s: float) -> Measured:
        if warmup_s > 0:
            run_engine(spec, concurrency, warmup_s)
        meter = CpuMeter(server_pid)
        meter.start()
        result = run_engine(spec, concurrency, duration_s)
        meter.stop()
        return per_request(meter, result)

    return Case(server, api, engine_name, once)


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    url: str  # inference URL, no trailing slash
    pid: int  # root of the server's process tree


def cases(torchgate: Target, grpc_port: int, torchserve: Target | None) -> list[Case]:
    engine = pick_engine("auto")  # once: without wrk it warns
    image = pixels()
    binary, header_length = v2_binary_body(image)
    json_type = ("Content-Type", "application/json")
    binary_headers = (
        ("Content-Type", "application/octet-stream"),
        (HEADER_LENGTH, str(header_length)),
    )
    infer = f"{torchgate.url}/v2/models/digits/infer"
    predictions = orjson.dumps(image.ravel().tolist())
    tg = torchgate.pid
    found = [
        grpc_case(tg, grpc_port, "grpc.aio, raw bytes", raw_grpc),
        grpc_case(tg, grpc_port, "tritonclient.grpc.aio", tritonclient_grpc),
        http_case(
            "torchgate",
            tg,
            "v2 REST, JSON",
            LoadSpec(infer, "POST", v2_json_body(image), (json_type,)),
            engine,
        ),
        http_case(
            "torchgate",
            tg,
            "v2 REST, binary",
            LoadSpec(infer, "POST", binary, binary_headers),
            engine,
        ),
        http_case(
            "torchgate",
            tg,
            "/predictions",
            LoadSpec(f"{torchgate.url}/predictions/digits", "POST", predictions, (json_type,)),
            engine,
        ),
    ]
    if torchserve is not None:
        spec = LoadSpec(f"{torchserve.url}/predictions/digits", "POST", predictions, (json_type,))
        found.append(http_case("TorchServe", torchserve.pid, "/predictions", spec, engine))
    return found


def measure_rounds(found: Sequence[Case], options: argparse.Namespace) -> list[Row]:
    """Every case once per round, rounds interleaved; each row is its median-throughput round.

    Interleaving spreads whatever else the machine does over all rows alike.
    """
    results: dict[int, list[Measured]] = {index: [] for index in range(len(found))}
    for round_index in range(options.rounds):
        for index, case in enumerate(found):
            measured = case.measure(options.concurrency, options.duration, options.warmup)
            results[index].append(measured)
            print(
                f"  round {round_index + 1}: {case.server} {case.api} ({case.client}): "
                f"{measured.result.rps:.0f} req/s",
                file=sys.stderr,
                flush=True,
            )
    rows = []
    for index, case in enumerate(found):
        ordered = sorted(results[index], key=lambda measured: measured.result.rps)
        rows.append(Row(case.server, case.api, case.client, ordered[len(ordered) // 2]))
    return rows


def run(options: argparse.Namespace) -> list[Row]:
    """Both servers up side by side (an idle one costs next to nothing), then the rounds."""
    with tempfile.TemporaryDirectory(prefix="v2-throughput-") as tmp, ExitStack() as stack:
        config = Path(tmp, "config.properties")
        config.write_text(CONFIG.format(store=MODEL_STORE))
        # Default logging for both: an access-log line per request, to a file (see
        # benchmarks/servers.py).
        tg = stack.enter_context(running_torchgate(config, workdir=Path(tmp, "torchgate")))
        torchserve = None
        if not options.skip_torchserve:
            # As the main suite starts it: OMP_NUM_THREADS for its workers (else torch gives
            # each a thread per core, and the row measures oversubscription).
            ts = stack.enter_context(
                servers.torchserve(
                    MODEL_STORE, config, omp_threads=options.torchserve_threads or None
                )
            )
            torchserve = Target(ts.inference_url, ts.root_pid)
        torchgate = Target(tg.inference_url, tg.process.pid)
        return measure_rounds(cases(torchgate, tg.grpc_inference_port, torchserve), options)


def table(rows: Sequence[Row]) -> str:
    header = ["server", "API", "client", "req/s", "p50 ms", "p99 ms", "errors"]
    header += ["server CPU µs/req", "client CPU µs/req"]
    body = [
        [
            row.server,
            row.api,
            row.client,
            f"{row.measured.result.rps:,.0f}",
            f"{row.measured.result.p50_ms:.2f}",
            f"{row.measured.result.p99_ms:.2f}",
            str(row.measured.result.error_count),
            f"{row.measured.server_us:.0f}",
            f"{row.measured.client_us:.0f}",
        ]
        for row in rows
    ]
    return render_table(header, body)


SECTION = (
    "## KServe v2 REST and gRPC next to TorchServe REST (`python -m benchmarks.v2_throughput`)"
)


def caption(options: argparse.Namespace) -> str:
    threads = f"threads: torchgate {servers.torchgate_threads(None)}"
    if not options.skip_torchserve:
        threads += f", TorchServe {servers.torchserve_threads(options.torchserve_threads or None)}"
    return (
        f"digits 1.0, batchSize 8, maxBatchDelay 5 ms, one worker; {threads}; concurrency "
        f"{options.concurrency}; median of {options.rounds} interleaved runs of "
        f"{options.duration:g} s per row; {os.cpu_count()} CPU cores shared by clients and servers"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--duration", type=parse_measured_duration, default=5.0, help="measured per run (5s)"
    )
    parser.add_argument("--warmup", type=parse_duration, default=1.0, help="discarded per run (1s)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per row; the median counts")
    parser.add_argument("--skip-torchserve", action="store_true")
    parser.add_argument(
        "--torchserve-threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS for TorchServe's worker, as in `python -m benchmarks` (default: 1;"
        " 0: torch's default, a thread per core)",
    )
    parser.add_argument(
        "--append",
        type=Path,
        help="write the table into this markdown report (replacing an earlier run's section)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    options = parser.parse_args(argv)
    if not (MODEL_STORE / "digits.mar").exists():
        parser.error(f"{MODEL_STORE / 'digits.mar'} is missing: run `torchgate export --all`")
    missing = preflight.missing_tools(torchserve=not options.skip_torchserve, wrk=False)
    if missing:
        print("v2_throughput cannot start: " + "; ".join(missing), file=sys.stderr)
        return 1
    try:
        with preflight.exit_on_termination():
            rows = run(options)
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"v2_throughput aborted: {exc}", file=sys.stderr)
        return 1
    text = caption(options)
    print(text)
    print(table(rows))
    if options.append is not None:
        existing = options.append.read_text() if options.append.exists() else ""
        section = f"{SECTION}\n\n{text}.\n\n{table(rows)}\n"
        options.append.write_text(report.with_section(existing, SECTION, section))
    return 0


if __name__ == "__main__":
    sys.exit(main())
