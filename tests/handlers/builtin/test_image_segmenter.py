"""image_segmenter: image in, TorchServe's [H, W, 2] map of [class, probability] per pixel out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.handlers.builtin.conftest import Serve, items, model_class, ok, onnx, torchscript
from tests.handlers.builtin.images import encode, imagenet_reference, random_image

SOURCE = '''
from typing import Dict

import torch


class TinySegmenter(torch.nn.Module):
    """Five class scores per pixel, answered as torchvision's segmentation models do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"out": self.conv(x)}
'''

SQUARE = encode(random_image(300, 300, seed=4))
TALL = encode(random_image(240, 333, seed=5), "JPEG")


class ScoresOnly(torch.nn.Module):
    """The same network answering the bare tensor, as an ONNX graph with one output does."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x)["out"]
        return out


def reference(model: torch.nn.Module, image: bytes) -> np.ndarray:
    """TorchServe's postprocess: softmax over classes, then per pixel [argmax, max]."""
    with torch.no_grad():
        probabilities = torch.softmax(model(imagenet_reference(image)[None])["out"], dim=1)[0]
    best = probabilities.max(dim=0)
    return torch.stack([best.indices.float(), best.values], dim=2).numpy()


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_class_map_matches_reference(serve: Serve, tmp_path: Path, fmt: str) -> None:
    torch.manual_seed(1)
    model = model_class(SOURCE, tmp_path)().eval()
    if fmt == "torchscript":
        packed = torchscript(model)
    else:
        example = {"images": np.zeros((1, 3, 224, 224), np.float32)}
        packed = onnx(ScoresOnly(model), example, ["out"], {"images": {0: "n"}}, tmp_path)
    [answers] = serve("image_segmenter", packed, items(SQUARE, b"\x89PNG broken", TALL))
    assert answers[1].status == 400
    for answer, image in zip(ok([answers[0], answers[2]]), [SQUARE, TALL], strict=True):
        got, want = np.asarray(answer), reference(model, image)
        assert got.shape == want.shape == (224, 224, 2)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got[..., 0], want[..., 0])
        np.testing.assert_allclose(got[..., 1], want[..., 1], rtol=1e-4, atol=1e-6)
