"""`GET /models/{m}?customized=true` and gRPC `DescribeModel(customized=true)` against real
worker processes running a `BaseHandler` subclass, the shape of most custom handlers.

TorchServe sends the handler its describe request as a job of its own, never batched with
predictions (`BaseHandler.handle` reads `describe` on row 0 only and answers once for the
batch), and reads the answer as a JSON object, `{}` when it is not one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from api.rpc.generated import management_pb2 as management
from api.rpc.generated import management_pb2_grpc as management_grpc
from api.workers.pool import WorkerPool
from tests.support import aio
from tests.support.archives import build_archive
from tests.support.inprocess import InProcess, asgi_clients, started_torchgate
from tests.support.workers import worker_loader

# A slow batched BaseHandler (as the audit's): batches form under load. Its describe_handle()
# answers what the client's `x-describe` header names (BaseHandler's own answer is None).
HANDLER = """
    import time

    import torch
    from ts.torch_handler.base_handler import BaseHandler

    ANSWERS = {
        "string": "plain text",
        "list": [1, 2],
        "json-list": "[1, 2]",
        "object": {"labels": ["a", "b"]},
        "json-object": '{"labels": ["a", "b"]}',
    }


    class SlowHandler(BaseHandler):
        def initialize(self, context):
            self.context = context
            self.initialized = True

        def describe_handle(self):
            return ANSWERS.get(self.context.get_request_header(0, "x-describe"))

        def preprocess(self, data):
            rows = [row.get("data") or row.get("body") for row in data]
            return torch.tensor(rows, dtype=torch.float32)

        def inference(self, data, *args, **kwargs):
            time.sleep(0.3)
            return data.sum(dim=1)

        def postprocess(self, data):
            return data.tolist()
"""
CONFIG = """
    batchSize: 8
    maxBatchDelay: 300
    minWorkers: 1
    maxWorkers: 1
"""


@asynccontextmanager
async def serving_slow(pool: WorkerPool, tmp_path: Path) -> AsyncIterator[InProcess]:
    store = tmp_path / "model_store"
    files = {"handler.py": HANDLER, "model-config.yaml": CONFIG}
    build_archive(
        tmp_path, "slow", "handler.py", files, config="model-config.yaml", export_dir=store
    )
    config = {"model_store": str(store), "load_models": "slow.mar"}
    async with started_torchgate(tmp_path, config, worker_loader(pool), grpc=True) as run:
        yield run


def test_a_customized_describe_amid_batched_predictions_runs_alone(
    worker_pool: WorkerPool, tmp_path: Path
) -> None:
    """20 concurrent predictions (batches of 8), the customized describe 50 ms later, behind
    them. It joined the last batch of predictions, whose every request then failed (500
    "handler failed: TypeError: not a sequence"): BaseHandler reads `describe` on row 0
    only, so its preprocess met the describe request's empty row (first in a batch, it would
    have answered once for the whole batch)."""

    async def scenario() -> tuple[list[httpx.Response], httpx.Response]:
        async with serving_slow(worker_pool, tmp_path) as run, asgi_clients(run.tg) as clients:
            inference, management_api = clients

            async def describe() -> httpx.Response:
                await asyncio.sleep(0.05)
                return await management_api.get("/models/slow?customized=true")

            predictions = [
                inference.post("/predictions/slow", json=[index, 1.0]) for index in range(20)
            ]
            *answers, described = await asyncio.gather(*predictions, describe())
            return answers, described

    answers, described = aio.run(scenario(), timeout=120)
    failed = [(a.status_code, a.text) for a in answers if a.status_code != 200]
    assert failed == []
    assert [a.json() for a in answers] == [index + 1.0 for index in range(20)]
    assert described.status_code == 200, described.text
    (document,) = described.json()
    assert document["customizedMetadata"] == {}  # BaseHandler's describe_handle(): None


@pytest.mark.parametrize(
    ("answer", "metadata"),
    [
        (None, {}),  # BaseHandler's own describe_handle()
        ("string", {}),
        ("list", {}),
        ("json-list", {}),
        ("object", {"labels": ["a", "b"]}),
        ("json-object", {"labels": ["a", "b"]}),
    ],
)
def test_customized_metadata_is_the_handlers_json_object_or_empty(
    worker_pool: WorkerPool, tmp_path: Path, answer: str | None, metadata: dict[str, Any]
) -> None:
    """As TorchServe, which reads the answer as a JSON object and falls back to `{}`: the
    handler's None was `null`, a string the string, a list the list."""

    async def scenario() -> tuple[Any, Any]:
        headers = {} if answer is None else {"x-describe": answer}
        async with serving_slow(worker_pool, tmp_path) as run, asgi_clients(run.tg) as clients:
            _, management_api = clients
            rest = await management_api.get("/models/slow?customized=true", headers=headers)
            assert rest.status_code == 200, rest.text
            address = f"127.0.0.1:{run.grpc_management_port}"
            async with grpc.aio.insecure_channel(address) as channel:
                stub = management_grpc.ManagementAPIsServiceStub(channel)
                request = management.DescribeModelRequest(model_name="slow", customized=True)
                rpc = await stub.DescribeModel(request)
            return rest.json()[0]["customizedMetadata"], json.loads(rpc.msg)[0]

    rest, rpc = aio.run(scenario(), timeout=120)
    assert rest == metadata
    # gRPC sends the handler no client headers: BaseHandler's None, so `{}`.
    assert rpc["customizedMetadata"] == {}
