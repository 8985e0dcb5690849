"""Archives built the way TorchServe users build them (torch-model-archiver), and helpers to
load them into a LocalBackend and run batches without pytest-asyncio."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import torch

from api.core.types import InferenceRequest, ModelSettings

T = TypeVar("T")
ARCHIVER = Path(sys.executable).with_name("torch-model-archiver")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


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
    """Write source files and run torch-model-archiver on them; returns the archive's path.

    `handler` is a file among `files` or a built-in handler name; the files not named by
    `handler`, `serialized`, `config` or `model_file` become --extra-files.
    """
    counter = iter(range(1_000_000))

    def build(
        name: str,
        handler: str,
        files: Mapping[str, str | bytes] | None = None,
        *,
        serialized: str | None = None,
        version: str = "1.0",
        config: str | None = None,
        model_file: str | None = None,
        archive_format: str = "default",
    ) -> Path:
        src = tmp_path / f"src-{name}-{next(counter)}"
        src.mkdir()
        for file_name, content in (files or {}).items():
            # The archiver copies a directory's *contents*: nested files go under _tree/.
            target = src / "_tree" / file_name if "/" in file_name else src / file_name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(textwrap.dedent(content))
        export = tmp_path / f"export-{next(counter)}"
        export.mkdir()
        special = {handler, serialized, config, model_file}
        extra = [str(src / f) for f in (files or {}) if f not in special and "/" not in f]
        if any("/" in f for f in files or {}):
            extra.append(str(src / "_tree"))
        command = [
            str(ARCHIVER),
            "--model-name", name,
            "--version", version,
            "--handler", str(src / handler) if handler in (files or {}) else handler,
            "--export-path", str(export),
            "--archive-format", archive_format,
        ]  # fmt: skip
        if serialized:
            command += ["--serialized-file", str(src / serialized)]
        if config:
            command += ["--config-file", str(src / config)]
        if model_file:
            command += ["--model-file", str(src / model_file)]
        if extra:
            command += ["--extra-files", ",".join(extra)]
        subprocess.run(command, check=True, capture_output=True)
        suffix = {"default": ".mar", "tgz": ".tar.gz", "no-archive": ""}[archive_format]
        return export / f"{name}{suffix}"

    return build


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
