"""The built-in handlers on a GPU: the worker's CUDA device, the same answers as on CPU.

Skipped without CUDA (this project's usual machines). Tolerances are looser than the CPU
tests': convolutions on a GPU run in TF32 by default, about 1e-3 from the CPU reference.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from api.workers.pool import WorkerPool
from tests.handlers.builtin.conftest import items, predict
from tests.handlers.builtin.images import imagenet_reference
from tests.handlers.builtin.test_image_classifier import LANDSCAPE, PORTRAIT, classifier, top5
from tests.support import aio
from tests.support.archives import build_archive

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("fmt", ["torchscript", "eager", "onnx"])
def test_image_classifier_runs_on_the_workers_gpu(
    worker_pool: WorkerPool, tmp_path: Path, fmt: str
) -> None:
    model, packed = classifier(tmp_path, fmt)
    path = build_archive(
        tmp_path,
        "m",
        "image_classifier",
        packed.files,
        serialized=packed.serialized,
        model_file=packed.model_file,
    )
    device, [answers] = aio.run(
        predict(worker_pool, path, [items(LANDSCAPE, PORTRAIT)], tmp_path / "work"), 120
    )
    # A first worker's GPU, as TorchServe's round robin gives it: 1 of several, else 0.
    assert device == f"cuda:{1 % torch.cuda.device_count()}"
    for answer, image in zip(answers, [LANDSCAPE, PORTRAIT], strict=True):
        expected = top5(model, imagenet_reference(image), names=None)
        assert answer.status == 200, answer.body
        assert next(iter(answer.body)) == next(iter(expected))  # the same most probable class
        assert answer.body == pytest.approx(expected, rel=1e-2, abs=1e-3)
