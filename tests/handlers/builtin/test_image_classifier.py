"""image_classifier: image in, TorchServe's top-5 {label: probability} out, in all formats."""

from __future__ import annotations

import io
import json
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.handlers.builtin.conftest import (
    Packed,
    Serve,
    eager,
    items,
    model_class,
    ok,
    onnx,
    torchscript,
)
from tests.handlers.builtin.images import b64, encode, imagenet_reference, random_image
from tests.support.bombs import png_bomb

SOURCE = '''
import torch

CLASSES = 7


class TinyConvNet(torch.nn.Module):
    """Class scores from a strided conv and global average pooling: any image size goes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, kernel_size=5, stride=4)
        self.fc = torch.nn.Linear(6, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))
'''
NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "ray", "hen"]
# TorchServe's ImageNet file gives [wordnet id, name]; the name is the label.
INDEX_TO_NAME = {str(i): name for i, name in enumerate(NAMES)} | {"1": ["n01443537", "goldfish"]}

LANDSCAPE = encode(random_image(301, 233, seed=1))  # odd sizes: resize and crop rounding
PORTRAIT = encode(random_image(180, 400, seed=2), "JPEG")
GRAY = encode(random_image(256, 256, seed=3, mode="L"))  # TorchServe fails on 1 channel


def classifier(tmp_path: Path, fmt: str, source: str = SOURCE) -> tuple[torch.nn.Module, Packed]:
    torch.manual_seed(0)
    model = model_class(source, tmp_path)().eval()
    if fmt == "torchscript":
        return model, torchscript(model)
    if fmt == "eager":
        return model, eager(model, source)
    example = {"images": np.zeros((2, 3, 224, 224), np.float32)}
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "scores": {0: "batch"}}
    return model, onnx(model, example, ["scores"], axes, tmp_path)


def top5(model: torch.nn.Module, x: torch.Tensor, names: list[str] | None = NAMES) -> Any:
    """TorchServe's postprocess: softmax, topk(5), labels through index_to_name.json."""
    with torch.no_grad():
        probabilities = torch.softmax(model(x[None]), dim=1)[0]
    values, indices = probabilities.topk(min(5, len(probabilities)))
    labels = [names[i] if names else str(i) for i in indices.tolist()]
    return dict(zip(labels, values.tolist(), strict=True))


def assert_same(answer: dict[str, float], expected: dict[str, float]) -> None:
    assert list(answer) == list(expected)  # the same classes, most probable first
    assert answer == pytest.approx(expected, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("fmt", ["torchscript", "eager", "onnx"])
def test_answers_match_torchserve_preprocessing(serve: Serve, tmp_path: Path, fmt: str) -> None:
    model, packed = classifier(tmp_path, fmt)
    prepared = torch.randn(3, 64, 64).tolist()  # a prepared tensor as a JSON list, used as is
    wrapped = "\n".join(textwrap.wrap(b64(GRAY), 76))  # as the base64 tool writes it
    data_url = {"b64": "data:image/jpeg;base64," + b64(PORTRAIT)}
    batch = items(LANDSCAPE, PORTRAIT, b64(LANDSCAPE), wrapped, prepared, data_url)
    [answers] = serve(
        "image_classifier", packed.plus({"index_to_name.json": json.dumps(INDEX_TO_NAME)}), batch
    )
    expected = [
        top5(model, imagenet_reference(LANDSCAPE)),
        top5(model, imagenet_reference(PORTRAIT)),
        top5(model, imagenet_reference(LANDSCAPE)),
        top5(model, imagenet_reference(GRAY)),
        top5(model, torch.tensor(prepared)),
        top5(model, imagenet_reference(PORTRAIT)),
    ]
    for answer, want in zip(ok(answers), expected, strict=True):
        assert_same(answer, want)


def test_bad_requests_fail_alone(serve: Serve, tmp_path: Path) -> None:
    model, packed = classifier(tmp_path, "torchscript")
    batch = items(
        b"definitely not an image",
        LANDSCAPE[: len(LANDSCAPE) // 2],  # a truncated PNG
        "not base64 at all!",
        [[0.5] * 5] * 5,  # a prepared tensor of the wrong shape: the model refuses it
        LANDSCAPE,
        {"unexpected": "object"},
    )
    [answers] = serve("image_classifier", packed, batch)
    statuses = [(p.status, p.body["message"] if p.status != 200 else "") for p in answers]
    assert [status for status, _ in statuses] == [400, 400, 400, 400, 200, 400]
    assert "not an image" in statuses[0][1]
    assert "not a readable image" in statuses[1][1]
    assert "base64" in statuses[2][1]
    assert "cannot take an input of shape [5, 5]" in statuses[3][1]
    assert answers[0].body["type"] == "BadRequest"
    # Without index_to_name.json the labels are the class indices.
    assert_same(answers[4].body, top5(model, imagenet_reference(LANDSCAPE), names=None))


def test_fewer_classes_than_top5_and_dotted_name(serve: Serve, tmp_path: Path) -> None:
    """TorchServe's topk(5) fails a 3-class model; here it answers its 3 classes. The dotted
    module name TorchServe also resolves means the same handler."""
    source = SOURCE.replace("CLASSES = 7", "CLASSES = 3")
    model, packed = classifier(tmp_path, "eager", source)
    [[answer]] = serve(
        "image_classifier",
        packed,
        items(PORTRAIT),
        handler="ts.torch_handler.image_classifier",
    )
    assert answer.status == 200
    assert len(answer.body) == 3
    assert_same(answer.body, top5(model, imagenet_reference(PORTRAIT), names=None))


def test_images_over_the_pixel_limit_fail_alone_before_decoding(
    serve: Serve, tmp_path: Path
) -> None:
    """A 20 KB PNG of 13000x13000 pixels took 1.5 GB and seconds to decode; its header is all
    that is read now. The limit is the worker's (torchgate.max_image_pixels)."""
    model, packed = classifier(tmp_path, "torchscript")
    width, height = Image.open(io.BytesIO(LANDSCAPE)).size
    started = time.perf_counter()
    [answers] = serve("image_classifier", packed, items(png_bomb(), b64(png_bomb()), LANDSCAPE))
    assert time.perf_counter() - started < 20  # a worker's start included
    for answer in answers[:2]:
        assert answer.status == 413
        assert answer.body == {
            "code": 413,
            "type": "PayloadTooLarge",
            "message": "image of 13000x13000 pixels is over the limit of 40,000,000 pixels",
        }
    assert_same(answers[2].body, top5(model, imagenet_reference(LANDSCAPE), names=None))
    [answers] = serve(
        "image_classifier", packed, items(LANDSCAPE), max_image_pixels=width * height - 1
    )
    assert answers[0].status == 413
    [answers] = serve("image_classifier", packed, items(LANDSCAPE), max_image_pixels=None)
    assert_same(ok(answers)[0], top5(model, imagenet_reference(LANDSCAPE), names=None))
