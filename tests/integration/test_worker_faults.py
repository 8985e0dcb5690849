"""A handler's crash, hang, interpreter-lock hog or failed start costs only its own requests.

A real `torchgate serve` hosts two archives built with torch-model-archiver: `faulty`, whose
handler does what its request body says (`os._exit`, a segfault through ctypes, sleep forever,
spin holding its interpreter's lock), and `steady`, a plain echo model. While each fault
happens, a client keeps sending requests to `steady`: none may fail, and none may wait long
(the frontend's event loop never runs handler code). The faulty version then serves again by
itself: its worker was restarted, no operator involved.

Other tests here: a handler whose `initialize` raises marks its version FAILED with the
handler's message after a few tries and recovers once the cause is gone; SIGTERM drains and
exits on one signal, hung handler and all; after a stop or a SIGKILL of the frontend no worker
process and no extracted archive is left behind, nor any process a handler started.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from api.rpc.generated import grpc_predict_v2_pb2 as v2
from api.rpc.generated import grpc_predict_v2_pb2_grpc as v2_grpc
from api.rpc.generated import inference_pb2 as inference
from api.rpc.generated import inference_pb2_grpc as inference_grpc
from tests.support.archives import ECHO, build_archive
from tests.support.processes import alive, descendants, parent_of, wait_until
from tests.support.server import (
    ROOT,
    TorchgateServer,
    running_torchgate,
    scale_workers,
    worker_pids,
)
from tests.support.torchserve import free_addresses

pytestmark = pytest.mark.integration

FAULTY = """
    import ctypes
    import os
    import subprocess
    import sys
    import time
    from multiprocessing import shared_memory

    started = []
    segments = []

    def handle(data, context):
        if data is None:
            return None
        out = []
        for row in data:
            body = row.get("body") or row.get("data")
            if isinstance(body, (bytes, bytearray)):
                body = body.decode()
            if body == "start":
                # A helper left in the worker's process group (subprocess's default), a daemon
                # in a session of its own, and a daemon that ends by itself soon.
                started.append(subprocess.Popen(["sleep", "600"]).pid)
                started.append(subprocess.Popen(["sleep", "600"], start_new_session=True).pid)
                started.append(subprocess.Popen(["sleep", "0.5"], start_new_session=True).pid)
            if body == "shm":  # shared memory it never unlinks: its resource tracker does
                segments.append(shared_memory.SharedMemory(create=True, size=4096))
            if body == "exit":
                os._exit(3)
            if body == "sysexit":  # not an Exception: the worker ends (TorchServe: 500 too)
                sys.exit(4)
            if body == "segv":
                ctypes.string_at(0)
            if body == "hang":
                time.sleep(3600)
            if body == "spin":  # pure Python: holds this worker's interpreter lock throughout
                end = time.monotonic() + 12
                while time.monotonic() < end:
                    pass
            out.append(
                {
                    "pid": os.getpid(),
                    "echo": body,
                    "helpers": started,
                    "segments": [segment.name for segment in segments],
                }
            )
        return out
"""

# Fails to start while FLAG exists; a request "crash" creates it and crashes the worker, so
# its replacements fail to start from then on (its weights "went missing").
FLAKY_INIT = """
    import os
    import time

    FLAG = {flag!r}

    class Handler:
        def initialize(self, context):
            if os.path.exists(FLAG):
                raise RuntimeError("weights are missing: " + FLAG)

        def handle(self, data, context):
            if any((row.get("body") or b"") == b"crash" for row in data):
                open(FLAG, "w").close()
                time.sleep(0.5)  # long enough for the next request to queue behind this one
                os._exit(1)
            return ["up"] * len(data)
