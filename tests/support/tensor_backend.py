"""A fake backend that answers KServe v2 items with tensors, for the v2 REST and gRPC tests.

Model archives are JSON stand-ins (`write_archive`). With `SIGNATURE`, input "x" FP32 [-1, 2]
gives outputs "y" (x * 2) and "total" (row sums); without one the archive is "plain", as a
third-party archive. A request parameter "answer" makes the backend answer as a plain handler
would (see `TensorWorker`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from api.core.types import InferenceRequest, ModelSettings, Prediction, header_value
from tests.support.fake_backend import write_fake_archive

SIGNATURE: dict[str, Any] = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
    "outputs": [
        {"name": "y", "datatype": "FP32", "shape": [-1, 2]},
        {"name": "total", "datatype": "FP32", "shape": [-1]},
    ],
}


class TensorWorker:
    """Answers v2 items as torchgate's handlers do, or as a plain handler would when asked.

    Request parameter "answer": "label" -> `{"7": 0.9}`; "text" -> a str; "fail" -> the item
    fails alone with 400; "unavailable" -> it fails alone with 503; "invalid" -> an output
    that is no v2 tensor (no datatype); "raise" -> the whole batch raises; "stream" -> the
    texts "part 0" and "part 1" as intermediate responses (where the transport streams), then
    the tensors. A plain
    archive's items carry no v2 parameters (they get what /predictions would give, see
    `api.v2.bridge`): for those the answer comes from the request header "x-answer" (default
    "text"). The backend's `gate`, when set to an event, holds every batch until it is set.
    """

    device = "cpu"

    def __init__(self, backend: TensorBackend) -> None:
        self.backend = backend

    async def predict(self, batch: Sequence[InferenceRequest]) -> list[Prediction]:
        self.backend.seen.extend(batch)
        if self.backend.gate is not None:
            await self.backend.gate.wait()
        if any(_answer_asked(r) == "raise" for r in batch):
            raise RuntimeError("the handler raised")
        for request in batch:
            if _answer_asked(request) == "stream" and request.stream is not None:
                for part in ("part 0", "part 1"):
                    request.stream(Prediction(part))
        return [self._answer(r.inputs["body"], _answer_asked(r)) for r in batch]

    def _answer(self, body: Any, answer: str | None) -> Prediction:
        if answer == "label":
            return Prediction({"7": 0.9, "1": 0.1})
        if answer == "text":
            return Prediction(f"version {self.backend.version}")
        if answer == "fail":
            message = "x must be positive"
            return Prediction({"code": 400, "type": "BadRequest", "message": message}, 400)
        if answer == "unavailable":
            message = "warming up"
            return Prediction({"code": 503, "type": "Unavailable", "message": message}, 503)
        if answer == "invalid":
            return Prediction({"outputs": [{"name": "y", "data": [1.0, 2.0]}]})
        x = body["inputs"][0]["data"]
        y = (x * 2).astype(np.float32)
        return Prediction(
            {
                "outputs": [
                    {"name": "y", "datatype": "FP32", "shape": list(y.shape), "data": y},
                    {"name": "total", "datatype": "FP32", "shape": [len(x)], "data": x.sum(1)},
                ]
            }
        )

    async def close(self) -> None:
        pass


def _answer_asked(request: InferenceRequest) -> str | None:
    body = request.inputs.get("body")
    if isinstance(body, dict) and "parameters" in body:
        asked: str | None = body["parameters"].get("answer")
        return asked
    return header_value(request.headers, "x-answer") or "text"


@dataclass(eq=False)
class TensorBackend:
    version: str
    signature: Mapping[str, Any] | None
    manifest: Mapping[str, Any]
    batches: bool = True
    seen: list[InferenceRequest] = field(default_factory=list)
    gate: asyncio.Event | None = None

    async def start_worker(self, index: int) -> TensorWorker:
        return TensorWorker(self)

    async def close(self) -> None:
        pass


def write_archive(store: Path, name: str, version: str, signature: dict[str, Any] | None) -> str:
    """A fake archive (see `write_fake_archive`) carrying a signature, or none."""
    return write_fake_archive(store, name, version, signature=signature)


async def load_tensor_backend(
    path: Path, settings: ModelSettings, work_dir: Path, name: str | None = None
) -> TensorBackend:
    """A `ArchiveBackendLoader` for fake archives with a signature (`name` has no use here)."""
    document = json.loads(path.read_text())
    manifest = {"model": document["model"]}
    return TensorBackend(document["model"]["modelVersion"], document["signature"], manifest)
