"""TorchServe's asynchronous scale and register answer 202 at once; the workers follow.

`PUT /models/{m}?min_worker=N` is asynchronous unless `synchronous=true` (and so are gRPC's
ScaleWorker and RegisterModel, whose `synchronous` defaults to false): TorchServe answers 202
"Processing worker updates..." before any new worker has started, and clients poll describe.
A real `torchgate serve` hosts `gated`, whose handler's initialize waits until a gate file
exists, so the test decides when a worker may finish starting: every assertion about a worker
still STARTING holds for certain, not by timing. Each starting worker leaves its pid in a
folder, so the test can check that a start given up (scaled away) leaves no process behind.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.archives import build_archive
from tests.support.processes import alive, wait_until
from tests.support.server import TorchgateServer, running_torchgate

pytestmark = pytest.mark.integration

GATED = """
    import os
    import pathlib
    import time

    GATE = pathlib.Path({gate!r})
    STARTED = pathlib.Path({started!r})

    def handle(data, context):
        if data is None:  # initialize: wait for the test to open the gate
            (STARTED / str(os.getpid())).touch()
            while not GATE.exists():
                time.sleep(0.02)
            return None
        return [{{"pid": os.getpid()}} for _ in data]
"""

PROCESSING = {"status": "Processing worker updates..."}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("async-scaling")
    (root / "started").mkdir()
    handler = GATED.format(gate=str(root / "gate"), started=str(root / "started"))
    for name in ("gated", "later"):
        build_archive(root, name, "gated.py", {"gated.py": handler}, export_dir=root / "store")
    return root


@pytest.fixture(scope="module")
def server(root: Path) -> Iterator[TorchgateServer]:
    (root / "gate").touch()
    models = {"gated": {"1.0": {"marName": "gated.mar", "minWorkers": 1, "maxWorkers": 1}}}
    config = (
        f"model_store={root / 'store'}\nload_models=gated.mar\nenable_model_api=true\n"
        f"models={json.dumps(models)}\n"
    )
    with running_torchgate(config) as server:
        yield server


def describe(server: TorchgateServer, model: str) -> dict[str, Any]:
    reply = httpx.get(f"{server.management_url}/models/{model}", timeout=30)
    assert reply.status_code == 200, reply.text
    described: dict[str, Any] = reply.json()[0]
    return described


def statuses(server: TorchgateServer, model: str) -> list[str]:
    return [worker["status"] for worker in describe(server, model)["workers"]]


def started_pids(root: Path) -> set[int]:
    return {int(path.name) for path in (root / "started").iterdir()}


def test_an_asynchronous_scale_answers_before_the_workers_start(
    server: TorchgateServer, root: Path
) -> None:
    (root / "gate").unlink()  # from now on, no new worker can finish starting
    before = started_pids(root)
    reply = httpx.put(f"{server.management_url}/models/gated", params={"min_worker": 3})
    assert (reply.status_code, reply.json()) == (202, PROCESSING)
    described = describe(server, "gated")
    assert (described["minWorkers"], described["maxWorkers"]) == (3, 3)
    assert statuses(server, "gated") == ["READY", "STARTING", "STARTING"]
    # The worker already up keeps serving, and the server stays healthy: the workers it
    # was asked for are on their way.
    prediction = httpx.post(f"{server.inference_url}/predictions/gated", content=b"x")
    assert prediction.status_code == 200, prediction.text
    assert httpx.get(f"{server.inference_url}/ping").status_code == 200
    wait_until(lambda: len(started_pids(root) - before) == 2)  # both are in initialize

    # Scaled back down before they could start: the starts are given up, their processes
    # ended; the worker that serves is kept.
    (serving,) = [w["pid"] for w in describe(server, "gated")["workers"] if w["pid"] > 0]
    reply = httpx.put(f"{server.management_url}/models/gated", params={"min_worker": 1})
    assert (reply.status_code, reply.json()) == (202, PROCESSING)
    assert statuses(server, "gated") == ["READY"]
    given_up = started_pids(root) - before
    wait_until(lambda: not any(alive(pid) for pid in given_up))

    # And up again, this time let through: both new workers serve.
    reply = httpx.put(f"{server.management_url}/models/gated", params={"min_worker": 3})
    assert reply.status_code == 202
    (root / "gate").touch()
    wait_until(lambda: statuses(server, "gated") == ["READY"] * 3)
    pids = {w["pid"] for w in describe(server, "gated")["workers"]}
    assert serving in pids and len(pids) == 3


def test_a_synchronous_scale_still_answers_once_the_workers_run(
    server: TorchgateServer, root: Path
) -> None:
    (root / "gate").touch()
    reply = httpx.put(
        f"{server.management_url}/models/gated",
        params={"min_worker": 2, "synchronous": "true"},
        timeout=60,
    )
    assert (reply.status_code, reply.json()) == (
        200,
        {"status": "Workers scaled to 2 for model: gated"},
    )
    assert statuses(server, "gated") == ["READY", "READY"]


def test_an_asynchronous_register_answers_before_its_workers_start(
    server: TorchgateServer, root: Path
) -> None:
    (root / "gate").unlink()
    params: dict[str, str | int] = {
        "url": "later.mar",
        "initial_workers": 1,
        "synchronous": "false",
    }
    reply = httpx.post(f"{server.management_url}/models", params=params, timeout=60)
    assert (reply.status_code, reply.json()) == (202, PROCESSING)
    assert statuses(server, "later") == ["STARTING"]
    # Registered, not ready yet (v2 ready says so), but a prediction waits in the queue for
    # the worker, as TorchServe holds it, and is answered once the worker is up.
    url = f"{server.inference_url}/predictions/later"
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(httpx.post, url, content=b"x", timeout=60)
        ready = httpx.get(f"{server.inference_url}/v2/models/later/ready")
        assert ready.status_code == 503
        with pytest.raises(FutureTimeout):  # not refused: still waiting, the gate closed
            waiting.result(timeout=0.5)
        assert statuses(server, "later") == ["STARTING"]
        (root / "gate").touch()
        served = waiting.result(timeout=60)
    assert served.status_code == 200, served.text
    assert statuses(server, "later") == ["READY"]