"""

RESPONSE_TIMEOUT_S = 2


def config(store: Path, load: str, extra: str = "") -> str:
    return (
        f"model_store={store}\nload_models={load}\n"
        'models={"faulty": {"1.0": {"marName": "faulty.mar", "responseTimeout": '
        f"{RESPONSE_TIMEOUT_S}}}}}}}\n{extra}"
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    store = root / "store"
    store.mkdir()
    build_archive(root, "faulty", "faulty.py", {"faulty.py": FAULTY}, export_dir=store)
    build_archive(root, "steady", "echo.py", {"echo.py": ECHO}, export_dir=store)
    return store


@pytest.fixture(scope="module")
def server(store: Path) -> Iterator[TorchgateServer]:
    with running_torchgate(config(store, "faulty.mar,steady.mar")) as server:
        yield server


async def steady_traffic(url: str, stop: asyncio.Event) -> list[tuple[int, float]]:
    """(status, seconds) of each request to `steady`, one after another, until `stop`."""
    seen: list[tuple[int, float]] = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while not stop.is_set():
            started = time.monotonic()
            reply = await client.post("/predictions/steady", content=b"ping")
            seen.append((reply.status_code, time.monotonic() - started))
            await asyncio.sleep(0.01)
    return seen


@pytest.mark.parametrize(
    ("fault", "status", "message"),
    [
        ("exit", 500, "exit code 3"),
        ("sysexit", 500, "exit code 4"),
        ("segv", 500, "signal 11 (SIGSEGV)"),
        ("hang", 504, "responseTimeout"),
        ("spin", 504, "responseTimeout"),
    ],
)
def test_a_fault_costs_only_its_own_requests(
    server: TorchgateServer, fault: str, status: int, message: str
) -> None:
    [before] = worker_pids(server, "faulty")

    async def scenario() -> tuple[httpx.Response, list[tuple[int, float]], float]:
        stop = asyncio.Event()
        traffic = asyncio.create_task(steady_traffic(server.inference_url, stop))
        await asyncio.sleep(0.2)
        async with httpx.AsyncClient(base_url=server.inference_url, timeout=60) as client:
            started = time.monotonic()
            faulted = await client.post("/predictions/faulty", content=fault.encode())
            took = time.monotonic() - started
            # Serves again by itself: the next request is answered by a new worker.
            deadline = time.monotonic() + 20
            while (await client.post("/predictions/faulty", content=b"ok")).status_code != 200:
                assert time.monotonic() < deadline, "the faulty version did not come back"
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        stop.set()
        return faulted, await traffic, took

    faulted, seen, took = asyncio.run(scenario())
    assert faulted.status_code == status, faulted.text
    assert message in faulted.json()["message"]
    if status == 504:  # at the deadline, not when the handler would have let go
        assert took < RESPONSE_TIMEOUT_S + 2
    assert seen and all(code == 200 for code, _ in seen), [c for c, _ in seen if c != 200]
    # The event loop never waited on the fault: every steady request stayed fast. A loop that
    # waited would have held one for the response timeout at least; below that, the margin
    # is for a 2-core machine that also runs the spinning handler and other tests.
    assert max(seconds for _, seconds in seen) < RESPONSE_TIMEOUT_S * 0.75
    [after] = worker_pids(server, "faulty")
    assert after != before and not alive(before)
    described = httpx.get(f"{server.management_url}/models/faulty").json()[0]
    assert described["status"] == "READY"
    assert described["workers"][0]["restarts"] >= 1


def send_through(server: TorchgateServer, api: str, command: str) -> tuple[str, str]:
    """`command` to `faulty` through `api`; (outcome, message): "ok" with the answer, or the
    API's status (HTTP code or gRPC code name) with its error message."""
    if api == "v2-rest":
        tensor = {"name": "command", "shape": [1], "datatype": "BYTES", "data": [command]}
        reply = httpx.post(
            f"{server.inference_url}/v2/models/faulty/infer", json={"inputs": [tensor]}, timeout=60
        )
        if reply.status_code == 200:
            return "ok", json.dumps(reply.json()["outputs"])
        return str(reply.status_code), reply.json()["error"]
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_inference_port}") as channel:
        try:
            if api == "v2-grpc":
                request = v2.ModelInferRequest(model_name="faulty")
                request.inputs.add(
                    name="command", datatype="BYTES", shape=[1]
                ).contents.bytes_contents.append(command.encode())
                answer = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
                return "ok", str(answer.outputs)
            predict = inference.PredictionsRequest(
                model_name="faulty", input={"data": command.encode()}
            )
            stub = inference_grpc.InferenceAPIsServiceStub(channel)
            return "ok", stub.Predictions(predict, timeout=60).prediction.decode()
        except grpc.RpcError as exc:
            return exc.code().name, exc.details() or ""


@pytest.mark.parametrize(
    ("api", "failed"),
    [("v2-rest", "500"), ("v2-grpc", "INTERNAL"), ("torchserve-grpc", "INTERNAL")],
)
def test_a_crash_fails_only_its_request_on_every_api(
    server: TorchgateServer, api: str, failed: str
) -> None:
    """The crash of the test above, through KServe v2 (REST, gRPC) and TorchServe's gRPC API:
    the request fails with that API's code for a server error, naming the exit, and the
    version serves again through the same API."""
    [before] = worker_pids(server, "faulty")
    assert send_through(server, api, "ok")[0] == "ok"
    outcome, message = send_through(server, api, "exit")
    assert (outcome, "exit code 3" in message) == (failed, True), message
    deadline = time.monotonic() + 20
    while send_through(server, api, "ok")[0] != "ok":
        assert time.monotonic() < deadline, "the faulty version did not come back"
        time.sleep(0.05)
    [after] = worker_pids(server, "faulty")
    assert after != before and not alive(before)


