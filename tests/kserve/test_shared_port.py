"""APIs configured on one address share a listener (`api.rest.apps.listeners`), as TorchServe
allows and KServe's example config.properties does (inference and management both on 8085)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from api.config import Address
from api.rest.apps import SharedPort, listeners
from tests.support.aio import run
from tests.support.inprocess import started_torchgate
from tests.support.processes import wait_until
from tests.support.server import ROOT
from tests.support.tensor_backend import load_tensor_backend
from tests.support.torchserve import free_ports


def test_listeners_group_apis_by_address(tmp_path: Path) -> None:
    async def scenario() -> dict[str, tuple[int, object]]:
        async with started_torchgate(tmp_path, {}, load_tensor_backend) as run_:
            tg = run_.tg
            shared, metrics = Address("0.0.0.0", 8085), Address("0.0.0.0", 8082)
            served = listeners(
                [
                    ("inference", tg.inference_app, shared),
                    ("management", tg.management_app, shared),
                    ("metrics", tg.metrics_app, metrics),
                ]
            )
            assert [address for _, address in served] == [shared, metrics]
            assert served[1][0] is tg.metrics_app
            app = served[0][0]
            assert isinstance(app, SharedPort)
            transport = httpx.ASGITransport(app=app)
            answers = {}
            async with httpx.AsyncClient(
                transport=transport, base_url="http://localhost"
            ) as client:
                for path in ("/models", "/v1/models", "/ping", "/v2/health/live", "/"):
                    reply = await client.get(path)
                    answers[path] = (reply.status_code, reply.json())
                # An inference path under /models: TorchServe asks its inference API first.
                # (The management API would answer POST on /models/{m}/{v} with 405.)
                reply = await client.post("/models/nope/invoke", content=b"x")
                answers["invoke"] = (reply.status_code, reply.json())
            return answers

    answers = run(scenario())
    assert answers["/models"] == (200, {"models": []})  # the management API's list
    assert answers["/v1/models"] == (200, {"models": []})  # KServe v1's
    assert answers["/ping"] == (200, {"status": "Healthy"})
    assert answers["/v2/health/live"] == (200, {"live": True})
    assert answers["/"] == (200, {"status": "alive"})
    status, body = answers["invoke"]
    assert status == 404
    assert isinstance(body, dict) and body["message"] == "Model not found: nope"


def test_the_metrics_api_takes_every_path_below_metrics_on_a_shared_port() -> None:
    """TorchServe's metrics handler takes any path whose first segment is `metrics`."""
    apps: dict[str, Any] = {"inference": object(), "management": object(), "metrics": object()}
    port = SharedPort(apps)
    for path in ("/metrics", "/metrics/", "/metrics/anything/here"):
        assert port.app_for(path) is apps["metrics"], path
    assert port.app_for("/metricsx") is apps["inference"]


def test_a_server_listens_once_on_an_address_two_apis_share(tmp_path: Path) -> None:
    """The real command line with KServe's example addresses: inference and management on one
    port. The port is bound once (a second bind would be "port in use") and serves both."""
    shared, metrics, grpc_inference, grpc_management = free_ports(4)
    (tmp_path / "model-store").mkdir()
    config = tmp_path / "config.properties"
    config.write_text(
        f"inference_address=http://127.0.0.1:{shared}\n"
        f"management_address=http://127.0.0.1:{shared}\n"
        f"metrics_address=http://127.0.0.1:{metrics}\n"
        f"grpc_inference_port={grpc_inference}\ngrpc_management_port={grpc_management}\n"
        "disable_token_authorization=true\n"
    )
    command = [sys.executable, "-m", "api.cli", "start", "--foreground", "--ncs"]
    command += [f"--model-store={tmp_path / 'model-store'}", f"--ts-config={config}"]
    log = tmp_path / "torchgate.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{shared}"
    try:

        def healthy() -> bool:
            assert process.poll() is None, log.read_text()
            try:
                return httpx.get(f"{base}/ping", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, timeout=60)
        assert httpx.get(f"{base}/models").json() == {"models": []}  # management
        assert httpx.get(f"{base}/v1/models").json() == {"models": []}  # inference
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
