"""The repo's example archives (model_store/, built by export/): digits 1.0 (TorchScript) and
2.0 (ONNX) ship the same digits_handler.py and torchgate_base.py, and serve side by side."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.backends.workers import load_worker_backend
from api.core.types import Prediction
from api.workers.pool import WorkerPool
from export.build import REPO_ROOT, ensure_archives
from tests.backends.conftest import requests, run, settings


@pytest.fixture(scope="module")
def model_store() -> Path:
    store = REPO_ROOT / "model_store"
    ensure_archives(store)
    return store


def test_two_versions_of_digits_side_by_side(
    worker_pool: WorkerPool, model_store: Path, tmp_path: Path
) -> None:
    image = [float(i % 17) for i in range(64)]

    async def scenario() -> dict[str, list[Prediction]]:
        backends = [
            await load_worker_backend(
                model_store / mar, settings(), pool=worker_pool, work_dir=tmp_path
            )
            for mar in ("digits.mar", "digits_v2.mar")
        ]
        try:
            workers = [await backend.start_worker(0) for backend in backends]
            return {
                backend.archive.version: await worker.predict(requests(image, "not an image"))
                for backend, worker in zip(backends, workers, strict=True)
            }
        finally:
            for backend in backends:
                await backend.close()

    results = run(scenario())
    assert sorted(results) == ["1.0", "2.0"]
    for predictions in results.values():
        ok, bad = predictions
        assert ok.status == 200 and isinstance(ok.body, dict) and ok.body
        assert all(label.isdigit() for label in ok.body)
        assert bad.status == 400 and bad.body["code"] == 400
        assert ok.headers["x-batch-size"] == "2"