def test_requests_queued_behind_a_crash_are_served_by_the_replacement(
    server: TorchgateServer,
) -> None:
    async def scenario() -> list[int]:
        async with httpx.AsyncClient(base_url=server.inference_url, timeout=60) as client:
            hang = asyncio.create_task(client.post("/predictions/faulty", content=b"hang"))
            await asyncio.sleep(0.3)
            queued = [
                asyncio.create_task(client.post("/predictions/faulty", content=b"ok"))
                for _ in range(3)
            ]
            return [(await hang).status_code] + [(await r).status_code for r in queued]

    statuses = asyncio.run(scenario())
    # The hung batch answers 504; the queued requests share its deadline window, so each gets
    # either the replacement's answer or its own 504, never a 500 from the killed worker.
    assert statuses[0] == 504
    assert all(code in (200, 504) for code in statuses[1:]), statuses


def test_scaling_down_past_a_hung_worker_takes_at_most_a_response_timeout(
    server: TorchgateServer,
) -> None:
    """Scale-down while one of two workers hangs in its handler: the hung batch gets its
    responseTimeout, no more, then 504; the scale answers, and no process of the stopped
    workers is left. The version then serves again once scaled back up."""
    scale = functools.partial(scale_workers, server, "faulty")
    assert scale(2).status_code == 200
    workers = worker_pids(server, "faulty")
    assert len(workers) == 2

    async def scenario() -> tuple[httpx.Response, httpx.Response, float]:
        async with httpx.AsyncClient(base_url=server.inference_url, timeout=60) as client:
            hang = asyncio.create_task(client.post("/predictions/faulty", content=b"hang"))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            scaled = await asyncio.to_thread(scale, 0)
            return scaled, await hang, time.monotonic() - started

    try:
        scaled, hung, took = asyncio.run(scenario())
        assert scaled.status_code == 200, scaled.text
        assert took < RESPONSE_TIMEOUT_S + 3
        assert hung.status_code == 504
        wait_until(lambda: [pid for pid in workers if alive(pid)] == [], 10)
    finally:
        assert scale(1).status_code == 200
    assert (
        httpx.post(f"{server.inference_url}/predictions/faulty", content=b"ok").status_code == 200
    )


def test_shared_memory_a_crashed_handler_left_is_unlinked(server: TorchgateServer) -> None:
    """The zygote SIGKILLed a dead worker's whole process group, Python's resource tracker
    included, so the shared memory a handler left stayed in /dev/shm (64 MB in Docker) after
    every crash, timeout, scale-down and stop. The tracker now outlives the worker long enough
    to unlink it, as it does under TorchServe, which kills the worker process only."""
    url = f"{server.inference_url}/predictions/faulty"
    [name] = httpx.post(url, content=b"shm").json()["segments"]
    segment = Path("/dev/shm") / name.lstrip("/")
    try:
        assert segment.exists()
        assert httpx.post(url, content=b"exit").status_code == 500
        wait_until(lambda: not segment.exists(), timeout=10)
    finally:
        segment.unlink(missing_ok=True)


def test_worker_logs_reach_the_server_log_under_the_models_name(
    server: TorchgateServer,
) -> None:
    log = server.log_text()
    assert "[faulty/1.0 w0]" in log
    assert "Segmentation fault" in log or "signal 11" in log


