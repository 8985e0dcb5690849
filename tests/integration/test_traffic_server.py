"""Traffic policies and snapshots on the real server: `torchgate serve` under uvicorn, real
`.mar` archives in the in-process engine, real HTTP.

The archives are built here with torch-model-archiver from one-function handlers that answer
with their version, so these tests need nothing from `torchgate export`. Statistical checks use
a binomial bound of 5 standard deviations (a false failure about once in 1.7 million runs).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.archives import build_archive
from tests.support.server import TorchgateServer, post_many, running_torchgate
from tests.support.stats import within_binomial

pytestmark = pytest.mark.integration

HANDLER = """\
import os
import time

VERSION = {version!r}
MODE = {mode!r}
GATE = {gate!r}


def initialize(context):
    pass


def handle(data, context):
    if MODE == "fail":
        raise RuntimeError("this shadow version fails on purpose")
    if MODE == "gated":
        # Hold the batch while the test's gate file exists (at most a minute).
        deadline = time.monotonic() + 60
        while os.path.exists(GATE) and time.monotonic() < deadline:
            time.sleep(0.01)
    return [{{"version": VERSION}} for _ in data]
"""

# file name -> (version, mode)
ARCHIVES = {
    "ab-1.0.mar": ("1.0", "ok"),
    "ab-2.0.mar": ("2.0", "ok"),
    "ab-3.0.mar": ("3.0", "ok"),
    "ab-gated.mar": ("8.0", "gated"),  # registered and removed by the shadow test
    "ab-fail.mar": ("9.0", "fail"),
}

TWO_VERSIONS = """\
load_models=ab-1.0.mar,ab-2.0.mar
enable_model_api=true
models={"ab": {"1.0": {"marName": "ab-1.0.mar", "defaultVersion": true}, \\
               "2.0": {"marName": "ab-2.0.mar"}}}
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("traffic")
    store = root / "model_store"
    store.mkdir()
    gate = root / "gate"
    for file_name, (version, mode) in ARCHIVES.items():
        handler = HANDLER.format(version=version, mode=mode, gate=str(gate))
        built = build_archive(root, "ab", "handler.py", {"handler.py": handler}, version=version)
        built.rename(store / file_name)
    return store


def config(store: Path, text: str = TWO_VERSIONS) -> str:
    return f"model_store={store}\n{text}"


@pytest.fixture(scope="module")
def server(store: Path) -> Iterator[TorchgateServer]:
    with running_torchgate(config(store), args=["--ncs"]) as tg:
        yield tg


@pytest.fixture
def management(server: TorchgateServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.management_url, timeout=30) as client:
        yield client
        client.delete("/models/ab/traffic")  # back to default-version routing


def versions(replies: list[Any]) -> list[str]:
    """The version of each 200 reply, checked against its X-Model-Version header."""
    found = []
    for reply in replies:
        assert reply.status == 200, reply
        version = reply.body.decode().split('"version":"', 1)[1].split('"', 1)[0]
        assert reply.headers["x-model-version"] == version
        found.append(version)
    return found


# -- weights, stickiness, rollback, live changes ------------------------------------------------


def test_10000_requests_split_90_10_within_five_sigma(
    server: TorchgateServer, management: httpx.Client
) -> None:
    policy = {"weights": {"1.0": 90, "2.0": 10}, "sticky_header": None}
    assert management.put("/models/ab/traffic", json=policy).status_code == 200
    url = f"{server.inference_url}/predictions/ab"
    counts = Counter(versions(asyncio.run(post_many(url, 10_000, concurrency=16))))
    # Binomial(10,000, 0.1): mean 1,000, sd 30; 5 sd is 850..1,150.
    assert counts.keys() == {"1.0", "2.0"}
    assert within_binomial(counts["2.0"], 10_000, 0.10), counts


