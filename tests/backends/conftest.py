"""Archives built the way TorchServe users build them (torch-model-archiver), and helpers to
load them into a worker backend and run batches without pytest-asyncio."""

from __future__ import annotations

import functools
import json
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import torch

from api.core.types import InferenceRequest, ModelSettings
from tests.support import aio
from tests.support.archives import build_archive as support_build_archive

T = TypeVar("T")
ARCHIVER = Path(sys.executable).with_name("torch-model-archiver")


run = functools.partial(aio.run, timeout=None)


def requests(*bodies: Any, headers: Mapping[str, str] | None = None) -> list[InferenceRequest]:
    return [
        InferenceRequest({"body": body}, dict(headers or {}), f"req-{idx}")
        for idx, body in enumerate(bodies)
    ]


def settings(**overrides: Any) -> ModelSettings:
    return ModelSettings(**{"batch_size": 8, **overrides})


class BuildArchive(Protocol):
    def __call__(
        self,
        name: str,
        handler: str,
        files: Mapping[str, str | bytes] | None = None,
        *,
        serialized: str | None = None,
        version: str = "1.0",
        config: str | None = None,
        model_file: str | None = None,
        archive_format: str = "default",
    ) -> Path: ...


@pytest.fixture
def build_archive(tmp_path: Path) -> BuildArchive:
    """torch-model-archiver over source files; see `tests.support.archives.build_archive`."""
    return functools.partial(support_build_archive, tmp_path)


def write_zip(path: Path, members: Mapping[str, bytes | str], **kwargs: Any) -> Path:
    """A zip written by hand, for archives torch-model-archiver would never produce."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, **kwargs) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


def manifest(handler: str = "handler.py", **model: Any) -> str:
    return json.dumps(
        {
            "createdOn": "01/01/2025 00:00:00",
            "runtime": "python",
            "model": {"modelName": "m", "modelVersion": "1.0", "handler": handler, **model},
            "archiverVersion": "0.12.0",
        }
    )


class TinyLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]]))
            self.linear.bias.copy_(torch.tensor([0.5, -0.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def expected_linear(rows: list[list[float]]) -> list[list[float]]:
    out: list[list[float]] = TinyLinear()(torch.tensor(rows)).tolist()
    return out


@pytest.fixture(scope="session")
def scripted_model(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A TorchScript nn.Linear(4, 2) with fixed weights, as the bytes of its .pt file."""
    path = tmp_path_factory.mktemp("model") / "linear.pt"
    torch.jit.script(TinyLinear().eval()).save(str(path))
    return path.read_bytes()