def test_a_handler_failing_to_start_marks_its_version_failed_then_recovers(
    tmp_path: Path,
) -> None:
    flag = tmp_path / "missing-weights"
    flag.touch()
    store = tmp_path / "store"
    store.mkdir()
    source = FLAKY_INIT.format(flag=str(flag))
    # The server's health (/ping) counts a failing worker until it has failed for
    # maxRetryTimeoutInSec (TorchServe's 300 s by default): 1 s here.
    files = {"flaky.py": source, "model-config.yaml": "maxRetryTimeoutInSec: 1\n"}
    build_archive(
        tmp_path, "flaky", "flaky.py", files, config="model-config.yaml", export_dir=store
    )
    build_archive(tmp_path, "steady", "echo.py", {"echo.py": ECHO}, export_dir=store)
    with running_torchgate(config(store, "flaky.mar,steady.mar"), healthy=False) as server:
        management = httpx.Client(base_url=server.management_url)

        def status() -> dict[str, Any]:
            described: dict[str, Any] = management.get("/models/flaky").json()[0]
            return described

        wait_until(lambda: status()["status"] == "FAILED")
        described = status()
        assert "weights are missing" in described["error"]
        assert described["workers"][0]["status"] == "FAILED"
        refused = httpx.post(f"{server.inference_url}/predictions/flaky", content=b"x")
        assert refused.status_code == 503
        assert "weights are missing" in refused.json()["message"]
        assert httpx.get(f"{server.inference_url}/v2/models/flaky/ready").status_code == 503
        assert status()["maxRetryTimeoutInSec"] == 1
        wait_until(lambda: httpx.get(f"{server.inference_url}/ping").status_code == 500)
        unhealthy = httpx.get(f"{server.inference_url}/ping")
        assert (unhealthy.status_code, unhealthy.json()) == (500, {"status": "Unhealthy"})
        assert httpx.head(f"{server.inference_url}/ping").status_code == 500  # probes use HEAD
        assert httpx.post(f"{server.inference_url}/predictions/steady", content=b"x").text == "x"

        flag.unlink()  # the cause is fixed: the retries find it, no operator needed
        wait_until(lambda: status()["status"] == "READY", timeout=30)
        answer = httpx.post(f"{server.inference_url}/predictions/flaky", content=b"x")
        assert answer.text == "up"
        assert httpx.get(f"{server.inference_url}/ping").status_code == 200


def test_deleting_a_version_with_no_live_worker_answers_once_its_queue_was_answered(
    tmp_path: Path,
) -> None:
    """A request queued behind a crash, with no replacement able to start, is answered 503
    with the handler's error once the version is FAILED (it waited for its deadline's 504
    before), well within its responseTimeout; a DELETE then unloads the version at once (it
    waited forever for such a request to leave the queue, and the version's workers kept
    being restarted)."""
    flag = tmp_path / "crashed"
    store = tmp_path / "store"
    store.mkdir()
    files = {"crashy.py": FLAKY_INIT.format(flag=str(flag))}
    build_archive(tmp_path, "crashy", "crashy.py", files, export_dir=store)
    # FAILED after 3 failed starts (backoff 0 + 0.25 + 0.5 s): a deadline of 60 s leaves
    # no doubt which answers first.
    settings = 'models={"crashy": {"1.0": {"responseTimeout": 60}}}\n'
    text = f"model_store={store}\nload_models=crashy.mar\nenable_model_api=true\n{settings}"
    with running_torchgate(text) as server:

        async def scenario() -> tuple[int, httpx.Response]:
            async with httpx.AsyncClient(base_url=server.inference_url, timeout=90) as client:
                crash = asyncio.create_task(client.post("/predictions/crashy", content=b"crash"))
                await asyncio.sleep(0.2)  # "crash" runs: "ok" queues behind it
                queued = await client.post("/predictions/crashy", content=b"ok")
                return (await crash).status_code, queued

        crashed, queued = asyncio.run(scenario())
        assert (crashed, queued.status_code) == (500, 503)
        assert "failed to initialize: RuntimeError: weights are missing" in queued.json()["message"]
        assert flag.exists()
        deleted = httpx.delete(f"{server.management_url}/models/crashy", timeout=30)
        assert deleted.status_code == 200, deleted.text
        assert httpx.get(f"{server.management_url}/models/crashy").status_code == 404


def test_sigterm_drains_a_hung_handler_and_exits_on_one_signal(store: Path) -> None:
    with running_torchgate(config(store, "faulty.mar,steady.mar")) as server:
        pids = worker_pids(server, "faulty") + worker_pids(server, "steady")
        zygote = parent_of(pids[0])

        async def scenario() -> tuple[int, float, int]:
            async with httpx.AsyncClient(base_url=server.inference_url, timeout=60) as client:
                hang = asyncio.create_task(client.post("/predictions/faulty", content=b"hang"))
                await asyncio.sleep(0.3)
                server.process.send_signal(signal.SIGTERM)
                started = time.monotonic()
                reply = await hang
                code = await asyncio.to_thread(server.process.wait, 30)
                return reply.status_code, time.monotonic() - started, code

        status, took, code = asyncio.run(scenario())
        assert status == 504  # answered at its deadline, not dropped
        assert code == 0
        assert took < RESPONSE_TIMEOUT_S + 10
        for pid in [*pids, zygote]:
            wait_until(lambda pid=pid: not alive(pid), timeout=10)