def test_sticky_users_stay_put_and_only_move_into_the_grown_version(
    server: TorchgateServer, management: httpx.Client
) -> None:
    url = f"{server.inference_url}/predictions/ab"
    users = 2000

    def assignment() -> list[str]:
        replies = asyncio.run(post_many(url, users, headers=lambda i: {"X-User-Id": f"u{i}"}))
        return versions(replies)

    management.put("/models/ab/traffic", json={"weights": {"1.0": 90, "2.0": 10}})
    before = assignment()
    assert assignment() == before  # unchanged weights: nobody flips
    management.put("/models/ab/traffic", json={"weights": {"1.0": 80, "2.0": 20}})
    after = assignment()
    moves = Counter((b, a) for b, a in zip(before, after, strict=True) if b != a)
    assert set(moves) == {("1.0", "2.0")}, moves  # only into the version that grew
    assert within_binomial(moves["1.0", "2.0"], users, 0.20 - 0.10), moves


def test_rollback_takes_effect_on_the_next_request(
    server: TorchgateServer, management: httpx.Client
) -> None:
    url = f"{server.inference_url}/predictions/ab"
    management.put("/models/ab/traffic", json={"weights": {"1.0": 50, "2.0": 50}})
    replies = asyncio.run(post_many(url, 200, headers=lambda i: {"x-user-id": f"u{i}"}))
    assert set(versions(replies)) == {"1.0", "2.0"}
    response = management.put("/models/ab/traffic", json={"weights": {"1.0": 100, "2.0": 0}})
    assert response.status_code == 200
    replies = asyncio.run(post_many(url, 200, headers=lambda i: {"x-user-id": f"u{i}"}))
    assert set(versions(replies)) == {"1.0"}


def test_changing_the_policy_under_load_loses_no_request(
    server: TorchgateServer, management: httpx.Client
) -> None:
    url = f"{server.inference_url}/predictions/ab"
    policies = [
        {"weights": {"1.0": 100, "2.0": 0}},
        {"weights": {"1.0": 50, "2.0": 50}, "sticky_header": None},
        {"weights": {"1.0": 0, "2.0": 100}, "shadow": {"version": "1.0", "percent": 50}},
    ]

    async def scenario() -> tuple[list[str], int]:
        load = asyncio.create_task(post_many(url, 3000, concurrency=16))
        flips = 0
        async with httpx.AsyncClient(base_url=server.management_url, timeout=30) as client:
            while not load.done():
                response = await client.put("/models/ab/traffic", json=policies[flips % 3])
                assert response.status_code == 200, response.text
                flips += 1
                await asyncio.sleep(0.01)  # pacing only: a change every few dozen requests
        return versions(await load), flips

    answered, flips = asyncio.run(scenario())
    assert len(answered) == 3000 and set(answered) == {"1.0", "2.0"}  # every one complete, 200
    assert flips >= 3


# -- shadow -------------------------------------------------------------------------------------


def test_a_stuck_or_failing_shadow_never_slows_or_fails_the_primary(
    server: TorchgateServer, management: httpx.Client, store: Path
) -> None:
    url = f"{server.inference_url}/predictions/ab"
    gate = store.parent / "gate"
    gate.touch()  # version 8.0 holds every batch while this file exists
    try:
        for archive in ("ab-gated.mar&response_timeout=1", "ab-fail.mar"):
            response = management.post(f"/models?url={archive}&initial_workers=1")
            assert response.status_code == 200, response.text
        policy = {"weights": {"1.0": 1}, "shadow": {"version": "8.0", "percent": 100}}
        assert management.put("/models/ab/traffic", json=policy).status_code == 200
        started = time.monotonic()
        stuck = versions(asyncio.run(post_many(url, 300, concurrency=8)))
        stuck_s = time.monotonic() - started
        # The shadow holds its batches for up to 60 s (its requests time out after 1 s); the
        # 300 primaries took a small fraction of either.
        assert stuck == ["1.0"] * 300 and stuck_s < 10, stuck_s

        policy = {"weights": {"1.0": 1}, "shadow": {"version": "9.0", "percent": 100}}
        assert management.put("/models/ab/traffic", json=policy).status_code == 200
        # Fewer copies than shadow copies may take of the shadow's queue (half its
        # job_queue_size of 100): with more, a quick primary can outrun a shadow that fails (and
        # logs) every batch, and the overflow is rightly refused with 503 (90 did, on a loaded
        # host); here every copy must run and fail with 500.
        failing = versions(asyncio.run(post_many(url, 45, concurrency=8)))
        assert failing == ["1.0"] * 45

        shadow_counts = _wait_for_shadow_metrics(server, {"8.0", "9.0"})
        assert shadow_counts["9.0"] == {"500"}  # every failure recorded, none returned
        assert shadow_counts["8.0"] <= {"200", "503", "504"}
    finally:
        gate.unlink(missing_ok=True)  # release the held batches
        management.delete("/models/ab/traffic")
        for version in ("8.0", "9.0"):
            management.delete(f"/models/ab/{version}")


