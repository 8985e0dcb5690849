"""The management API over REST, in process (`api.rest.management`): each route is a thin
translation of an `api.management` operation — query and JSON parameters in, its `Reply`'s
status and body out, errors in TorchServe's shape. Fake archives stand in for `.mar` files
(tests/support/fake_backend.py); the semantics themselves are tests/management's and, against
real TorchServe, tests/integration/test_management_compat.py's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from tests.support.aio import run
from tests.support.fake_backend import load_fake_backend, write_fake_archive
from tests.support.inprocess import started_torchgate


@asynccontextmanager
async def management(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    store = tmp_path / "model_store"
    loaded = write_fake_archive(store, "m", "1.0")
    write_fake_archive(store, "m", "2.0")
    config = {"model_store": str(store), "load_models": loaded, "enable_model_api": "true"}
    async with started_torchgate(tmp_path, config, load_fake_backend) as serving:
        transport = httpx.ASGITransport(app=serving.tg.management_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            yield client


def test_register_describe_scale_default_and_unregister(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with management(tmp_path) as client:
            registered = await client.post(
                "/models", params={"url": "m-2.0.mar", "initial_workers": "1"}
            )
            assert registered.status_code == 200, registered.text
            assert registered.json()["status"].startswith('Model "m" Version: 2.0 registered')

            listed = (await client.get("/models")).json()
            assert listed["models"] == [{"modelName": "m", "modelUrl": "m-1.0.mar"}]
            described = (await client.get("/models/m/all")).json()
            assert [d["modelVersion"] for d in described] == ["1.0", "2.0"]

            scaled = await client.put("/models/m/2.0", params={"min_worker": "2"})
            assert scaled.status_code == 202
            assert (await client.get("/models/m/2.0")).json()[0]["minWorkers"] == 2

            made = await client.put("/models/m/2.0/set-default")
            assert made.status_code == 200
            assert (await client.get("/models/m")).json()[0]["modelVersion"] == "2.0"
            # The default version goes last, as in TorchServe: 403 while another remains.
            assert (await client.delete("/models/m/2.0")).status_code == 403
            assert (await client.delete("/models/m/1.0")).status_code == 200
            assert (await client.delete("/models/m/2.0")).status_code == 200
            assert (await client.get("/models/m")).status_code == 404

    run(scenario())


def test_lenient_values_mean_the_default_and_errors_have_torchserve_s_shape(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with management(tmp_path) as client:
            page = await client.get("/models", params={"limit": "junk", "next_page_token": "x"})
            assert page.status_code == 200 and page.json()["models"][0]["modelName"] == "m"
            missing = await client.get("/models/nope")
            assert missing.status_code == 404
            assert set(missing.json()) == {"code", "type", "message"}
            bad = await client.post("/models", params={"url": "m-2.0.mar", "runtime": "python4"})
            assert bad.status_code == 400 and bad.json()["code"] == 400
            assert (await client.delete("/models/m/")).status_code != 307  # no redirect

    run(scenario())