LOADS_FOREVER = """
    import time
    from pathlib import Path

    class Handler:
        def initialize(self, context):
            Path({marker!r}).touch()
            time.sleep(600)  # a very large model

        def handle(self, data, context):
            return ["up"] * len(data)
"""


def test_sigterm_while_the_start_up_models_load_stops_at_once(tmp_path: Path) -> None:
    """A stop during start-up does not wait for loading to end (up to every model's
    startupTimeout, 120 s here) and never reports the server ready."""
    marker = tmp_path / "loading"
    store = tmp_path / "store"
    store.mkdir()
    files = {"slow.py": LOADS_FOREVER.format(marker=str(marker))}
    build_archive(tmp_path, "slow", "slow.py", files, export_dir=store)
    addresses = "".join(f"{key}={value}\n" for key, value in free_addresses().items())
    config_path = tmp_path / "config.properties"
    config_path.write_text(f"model_store={store}\nload_models=slow.mar\n{addresses}")
    log_path = tmp_path / "torchgate.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve", "--config", str(config_path)],
            cwd=tmp_path,  # its logs/ (TorchServe's log files) there, not in the repository
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(marker.exists, timeout=60)
        below = descendants(process.pid)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert "torchgate serving" not in log_path.read_text()
    for pid in below:
        wait_until(lambda pid=pid: not alive(pid), timeout=10)


def test_nothing_outlives_a_killed_frontend(store: Path) -> None:
    with running_torchgate(config(store, "faulty.mar,steady.mar")) as server:
        pids = worker_pids(server, "faulty") + worker_pids(server, "steady")
        zygote = parent_of(pids[0])
        model_dirs = [Path(os.readlink(f"/proc/{pid}/cwd")) for pid in pids]
        assert all(d.exists() for d in model_dirs)
        server.kill()  # SIGKILL: no drain, no cleanup code in the frontend runs
        for pid in [*pids, zygote]:
            wait_until(lambda pid=pid: not alive(pid), timeout=10)
        wait_until(lambda: not any(d.exists() for d in model_dirs), timeout=10)


def test_what_a_handler_starts_ends_with_its_worker_or_with_the_server(store: Path) -> None:
    with running_torchgate(config(store, "faulty.mar")) as server:

        def post(body: bytes) -> httpx.Response:
            return httpx.post(f"{server.inference_url}/predictions/faulty", content=body)

        in_group, daemon, brief = post(b"start").json()["helpers"]
        [worker] = worker_pids(server, "faulty")
        zygote = parent_of(worker)
        assert post(b"exit").status_code == 500
        # The crashed worker's group went with it; its daemons were adopted by the zygote,
        # which reaps the one that ended (no zombie left) and keeps the other until it stops:
        # it cannot tell which worker a daemon serves.
        wait_until(lambda: not alive(in_group))
        wait_until(lambda: not Path(f"/proc/{brief}").exists())
        assert parent_of(daemon) == zygote
        wait_until(lambda: post(b"start").status_code == 200)
        replacement = post(b"again").json()["helpers"]
        server.kill()  # SIGKILL: the zygote ends everything on its own
        for pid in [daemon, *replacement, zygote]:
            wait_until(lambda pid=pid: not alive(pid), timeout=10)


def test_a_killed_zygote_takes_the_helpers_in_its_workers_groups_along(store: Path) -> None:
    with running_torchgate(config(store, "faulty.mar")) as server:
        url = f"{server.inference_url}/predictions/faulty"
        in_group, daemon, _ = httpx.post(url, content=b"start").json()["helpers"]
        [worker] = worker_pids(server, "faulty")
        try:
            os.kill(parent_of(worker), signal.SIGKILL)  # as the OOM killer would
            wait_until(lambda: not alive(worker), timeout=10)
            # The frontend ends the worker's group; the daemon left it, so goes to init
            # (docs/architecture.md says so), and this test ends it itself.
            wait_until(lambda: not alive(in_group), timeout=10)
            wait_until(lambda: httpx.post(url, content=b"x").status_code == 200)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(daemon, signal.SIGKILL)


def test_the_frontend_never_loads_torch_or_handler_code(server: TorchgateServer) -> None:
    """libtorch is mapped in the workers (and their zygote), never in the serving process."""
    httpx.post(f"{server.inference_url}/predictions/steady", content=b"x").raise_for_status()
    frontend = Path(f"/proc/{server.process.pid}/maps").read_text()
    assert "libtorch" not in frontend
    [worker] = worker_pids(server, "steady")
    assert "libtorch" in Path(f"/proc/{worker}/maps").read_text()
    assert Path(os.readlink(f"/proc/{worker}/cwd")).name.startswith("steady")