def _wait_for_shadow_metrics(tg: TorchgateServer, wanted: set[str]) -> dict[str, set[str]]:
    """Statuses of shadow requests per version from /metrics, once each wanted one has some.

    Shadow requests finish after the primary answered, so the counters catch up a little later.
    """
    deadline = time.monotonic() + 30
    while True:
        found: dict[str, set[str]] = {}
        for line in httpx.get(f"{tg.metrics_url}/metrics").text.splitlines():
            if line.startswith("torchgate_requests_total{") and 'shadow="true"' in line:
                labels = dict(
                    item.split("=", 1) for item in line.split("{", 1)[1].split("}")[0].split(",")
                )
                found.setdefault(labels["version"].strip('"'), set()).add(
                    labels["status"].strip('"')
                )
        if wanted <= found.keys() or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


# -- snapshot -----------------------------------------------------------------------------------


def test_state_survives_a_graceful_restart_and_a_kill_9(store: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "torchgate"  # the same config folder, so the same snapshot, each run
    policy = {
        "weights": {"1.0": 30, "2.0": 70},
        "sticky_header": "X-Tenant",
        "shadow": {"version": "3.0", "percent": 10},
    }
    with running_torchgate(config(store), workdir=workdir) as tg:
        with httpx.Client(base_url=tg.management_url, timeout=30) as client:
            for method, path in [
                ("POST", "/models?url=ab-3.0.mar&batch_size=4&max_batch_delay=9&initial_workers=1"),
                ("PUT", "/models/ab/1.0?min_worker=2&max_worker=3&synchronous=true"),
                ("PUT", "/models/ab/2.0?batch_size=8&max_batch_delay=7&synchronous=true"),
                ("PUT", "/models/ab/2.0/set-default"),
            ]:
                response = client.request(method, path)
                assert response.status_code == 200, (path, response.text)
            assert client.put("/models/ab/traffic", json=policy).status_code == 200
            saved = _state(client)
        assert tg.stop() == 0
    assert saved["versions"]["1.0"]["workers"] == 2 and saved["versions"]["2.0"]["default"]

    with running_torchgate(config(store), workdir=workdir) as tg:
        with httpx.Client(base_url=tg.management_url, timeout=30) as client:
            assert _state(client) == saved
            # One more change, then a crash right after it was acknowledged.
            rollback = {**policy, "weights": {"1.0": 100, "2.0": 0}}
            assert client.put("/models/ab/traffic", json=rollback).status_code == 200
            saved = _state(client)
        tg.kill()

    with running_torchgate(config(store), workdir=workdir) as tg:
        with httpx.Client(base_url=tg.management_url, timeout=30) as client:
            assert _state(client) == saved
        replies = asyncio.run(post_many(f"{tg.inference_url}/predictions/ab", 20))
        assert set(versions(replies)) == {"1.0"}


def _state(client: httpx.Client) -> dict[str, Any]:
    described = client.get("/models/ab/all").json()
    return {
        "versions": {
            d["modelVersion"]: {
                "url": d["modelUrl"],
                "default": d["defaultVersion"],
                "workers": len(d["workers"]),
                "range": (d["minWorkers"], d["maxWorkers"]),
                "batch": (d["batchSize"], d["maxBatchDelay"], d["responseTimeout"]),
            }
            for d in described
        },
        "traffic": client.get("/models/ab/traffic").json(),
    }
