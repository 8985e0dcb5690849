"""Archives as TorchServe users build them: TorchScript and eager models behind handlers that
subclass TorchServe's BaseHandler, packed with torch-model-archiver, served by the registry."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from api.backends.workers import load_worker_backend
from api.core.registry import Registry
from api.core.types import Backend, InferenceRequest, Prediction
from api.workers.pool import WorkerPool
from tests.backends.conftest import (
    BuildArchive,
    TinyLinear,
    expected_linear,
    requests,
    run,
    settings,
)

# The usual shape of a third-party handler: BaseHandler does initialize (load the serialized
# model, pick the device) and inference; the archive overrides pre- and postprocess.
LINEAR_HANDLER = """
    import json

    import torch
    from ts.torch_handler.base_handler import BaseHandler

    class LinearHandler(BaseHandler):
        def preprocess(self, data):
            self.bad = {}
            rows = []
            for idx, row in enumerate(data):
                body = row.get("data") or row.get("body")
                if isinstance(body, (bytes, bytearray)):
                    body = json.loads(body)
                if not (isinstance(body, list) and len(body) == 4):
                    self.bad[idx] = "expected a list of 4 numbers"
                    self.context.set_response_status(400, self.bad[idx], idx)
                    body = [0.0] * 4
                rows.append(body)
            return torch.tensor(rows, dtype=torch.float32, device=self.device)

        def postprocess(self, data):
            return [
                {"error": self.bad[idx]} if idx in self.bad else row
                for idx, row in enumerate(data.tolist())
            ]
"""

ROWS = [[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], [-1.0, 0.5, 0.25, 2.0]]


def approx(rows: list[list[float]]) -> Any:
    return [pytest.approx(row) for row in rows]


def test_torchscript_model_with_a_base_handler_subclass(
    worker_pool: WorkerPool, build_archive: BuildArchive, scripted_model: bytes
) -> None:
    path = build_archive(
        "linear",
        "linear_handler.py",
        {"linear_handler.py": LINEAR_HANDLER, "linear.pt": scripted_model},
        serialized="linear.pt",
    )

    async def scenario() -> list[list[Prediction]]:
        backend = await load_worker_backend(
            path, settings(), pool=worker_pool, work_dir=path.parent / "w"
        )
        try:
            worker = await backend.start_worker(0)
            return [
                await worker.predict(requests(*ROWS)),
                # a raw JSON body, the way a client without Content-Type sends it
                await worker.predict(requests(json.dumps(ROWS[0]).encode(), "nonsense")),
            ]
        finally:
            await backend.close()

    clean, mixed = run(scenario())
    assert [p.body for p in clean] == approx(expected_linear(ROWS))
    assert all(p.status == 200 for p in clean)
    assert mixed[0].body == approx(expected_linear(ROWS[:1]))[0]
    assert (mixed[1].status, mixed[1].message) == (400, "expected a list of 4 numbers")
    assert mixed[1].body == {"error": "expected a list of 4 numbers"}


EAGER_MODEL = """
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, OUTPUTS)

        def forward(self, x):
            return self.linear(x)
"""


def test_two_eager_archives_with_the_same_model_file_name(
    worker_pool: WorkerPool, build_archive: BuildArchive, tmp_path: Path
) -> None:
    """Both archives ship model.py (different networks) and linear_handler.py; BaseHandler
    imports `model` by name during initialize, so each must get its own."""
    paths: dict[str, Path] = {}
    expected: dict[str, list[list[float]]] = {}
    for name, outputs in (("two_out", 2), ("three_out", 3)):
        torch.manual_seed(outputs)
        layer = torch.nn.Linear(4, outputs)
        weights = io.BytesIO()
        torch.save({f"linear.{k}": v for k, v in layer.state_dict().items()}, weights)
        expected[name] = layer(torch.tensor(ROWS)).tolist()
        paths[name] = build_archive(
            name,
            "linear_handler.py",
            {
                "linear_handler.py": LINEAR_HANDLER,
                "model.py": EAGER_MODEL.replace("OUTPUTS", str(outputs)),
                "weights.pt": weights.getvalue(),
            },
            serialized="weights.pt",
            model_file="model.py",
        )

    async def scenario() -> dict[str, list[Prediction]]:
        backends = {
            name: await load_worker_backend(
                path, settings(), pool=worker_pool, work_dir=tmp_path / "w"
            )
            for name, path in paths.items()
        }
        try:
            workers = {name: await b.start_worker(0) for name, b in backends.items()}
            return {name: await w.predict(requests(*ROWS)) for name, w in workers.items()}
        finally:
            for backend in backends.values():
                await backend.close()

    results = run(scenario())
    for name in paths:
        assert [p.body for p in results[name]] == approx(expected[name])


def test_through_the_registry_and_batcher(
    worker_pool: WorkerPool, build_archive: BuildArchive, scripted_model: bytes
) -> None:
    """The core's contract end to end: requests queued together run as one batch, and a bad
    item fails alone."""
    path = build_archive(
        "batched",
        "linear_handler.py",
        {"linear_handler.py": LINEAR_HANDLER, "linear.pt": scripted_model},
        serialized="linear.pt",
    )

    async def scenario() -> list[Prediction]:
        registry = Registry()

        async def factory() -> Backend:
            return await load_worker_backend(
                path, settings(), pool=worker_pool, work_dir=path.parent / "w"
            )

        version = await registry.register(
            "batched", "1.0", str(path), factory, settings(max_batch_delay_ms=50.0)
        )
        try:
            batch = [*requests(*ROWS), InferenceRequest({"body": "oops"}, {}, "bad")]
            futures = [version.batcher.submit(request) for request in batch]
            return list(await asyncio.gather(*futures))
        finally:
            await registry.close()

    out = run(scenario())
    assert [p.body for p in out[:3]] == approx(expected_linear(ROWS))
    assert out[3].status == 400
    assert {p.batch_size for p in out} == {4}


def test_tiny_linear_reference() -> None:
    """The fixture model is what the tests above compare against."""
    assert TinyLinear()(torch.ones(1, 4)).tolist() == [[1.5, 2.5]]
