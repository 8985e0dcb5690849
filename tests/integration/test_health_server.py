"""Health, readiness, worker bounds and leftovers against a real `torchgate serve`.

A model scaled to 0 workers on purpose leaves `/ping` (and v2's server ready) healthy, as in
TorchServe, while that model itself reports not ready on every API with the reason; worker
counts above `torchgate.max_workers_per_model` are refused (400 naming the bound) or, at
start-up, clamped; and the extracted archives of a server killed with its zygote are removed by
the next server to start, never those of a server still running.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from api.rpc.generated import grpc_predict_v2_pb2 as pb
from api.rpc.generated import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.support.archives import ECHO, build_archive
from tests.support.processes import alive, parent_of, wait_until
from tests.support.server import TorchgateServer, running_torchgate, worker_pids

pytestmark = pytest.mark.integration

BOUND = 3


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("health")
    store = root / "store"
    store.mkdir()
    for name in ("steady", "idle", "wide"):
        build_archive(root, name, "echo.py", {"echo.py": ECHO}, export_dir=store)
    return store


@pytest.fixture(scope="module")
def server(store: Path) -> Iterator[TorchgateServer]:
    config = (
        f"model_store={store}\nload_models=steady.mar,wide.mar\nenable_model_api=true\n"
        f"torchgate.max_workers_per_model={BOUND}\n"
        'models={"wide": {"1.0": {"marName": "wide.mar", "minWorkers": 5, "maxWorkers": 8}}}\n'
    )
    with running_torchgate(config) as server:
        yield server


def model_ready_grpc(server: TorchgateServer, name: str) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_inference_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        ready: bool = stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=10).ready
        return ready


def test_a_model_scaled_to_zero_is_not_ready_but_the_server_is_healthy(
    server: TorchgateServer,
) -> None:
    inference, management = server.inference_url, server.management_url
    scaled = httpx.put(f"{management}/models/steady?min_worker=0&synchronous=true")
    assert scaled.status_code == 200, scaled.text
    try:
        ping = httpx.get(f"{inference}/ping")
        assert (ping.status_code, ping.json()) == (200, {"status": "Healthy"})
        assert httpx.get(f"{inference}/v2/health/ready").status_code == 200
        for path in ("/v2/models/steady/ready", "/v2/models/steady/versions/1.0/ready"):
            answer = httpx.get(f"{inference}{path}")
            assert (answer.status_code, answer.json()) == (503, {"name": "steady", "ready": False})
        assert not model_ready_grpc(server, "steady")
        [described] = httpx.get(f"{management}/models/steady").json()
        assert described["workers"] == [] and described["ready"] is False
        assert described["unavailable"] == "Model steady version 1.0 has no workers"
        refused = httpx.post(f"{inference}/predictions/steady", content=b"x")
        assert refused.status_code == 503
        assert "has no workers" in refused.json()["message"]
    finally:
        httpx.put(f"{management}/models/steady?min_worker=1&synchronous=true").raise_for_status()
    assert httpx.post(f"{inference}/predictions/steady", content=b"x").status_code == 200
    assert httpx.get(f"{inference}/v2/models/steady/ready").status_code == 200
    assert model_ready_grpc(server, "steady")
    [described] = httpx.get(f"{management}/models/steady").json()
    assert described["ready"] is True and "unavailable" not in described
    assert [w["status"] for w in described["workers"]] == ["READY"]


def test_worker_counts_above_the_bound_are_refused_with_400(server: TorchgateServer) -> None:
    management = server.management_url
    for query in (f"min_worker={BOUND + 1}", "min_worker=1&max_worker=64"):
        refused = httpx.put(f"{management}/models/steady?{query}&synchronous=true")
        assert refused.status_code == 400, refused.text
        assert f"bound of {BOUND} workers per model" in refused.json()["message"]
    registered = httpx.post(f"{management}/models?url=idle.mar&initial_workers={BOUND + 2}")
    assert registered.status_code == 400, registered.text
    assert "torchgate.max_workers_per_model" in registered.json()["message"]
    assert httpx.get(f"{management}/models/idle").status_code == 404  # nothing half-registered
    assert len(worker_pids(server, "steady")) == 1


def test_start_up_worker_counts_above_the_bound_are_clamped(server: TorchgateServer) -> None:
    [described] = httpx.get(f"{server.management_url}/models/wide").json()
    assert (described["minWorkers"], described["maxWorkers"]) == (BOUND, BOUND)
    assert len(described["workers"]) == BOUND
    assert "clamped to 3 (torchgate.max_workers_per_model)" in server.log_text()


def test_a_server_killed_with_its_zygote_leaves_nothing_for_long(
    store: Path, tmp_path: Path
) -> None:
    """kill -9 of the frontend and its zygote at once (the workers follow their zygote), as a
    container runtime or the OOM killer may: the next server removes the extracted archives; a
    server still running on the same machine keeps its own."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {"TMPDIR": str(temp)}
    config = f"model_store={store}\nload_models=steady.mar\n"

    def work_dir(server: TorchgateServer) -> Path:
        [pid] = worker_pids(server, "steady")
        model_dir = Path(os.readlink(f"/proc/{pid}/cwd"))
        assert model_dir.parent.parent == temp
        return model_dir.parent

    with running_torchgate(config, env=env) as neighbour:
        kept = work_dir(neighbour)
        with running_torchgate(config, env=env) as killed:
            left = work_dir(killed)
            [worker] = worker_pids(killed, "steady")
            pids = [killed.process.pid, parent_of(worker), worker]
            # Stopped first, the frontend cannot react to its zygote's death before its own.
            os.kill(pids[0], signal.SIGSTOP)
            for pid in pids[:2]:
                os.kill(pid, signal.SIGKILL)
            for pid in pids:
                wait_until(lambda pid=pid: not alive(pid), timeout=10)
        assert left.exists()  # nobody was left to clean up
        assert left.name.startswith(f"torchgate-models-{pids[0]}-")
        with running_torchgate(config, env=env) as restarted:
            assert not left.exists()
            assert kept.exists() and work_dir(restarted).exists()
            assert f"removed {left}" in restarted.log_text()
        assert httpx.post(f"{neighbour.inference_url}/predictions/steady", content=b"x").is_success
