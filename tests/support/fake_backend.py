"""An in-memory backend and fake archives, for driving the core and the apps in-process.

A fake archive is a small JSON file in the model store (`write_fake_archive`) standing in for a
`.mar`; `load_fake_backend` has the signature of the local backend loader, so the real
`ModelLoader`, management API and snapshot code run unchanged::

    store = tmp_path / "model_store"
    write_fake_archive(store, "m", "1.0")
    tg = build(config, backend_loader=load_fake_backend)

Every answer says which version gave it: `{"model": "m", "version": "1.0", "body": ...}`. A
backend's behaviour can be changed while it serves: set `fail` to make every batch raise, or
`gate` to an `asyncio.Event` to hold every batch until the event is set.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from api.core.types import InferenceRequest, ModelSettings, Prediction
from api.workers.items import handler_row


class FakeWorker:
    device = "cpu"

    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend

    async def predict(self, batch: Sequence[InferenceRequest]) -> list[Prediction]:
        backend = self.backend
        backend.batches_seen += 1
        if backend.gate is not None:
            await backend.gate.wait()
        if backend.fail:
            raise RuntimeError(f"{backend.name} {backend.version} fails on purpose")
        return [
            Prediction({"model": backend.name, "version": backend.version, "body": _text(r)})
            for r in batch
        ]

    async def close(self) -> None:
        pass


class FakeBackend:
    """Implements `api.core.types.Backend`; answers with its model name and version."""

    batches: bool = True
    signature: Mapping[str, Any] | None = None

    def __init__(self, name: str, version: str, *, fail: bool = False) -> None:
        self.name, self.version = name, version
        self.manifest: Mapping[str, Any] = {"model": {"modelName": name, "modelVersion": version}}
        self.fail = fail
        self.gate: asyncio.Event | None = None
        self.batches_seen = 0
        self.closed = False

    async def start_worker(self, index: int) -> FakeWorker:
        return FakeWorker(self)

    async def close(self) -> None:
        self.closed = True


def write_fake_archive(
    store: Path,
    name: str,
    version: str,
    *,
    file_name: str | None = None,
    fail: bool = False,
    **extra: Any,
) -> str:
    """Write a fake archive into `store`; returns its file name (the url to register).

    `extra` keys go into the JSON beside "model" (e.g. a `signature` for a fake loader).
    """
    store.mkdir(parents=True, exist_ok=True)
    file_name = file_name or f"{name}-{version}.mar"
    manifest = {"model": {"modelName": name, "modelVersion": version}, "fail": fail, **extra}
    (store / file_name).write_text(json.dumps(manifest))
    return file_name


async def load_fake_backend(
    path: Path, settings: ModelSettings, work_dir: Path, name: str | None = None
) -> FakeBackend:
    """A `ArchiveBackendLoader` for fake archives (`name` has no use here)."""
    manifest = json.loads(path.read_text())
    model = manifest["model"]
    return FakeBackend(model["modelName"], model["modelVersion"], fail=manifest.get("fail", False))


def _text(request: InferenceRequest) -> Any:
    # Decoded as a worker decodes it for a handler (JSON parsed, text as str).
    body = handler_row(request.inputs, request.input_types).get("body")
    return body.decode("latin-1") if isinstance(body, bytes | bytearray) else body
