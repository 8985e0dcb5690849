"""An in-memory backend for the core's tests: each answer echoes the request body and names the
version that gave it; `delay` holds every batch that long, and `parts` makes it stream: each
request with a `stream` gets that many intermediate responses first, naming the version too."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from api.core.types import Backend, InferenceRequest, Prediction


class EchoWorker:
    device = "cpu"

    def __init__(self, version: str, delay: float, parts: int = 0) -> None:
        self.version, self.delay, self.parts = version, delay, parts
        self.closed = False

    async def predict(self, batch: Sequence[InferenceRequest]) -> list[Prediction]:
        if self.delay:
            await asyncio.sleep(self.delay)
        for request in batch:
            stream = request.stream
            if stream is None:
                continue
            for index in range(self.parts):
                stream(Prediction({"version": self.version, "part": index}))
        return [Prediction({"version": self.version, "body": r.inputs["body"]}) for r in batch]

    async def close(self) -> None:
        self.closed = True


class EchoBackend:
    batches = True
    manifest: Mapping[str, Any] = {"model": {"serializedFile": "model.onnx"}}

    def __init__(self, version: str, delay: float = 0.0, parts: int = 0) -> None:
        self.version, self.delay, self.parts = version, delay, parts
        self.signature: Mapping[str, Any] | None = {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]
        }
        self.workers: list[EchoWorker] = []
        self.closed = False

    async def start_worker(self, index: int) -> EchoWorker:
        worker = EchoWorker(self.version, self.delay, self.parts)
        self.workers.append(worker)
        return worker

    async def close(self) -> None:
        self.closed = True


def factory(backend: EchoBackend) -> Callable[[], Awaitable[Backend]]:
    async def make() -> Backend:
        return backend

    return make
