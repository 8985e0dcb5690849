"""The management operations in process, and REST and gRPC answering them alike."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import httpx
import pytest

from api.core.types import ModelSettings
from api.errors import (
    BadRequest,
    DeadlineExceeded,
    DefaultVersionInUse,
    ModelNotFound,
    http_status,
)
from api.management import ListArgs, Management, RegisterArgs, ScaleArgs
from api.management.operations import _owned_by_torchserve
from api.rpc.generated import management_pb2 as management
from api.rpc.generated import management_pb2_grpc as management_grpc
from tests.support import aio
from tests.support.echo_backend import EchoBackend, factory
from tests.support.fake_backend import write_fake_archive
from tests.support.inprocess import InProcess, started_torchgate


async def load_echo(
    path: Path, settings: ModelSettings, work_dir: Path, handler: str | None = None
) -> EchoBackend:
    model = json.loads(path.read_text())["model"]
    backend = EchoBackend(model["modelName"], model["modelVersion"])
    backend.manifest = {"model": model}
    return backend


@asynccontextmanager
async def running(tmp_path: Path, **config: str) -> AsyncIterator[tuple[InProcess, Management]]:
    store = tmp_path / "model_store"
    for name, version in (("m", "1.0"), ("m", "2.0"), ("n", "1.0")):
        write_fake_archive(store, name, version)
    raw = {"model_store": str(store), "enable_model_api": "true", **config}
    async with started_torchgate(tmp_path, raw, load_echo, grpc=True) as run:
        tg = run.tg
        yield run, Management(tg.registry, tg.loader, enable_model_api=True)


def test_register_scale_describe_unregister(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as (_, ops):
            reply = await ops.register(RegisterArgs(url="m-1.0.mar"))
            assert (reply.status, reply.message) == (
                200,
                'Model "m" Version: 1.0 registered with 0 initial workers. Use scale workers '
                "API to add workers for the model.",
            )
            described = (await ops.describe("m")).body
            assert isinstance(described, list)
            assert (described[0]["minWorkers"], described[0]["maxWorkers"]) == (0, 0)
            assert described[0]["maxBatchDelay"] == 100  # an integer, as TorchServe's

            reply = await ops.scale("m", "1.0", ScaleArgs(min_worker=1, synchronous=True))
            assert reply.message == "Workers scaled to 1 for model: m, version: 1.0"
            assert (await ops.scale("m", None, ScaleArgs())).status == 202
            with pytest.raises(BadRequest, match="max_worker cannot be less"):
                await ops.scale("m", None, ScaleArgs(min_worker=2, max_worker=1))
            with pytest.raises(BadRequest):
                await ops.scale("m", None, ScaleArgs(min_worker=-1))

            reply = await ops.register(RegisterArgs(url="m-2.0.mar", initial_workers=1))
            assert reply.message == 'Model "m" Version: 2.0 registered with 1 initial workers'
            reply = await ops.register(
                RegisterArgs(url="n-1.0.mar", initial_workers=1, synchronous=False)
            )
            assert (reply.status, reply.message) == (202, "Processing worker updates...")
            with pytest.raises(DefaultVersionInUse) as refused:
                await ops.unregister("m")
            assert http_status(refused.value) == 403
            assert (await ops.unregister("m", "2.0")).message == 'Model "m" unregistered'

            page = ops.list_models(ListArgs(1, 0)).body
            assert page == {
                "nextPageToken": "1",
                "models": [{"modelName": "m", "modelUrl": "m-1.0.mar"}],
            }
            assert ops.list_models(ListArgs(0, 0)).body == {"nextPageToken": "0", "models": []}

    aio.run(scenario(), timeout=30)


@pytest.mark.parametrize(
    ("args", "error", "status"),
    [
        (RegisterArgs(url=None), BadRequest, 400),
        (RegisterArgs(url=""), ModelNotFound, 404),
        (RegisterArgs(url="m-1.0.mar", runtime="python4"), BadRequest, 400),
        (RegisterArgs(url="m-1.0.mar", initial_workers=1, startup_timeout=0), Exception, 500),
    ],
)
def test_register_refusals(
    tmp_path: Path, args: RegisterArgs, error: type[Exception], status: int
) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as (run, ops):
            with pytest.raises(error) as raised:
                await ops.register(args)
            assert http_status(raised.value) == status  # type: ignore[arg-type]
            assert run.tg.registry.names() == []

    aio.run(scenario(), timeout=30)


def test_rest_and_grpc_answer_alike(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path, load_models="m-1.0.mar") as (run, _):
            transport = httpx.ASGITransport(app=run.tg.management_app)
            async with (
                httpx.AsyncClient(transport=transport, base_url="http://localhost") as rest,
                grpc.aio.insecure_channel(f"127.0.0.1:{run.grpc_management_port}") as channel,
            ):
                stub = management_grpc.ManagementAPIsServiceStub(channel)
                http = await rest.put("/models/m/?min_worker=1&synchronous=true")
                rpc = await stub.ScaleWorker(
                    management.ScaleWorkerRequest(model_name="m", min_worker=1, synchronous=True)
                )
                assert (
                    http.json()
                    == {"status": rpc.msg}
                    == {"status": "Workers scaled to 1 for model: m"}
                )
                http = await rest.get("/models/m")
                rpc = await stub.DescribeModel(management.DescribeModelRequest(model_name="m"))
                assert list(http.json()[0]) == list(json.loads(rpc.msg)[0])
                assert (await rest.delete("/models/m/")).status_code == 200
                assert (await rest.options("/")).json()["openapi"]

    aio.run(scenario(), timeout=30)


def test_worker_and_batch_parameters_for_a_torchserve_target_are_torchserves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as (_, ops):
            url = "torchserve://127.0.0.1:9/m/1.0"
            args = RegisterArgs(url=url, batch_size=4, initial_workers=1, startup_timeout=0)
            # Refused for its url, not for a startup_timeout TorchServe would own.
            with pytest.raises(BadRequest, match="allowed_urls"):
                await ops.register(args)
            assert "ignored" not in caplog.text  # said only of a registration that happens
            assert _owned_by_torchserve(args) == [
                "initial_workers",
                "batch_size",
                "startup_timeout",
            ]
            assert _owned_by_torchserve(RegisterArgs(url="m-1.0.mar", batch_size=4)) == []

    aio.run(scenario())


def test_a_refused_scale_changes_no_batching(tmp_path: Path) -> None:
    """A scale refused with 400 (above the worker bound) applies none of its other settings:
    batch_size and max_batch_delay were set (and the snapshot written) before the bound was
    checked."""

    async def scenario() -> None:
        async with running(tmp_path) as (run, ops):
            registry = run.tg.registry
            registry.max_workers_per_model = 4
            await ops.register(RegisterArgs(url="m-1.0.mar"))
            changes: list[int] = []
            registry.on_change.append(lambda: changes.append(registry.get("m").settings.batch_size))
            args = ScaleArgs(min_worker=100, batch_size=8, max_batch_delay=7, synchronous=True)
            with pytest.raises(BadRequest, match="bound of 4 workers"):
                await ops.scale("m", None, args)
            settings = registry.get("m").settings
            assert (settings.batch_size, settings.max_batch_delay_ms) == (1, 100)
            assert changes == []

    aio.run(scenario(), timeout=30)


def test_a_model_unregistered_is_no_longer_a_start_up_model(tmp_path: Path) -> None:
    """As TorchServe's startupModels: once its last version is gone, `/invocations` without
    a model name no longer picks it (it answered 404 for it), and registered again it is not
    `loadedAtStartup`."""

    async def scenario() -> None:
        async with running(tmp_path, load_models="m-1.0.mar") as (run, ops):
            tg = run.tg
            assert tg.loader.startup_models == tg.registry.loaded_at_startup == {"m"}
            await ops.register(RegisterArgs(url="m-2.0.mar"))
            await ops.unregister("m", "2.0")
            assert tg.loader.startup_models == tg.registry.loaded_at_startup == {"m"}
            await ops.unregister("m", "1.0")
            assert tg.loader.startup_models == tg.registry.loaded_at_startup == set()
            transport = httpx.ASGITransport(app=tg.inference_app)
            async with httpx.AsyncClient(transport=transport, base_url="http://h") as rest:
                answer = await rest.post("/invocations", content=b"{}")
            assert answer.status_code == 400
            assert "model_name is required" in answer.json()["message"]
            await ops.register(RegisterArgs(url="m-1.0.mar"))
            (described,) = (await ops.describe("m")).body
            assert isinstance(described, dict) and described["loadedAtStartup"] is False

    aio.run(scenario(), timeout=30)


def test_a_customized_describe_past_the_response_timeout_is_a_deadline_error(
    tmp_path: Path,
) -> None:
    """A worker that times its own batches (a process) gets no deadline from the batcher:
    describe's own bound answered a bare TimeoutError (a plain-text 500, gRPC UNKNOWN)."""

    async def scenario() -> None:
        async with running(tmp_path) as (run, ops):
            backend = EchoBackend("1.0", delay=1.0)
            settings = ModelSettings(response_timeout_s=0.1)
            await run.tg.registry.register("slow", "1.0", "s.mar", factory(backend), settings)
            (worker,) = backend.workers
            worker.keeps_time = True  # type: ignore[attr-defined]
            with pytest.raises(DeadlineExceeded) as timed_out:
                await ops.describe("slow", customized=True)
            assert http_status(timed_out.value) == 504
            assert timed_out.value.message == (
                "Model slow version 1.0 did not answer the describe request within 0.1 s"
            )

    aio.run(scenario(), timeout=30)
