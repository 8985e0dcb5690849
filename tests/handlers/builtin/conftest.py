"""Archives under TorchServe's built-in handler names, served by real worker processes.

Each test makes a tiny model with random weights, packs it with torch-model-archiver as a
TorchServe user would (``--handler image_classifier --serialized-file ...``), loads the archive
into a worker process forked from the session's zygote, and compares the answers with a
reference it computes from the same weights and TorchServe's documented processing.
"""

from __future__ import annotations

import importlib.util
import io
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pytest
import torch

from api.backends.workers import GpuRoundRobin, load_worker_backend
from api.core.types import InferenceRequest, ModelSettings, Prediction
from api.workers.pool import WorkerPool
from export.serialize import export_onnx
from tests.support import aio
from tests.support.archives import build_archive

_modules = itertools.count()


@dataclass
class Packed:
    """A model as archive files: what torch-model-archiver gets for one format."""

    files: dict[str, str | bytes]
    serialized: str | None = None
    model_file: str | None = None

    def plus(self, extra: Mapping[str, str | bytes]) -> Packed:
        return Packed({**self.files, **extra}, self.serialized, self.model_file)


def model_class(source: str, directory: Path) -> type[torch.nn.Module]:
    """The one class `source` defines, imported from a file so TorchScript can read its code."""
    path = directory / f"model_{next(_modules)}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    [cls] = [v for v in vars(module).values() if isinstance(v, type) and v.__module__ == path.stem]
    return cls


def torchscript(model: torch.nn.Module) -> Packed:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model.eval()), buffer)
    return Packed({"model.pt": buffer.getvalue()}, serialized="model.pt")


def eager(model: torch.nn.Module, source: str) -> Packed:
    """TorchServe's eager form: --model-file with the class, --serialized-file its state_dict."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return Packed(
        {"model.py": source, "weights.pth": buffer.getvalue()},
        serialized="weights.pth",
        model_file="model.py",
    )


def onnx(
    model: torch.nn.Module,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    dynamic: Mapping[str, Mapping[int, str]],
    directory: Path,
) -> Packed:
    path = export_onnx(model, inputs, outputs, dynamic, directory / f"m{next(_modules)}.onnx")
    return Packed({"model.onnx": path.read_bytes()}, serialized="model.onnx")


def items(*bodies: Any) -> list[InferenceRequest]:
    """One request per body, as the REST frontend hands them over ({"body": ...})."""
    return [InferenceRequest({"body": body}, {}, f"req-{i}") for i, body in enumerate(bodies)]


async def predict(
    pool: WorkerPool,
    path: Path,
    batches: Sequence[list[InferenceRequest]],
    work_dir: Path,
    **options: Any,
) -> tuple[str, list[list[Prediction]]]:
    """Load the archive, start one worker, run each batch in one handle() call, close.

    `options` go to `load_worker_backend`. Answers the worker's device and the predictions."""
    backend = await load_worker_backend(
        path, ModelSettings(batch_size=8), pool=pool, work_dir=work_dir, **options
    )
    try:
        worker = await backend.start_worker(0)
        return worker.device, [await worker.predict(batch) for batch in batches]
    finally:
        await backend.close()


class Serve(Protocol):
    def __call__(
        self, builtin: str, packed: Packed, *batches: list[InferenceRequest], **options: Any
    ) -> list[list[Prediction]]: ...


@pytest.fixture
def serve(worker_pool: WorkerPool, tmp_path: Path) -> Serve:
    """Archive `packed` with ``--handler builtin``, serve `batches` from one worker (`predict`).

    Workers run on CPU unless the test passes `gpus`: the answers are compared with a
    reference computed on CPU, and a GPU's TF32 convolutions differ from it by about 1e-3.
    `handler` overrides the manifest's, as the register API's parameter does
    (torch-model-archiver refuses a dotted ``ts.torch_handler.<name>``)."""

    def serve(
        builtin: str, packed: Packed, *batches: list[InferenceRequest], **options: Any
    ) -> list[list[Prediction]]:
        path = build_archive(
            tmp_path,
            "m",
            builtin,
            packed.files,
            serialized=packed.serialized,
            model_file=packed.model_file,
        )
        options.setdefault("gpus", GpuRoundRobin(0))
        work_dir = tmp_path / "work"
        _, answers = aio.run(predict(worker_pool, path, batches, work_dir, **options), 60)
        return answers

    return serve


def ok(predictions: list[Prediction]) -> list[Any]:
    """The bodies, after checking that every request succeeded."""
    assert [p.status for p in predictions] == [200] * len(predictions), [
        p.body for p in predictions if p.status != 200
    ]
    return [p.body for p in predictions]
