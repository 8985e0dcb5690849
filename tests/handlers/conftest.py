"""Fixtures for handler tests: built archives, extracted flat, loaded the way TorchServe loads
them, and a fake TorchServe context."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from export.archive import extract
from export.build import REPO_ROOT, ensure_archives


class FakeContext:
    """The part of `ts.context.Context` handlers use, recording per-item statuses/headers."""

    def __init__(self, model_dir: Path, request_headers: list[dict[str, str]] | None = None):
        manifest_path = model_dir / "MAR-INF" / "MANIFEST.json"
        self.manifest: dict[str, Any] | None = json.loads(manifest_path.read_text())
        self._system_properties: dict[str, Any] = {
            "model_dir": str(model_dir),
            "gpu_id": None,
            "batch_size": 8,
        }
        self.request_headers = request_headers or []
        self.statuses: dict[int, tuple[int, str]] = {}
        self.headers: dict[int, dict[str, str]] = {}

    @property
    def system_properties(self) -> dict[str, Any]:
        return self._system_properties

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        self.headers.setdefault(idx, {})[key] = value

    def get_request_header(self, idx: int, key: str) -> str | None:
        if idx >= len(self.request_headers):
            return None
        return self.request_headers[idx].get(key)


@pytest.fixture(scope="session")
def model_store() -> Path:
    store = REPO_ROOT / "model_store"
    ensure_archives(store)
    return store


@pytest.fixture(scope="session")
def extracted(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Archive stem ("digits", "digits_v2", "minilm") -> its flat extraction directory."""
    root = tmp_path_factory.mktemp("archives")
    return {
        mar.stem: extract(mar, root / mar.stem)
        for mar in sorted(model_store.glob("*.mar"))
        if mar.stem in ("digits", "digits_v2", "minilm")
    }


def load_flat(model_dir: Path, module_name: str) -> Any:
    """Import a handler module from an extracted archive as TorchServe's worker does (model
    directory on sys.path, plain module name), as a fresh module each time."""
    for name in (module_name, "torchgate_base"):
        sys.modules.pop(name, None)
    sys.path.insert(0, str(model_dir))
    try:
        return importlib.import_module(module_name)
    finally:
        sys.path.remove(str(model_dir))
        for name in (module_name, "torchgate_base"):
            sys.modules.pop(name, None)


@pytest.fixture(scope="session")
def loaded_handler(extracted: dict[str, Path]) -> Callable[[str], Any]:
    """Archive stem -> its handler, initialized from the extracted archive; cached."""
    cache: dict[str, Any] = {}

    def load(stem: str) -> Any:
        if stem not in cache:
            model_dir = extracted[stem]
            manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
            module = load_flat(model_dir, manifest["model"]["handler"].removesuffix(".py"))
            classes = [
                cls
                for cls in vars(module).values()
                if isinstance(cls, type) and cls.__module__ == module.__name__
            ]
            assert len(classes) == 1, "TorchServe needs exactly one class in a handler module"
            handler = classes[0]()
            handler.initialize(FakeContext(model_dir))
            cache[stem] = handler
        return cache[stem]

    return load


@pytest.fixture
def context_for(extracted: dict[str, Path]) -> Iterator[Callable[..., FakeContext]]:
    """Archive stem -> a fresh FakeContext on its extracted directory."""
    yield lambda stem, **kwargs: FakeContext(extracted[stem], **kwargs)


@pytest.fixture
def make_context() -> type[FakeContext]:
    """FakeContext itself, for a model directory of the test's own making."""
    return FakeContext
