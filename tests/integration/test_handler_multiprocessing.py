"""Handlers that fan a batch out to a `multiprocessing` pool, as TorchServe's workers allow.

A TorchServe worker is a whole Python process, so a handler may start a pool when it loads, with
the `fork`, `spawn` or `forkserver` start method. `spawn` and `forkserver` children are fresh
interpreters: they re-import the worker's `__main__` and find the handler's module through the
worker's `sys.path` and working directory, so they work only where the worker is a process of
its own that was started from an importable main module. The same archives go to real
TorchServe 0.12 and to torchgate, and both must answer alike.

A pool also ends with its worker, on both: a crash costs its own request (500), takes the pool
along and a replacement worker with a new pool serves again; on torchgate nothing of any pool
is left once the server stops.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.archives import build_archive
from tests.support.processes import alive, descendants, wait_until
from tests.support.server import running_torchgate, worker_pids
from tests.support.side_by_side import side_by_side

pytestmark = [pytest.mark.integration, pytest.mark.torchserve]

METHODS = ("fork", "spawn", "forkserver")
POOL_SIZE = 2

# A function entry point initialized by TorchServe's `handle(None, context)` call.
POOLED = """
    import multiprocessing
    import os

    pool = None

    def square(x):  # runs in a pool process, found there by importing this module
        return os.getpid(), x * x

    def handle(data, context):
        global pool
        if data is None:
            pool = multiprocessing.get_context({method!r}).Pool({size})
            return None
        results = pool.map(square, range(len(data) + 3))
        if any("crash" in repr(row) for row in data):
            os._exit(3)
        pool_pids = sorted({{pid for pid, _ in results}})
        squares = [value for _, value in results]
        return [
            {{"worker": os.getpid(), "pool": pool_pids, "squares": squares}} for _ in data
        ]
"""


def model(method: str) -> str:
    return f"pool_{method}"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("pools")
    store = work / "store"
    store.mkdir()
    for method in METHODS:
        handler = POOLED.format(method=method, size=POOL_SIZE)
        build_archive(work, model(method), "pooled.py", {"pooled.py": handler}, export_dir=store)
    return store


# One worker per model, one request per batch, on both servers.
KEYS = {
    "default_workers_per_model": "1",
    "models": json.dumps(
        {
            model(method): {"1.0": {"marName": f"{model(method)}.mar", "batchSize": 1}}
            for method in METHODS
        }
    ),
}


@pytest.fixture(scope="module")
def servers(store: Path) -> Iterator[dict[str, str]]:
    with side_by_side(store, KEYS) as both:
        yield {name: endpoints.inference for name, endpoints in both.items()}


def predict(url: str, method: str, body: bytes = b"hi") -> httpx.Response:
    return httpx.post(f"{url}/predictions/{model(method)}", content=body, timeout=60)


@pytest.mark.parametrize("method", METHODS)
def test_a_handlers_pool_serves_alike_on_torchserve_and_torchgate(
    servers: dict[str, str], method: str
) -> None:
    answers = {name: predict(servers[name], method) for name in ("torchserve", "torchgate")}
    for name, reply in answers.items():
        assert reply.status_code == 200, (name, reply.text)
        body = reply.json()
        assert body["squares"] == [0, 1, 4, 9], name
        assert body["worker"] not in body["pool"], name
        assert 1 <= len(body["pool"]) <= POOL_SIZE, name


@pytest.mark.parametrize("server", ["torchserve", "torchgate"])
@pytest.mark.parametrize("method", METHODS)
def test_a_crashed_worker_takes_its_pool_along(
    servers: dict[str, str], method: str, server: str
) -> None:
    url = servers[server]
    before = predict(url, method).json()
    pool_processes = descendants(before["worker"])  # the pool, and its resource tracker/server
    assert set(before["pool"]) <= pool_processes

    assert predict(url, method, b"crash").status_code == 500
    wait_until(lambda: not any(alive(pid) for pid in pool_processes), timeout=10)
    wait_until(lambda: predict(url, method).status_code == 200, timeout=60)
    after = predict(url, method).json()
    assert after["worker"] != before["worker"]
    assert after["squares"] == [0, 1, 4, 9]


def test_no_pool_process_outlives_the_server(store: Path) -> None:
    keys = "".join(f"{key}={value}\n" for key, value in KEYS.items())
    with running_torchgate(f"model_store={store}\nload_models=all\n{keys}") as server:
        for method in METHODS:
            assert predict(server.inference_url, method).status_code == 200
        workers = [pid for method in METHODS for pid in worker_pids(server, model(method))]
        everything = set(workers).union(*(descendants(pid) for pid in workers))
        assert len(everything) > len(workers) * POOL_SIZE  # pools, resource trackers, forkserver
    # running_torchgate stops the server with SIGTERM and waits for the frontend to exit.
    wait_until(lambda: not any(alive(pid) for pid in everything), timeout=10)
