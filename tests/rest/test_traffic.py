"""`/models/{m}/traffic` and routed predictions, in-process through the real apps.

The apps are built by `api.app.build` from a config.properties, with fake archives standing in
for `.mar` files (`tests.support.fake_backend`), so the loader, management API, router and
dataplane are the real ones.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import Torchgate, build
from api.config import parse_config
from api.core.registry import ModelState
from tests.support import aio
from tests.support.fake_backend import FakeBackend, load_fake_backend, write_fake_archive
from tests.support.inprocess import asgi_clients


@dataclass
class Apps:
    tg: Torchgate
    inference: httpx.AsyncClient
    management: httpx.AsyncClient

    def backend(self, version: str) -> FakeBackend:
        backend = self.tg.registry.get("m", version).backend
        assert isinstance(backend, FakeBackend)
        return backend


@asynccontextmanager
async def apps(tmp_path: Path, versions: tuple[str, ...] = ("1.0", "2.0")) -> AsyncIterator[Apps]:
    store = tmp_path / "model_store"
    for version in versions:
        write_fake_archive(store, "m", version)
    config = parse_config(
        {
            "model_store": str(store),
            "load_models": "all",
            "disable_token_authorization": "true",
            "enable_model_api": "true",
            "torchgate.snapshot_file": "",
        },
        base_dir=tmp_path,
    )
    tg = build(config, work_dir=tmp_path / "work", backend_loader=load_fake_backend)
    await tg.start()
    assert tg.startup_errors == []
    try:
        async with asgi_clients(tg) as (inference, management):
            yield Apps(tg, inference, management)
    finally:
        await tg.stop()


run = functools.partial(aio.run, timeout=60)


async def predict(client: httpx.AsyncClient, headers: dict[str, str] | None = None) -> str:
    """POST one prediction; the version that answered, checked against X-Model-Version."""
    response = await client.post("/predictions/m", content=b"x", headers=headers)
    assert response.status_code == 200, response.text
    version = response.json()["version"]
    assert response.headers["x-model-version"] == version
    return str(version)


async def predict_many(
    client: httpx.AsyncClient, count: int, headers: dict[str, str] | None = None
) -> Counter[str]:
    versions: Counter[str] = Counter()
    for start in range(0, count, 100):
        batch = [predict(client, headers) for _ in range(min(100, count - start))]
        versions.update(await asyncio.gather(*batch))
    return versions


# -- the management API -------------------------------------------------------------------------


def test_get_put_delete_traffic(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with apps(tmp_path) as a:
            response = await a.management.get("/models/m/traffic")
            assert response.status_code == 200
            assert response.json() == {"model_name": "m", "default_version": "1.0", "policy": None}

            body = {"weights": {"1.0": 90, "2.0": 10}, "shadow": {"version": "2.0", "percent": 5}}
            response = await a.management.put("/models/m/traffic", json=body)
            assert response.status_code == 200, response.text
            expected = {
                "weights": {"1.0": 90.0, "2.0": 10.0},
                "sticky_header": "X-User-Id",
                "shadow": {"version": "2.0", "percent": 5.0},
            }
            assert response.json()["policy"] == expected
            assert (await a.management.get("/models/m/traffic")).json()["policy"] == expected

            response = await a.management.delete("/models/m/traffic")
            assert response.status_code == 200
            assert response.json()["policy"] is None
            assert a.tg.router is not None and a.tg.router.policy("m") is None

            # TorchServe's routes under /models/m/{version} are still there.
            described = (await a.management.get("/models/m/2.0")).json()
            assert described[0]["modelVersion"] == "2.0"
            assert "/models/{model_name}/traffic" in (await a.management.get("/openapi.json")).text

    run(scenario())


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"weights": {"1.0": 90, "9.9": 10}}, 404),
        ({"weights": {"1.0": 1}, "shadow": {"version": "9.9", "percent": 10}}, 404),
        ({"weights": {"1.0": -5, "2.0": 10}}, 400),
        ({"weights": {"1.0": 0, "2.0": 0}}, 400),
        ({"weights": {}}, 400),
        ({"weights": {"1.0": 1}, "shadow": {"version": "2.0", "percent": 150}}, 400),
        ({"weights": {"1.0": 1}, "sticky_header": "not a header"}, 400),
        ({"weights": {"1.0": 1}, "sticky": "X-User-Id"}, 400),
        ({"weights": {"1.0": 1}, "sticky_header": ""}, 400),  # not read as null
        ({"weights": {"1.0": 1e308, "2.0": 1e308}}, 400),  # the sum is not finite
        ({"weights": {"1.0": True}}, 400),  # numbers strictly: lax mode read 1
        ({"weights": {"1.0": "5"}}, 400),
        ({"weights": {"1.0": 1}, "shadow": {"version": "2.0", "percent": "5"}}, 400),
        ([1, 2, 3], 400),
    ],
)
def test_invalid_policies_are_refused(tmp_path: Path, body: Any, status: int) -> None:
    async def scenario() -> None:
        async with apps(tmp_path) as a:
            response = await a.management.put("/models/m/traffic", json=body)
            assert response.status_code == status, response.text
            assert response.json()["code"] == status
            assert a.tg.router is not None and a.tg.router.policy("m") is None

    run(scenario())


def test_unknown_model_is_404_and_a_version_not_ready_is_409(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with apps(tmp_path) as a:
            for method in ("GET", "PUT", "DELETE"):
                response = await a.management.request(
                    method, "/models/nope/traffic", json={"weights": {"1.0": 1}}
                )
                assert response.status_code == 404, (method, response.text)
            a.tg.registry.get("m", "2.0").state = ModelState.LOADING
            response = await a.management.put(
                "/models/m/traffic", json={"weights": {"1.0": 90, "2.0": 10}}
            )
            assert response.status_code == 409, response.text

    run(scenario())


def test_a_version_carrying_traffic_cannot_be_deleted_until_the_policy_changes(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with apps(tmp_path, ("1.0", "2.0", "3.0")) as a:
            policy = {"weights": {"1.0": 90, "2.0": 10}, "shadow": {"version": "3.0"}}
            assert (await a.management.put("/models/m/traffic", json=policy)).status_code == 200
            for version in ("2.0", "3.0"):
                response = await a.management.delete(f"/models/m/{version}")
                assert response.status_code == 409, response.text
                assert "traffic" in response.json()["message"]
            assert (await predict_many(a.inference, 50)).keys() <= {"1.0", "2.0"}

            await a.management.put("/models/m/traffic", json={"weights": {"1.0": 100, "2.0": 0}})
            assert (await a.management.delete("/models/m/2.0")).status_code == 200
            assert (await a.management.delete("/models/m/3.0")).status_code == 200
            policy_now = (await a.management.get("/models/m/traffic")).json()["policy"]
            assert policy_now["weights"] == {"1.0": 100.0}

    run(scenario())


def test_set_default_on_a_missing_version_is_404(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with apps(tmp_path) as a:
            response = await a.management.put("/models/m/9.9/set-default")
            assert response.status_code == 404
            assert response.json()["type"] == "ModelVersionNotFoundException"
            response = await a.management.put("/models/nope/1.0/set-default")
            assert response.status_code == 404

    run(scenario())


# -- routed predictions -------------------------------------------------------------------------


def test_predictions_follow_the_weights_and_say_which_version_answered(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with apps(tmp_path) as a:
            assert await predict_many(a.inference, 20) == Counter({"1.0": 20})  # the default
            body = {"weights": {"1.0": 90, "2.0": 10}, "sticky_header": None}
            await a.management.put("/models/m/traffic", json=body)
            counts = await predict_many(a.inference, 2000)
            n, p = 2000, 0.10
            assert abs(counts["2.0"] - n * p) <= 5 * math.sqrt(n * p * (1 - p)), counts

            # An explicit version always wins.
            response = await a.inference.post("/predictions/m/1.0", content=b"x")
            assert response.headers["x-model-version"] == "1.0"
            await a.management.put("/models/m/traffic", json={"weights": {"2.0": 1}})
            response = await a.inference.post("/predictions/m/1.0", content=b"x")
            assert response.json()["version"] == "1.0"

    run(scenario())


def test_sticky_users_keep_their_version_and_rollback_is_immediate(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with apps(tmp_path) as a:
            await a.management.put("/models/m/traffic", json={"weights": {"1.0": 50, "2.0": 50}})
            users = [f"user-{i}" for i in range(100)]
            first = {u: await predict(a.inference, {"X-User-Id": u}) for u in users}
            assert set(first.values()) == {"1.0", "2.0"}
            again = {u: await predict(a.inference, {"x-user-id": u}) for u in users}
            assert again == first

            await a.management.put("/models/m/traffic", json={"weights": {"1.0": 100, "2.0": 0}})
            after = {u: await predict(a.inference, {"X-User-Id": u}) for u in users}
            assert set(after.values()) == {"1.0"}

    run(scenario())


def test_shadow_answers_never_reach_the_client(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with apps(tmp_path) as a:
            shadow = a.backend("2.0")
            shadow.gate = gate = asyncio.Event()  # holds every shadow batch until set
            policy = {"weights": {"1.0": 1}, "shadow": {"version": "2.0", "percent": 100}}
            await a.management.put("/models/m/traffic", json=policy)
            try:
                # All 50 answered while the shadow has not finished one request.
                assert await predict_many(a.inference, 50) == Counter({"1.0": 50})
            finally:
                gate.set()
            shadow.fail = True  # a failing shadow changes nothing either
            assert await predict_many(a.inference, 50) == Counter({"1.0": 50})
            await a.tg.registry.close()
            assert shadow.batches_seen > 0
            metrics = a.tg.observer.render().decode()
            shadow_lines = [
                line
                for line in metrics.splitlines()
                if line.startswith("torchgate_requests_total") and 'shadow="true"' in line
            ]
            assert shadow_lines and all('version="2.0"' in line for line in shadow_lines)

    run(scenario())


def test_changing_the_policy_under_load_loses_no_request(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with apps(tmp_path) as a:
            policies = [
                {"weights": {"1.0": 100, "2.0": 0}},
                {"weights": {"1.0": 50, "2.0": 50}},
                {"weights": {"1.0": 0, "2.0": 100}, "shadow": {"version": "1.0", "percent": 50}},
            ]
            stop = asyncio.Event()
            flips = 0

            async def flip() -> None:
                nonlocal flips
                while not stop.is_set():
                    policy = policies[flips % len(policies)]
                    response = await a.management.put("/models/m/traffic", json=policy)
                    assert response.status_code == 200
                    flips += 1
                    await asyncio.sleep(0.001)  # pacing only: a flip every few requests

            flipper = asyncio.create_task(flip())
            counts: Counter[str] = Counter()
            sent = 0
            try:
                # At least 2,000 requests, and on until the policy has changed often under them
                # and both versions have answered (a busy host may give the flipper few turns,
                # or give them all while one policy's requests are in flight).
                while sent < 2000 or ((flips <= 10 or len(counts) < 2) and sent < 20_000):
                    counts += await predict_many(a.inference, 200, {"x-user-id": "u"})
                    sent += 200
            finally:
                stop.set()
                await flipper
            assert sum(counts.values()) == sent  # each answered 200 by one version
            assert set(counts) == {"1.0", "2.0"} and flips > 10

    run(scenario())
