"""object_detector: image in, TorchServe's [{label: box, "score": s}] above 0.5 out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

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
from tests.handlers.builtin.images import encode, random_image, to_tensor_reference

SOURCE = '''
from typing import Dict, List

import torch


class FixedBoxes(torch.nn.Module):
    """Three boxes per image, placed by the image's size, scored from its mean colour by a
    random linear layer. The biases put box 0 above TorchServe's 0.5 threshold and box 1 below
    it whatever the image; box 2 falls either side."""

    def __init__(self) -> None:
        super().__init__()
        self.score = torch.nn.Linear(3, 3)
        with torch.no_grad():
            self.score.bias.copy_(torch.tensor([8.0, -8.0, 0.0]))

    def forward(self, images: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        found: List[Dict[str, torch.Tensor]] = []
        for image in images:
            height, width = float(image.shape[1]), float(image.shape[2])
            boxes = torch.tensor(
                [
                    [0.0, 0.0, width, height],
                    [1.0, 2.0, 3.0, 4.0],
                    [width / 4, height / 4, width / 2, height / 2],
                ]
            )
            scores = torch.sigmoid(self.score(image.mean(dim=(1, 2))))
            labels = torch.tensor([1, 2, 3])
            found.append({"boxes": boxes, "labels": labels, "scores": scores})
        return found
'''
INDEX_TO_NAME = {"1": "cat", "2": "dog", "3": "bird"}
# The same detector as torchvision scripts its own: images as a list of [3, H, W] tensors, each
# of its own size, and a (losses, detections) pair back.
LIST_SOURCE = (
    SOURCE.replace("from typing import Dict, List", "from typing import Dict, List, Tuple")
    .replace(
        "def forward(self, images: torch.Tensor) -> List[Dict[str, torch.Tensor]]:",
        "def forward(\n        self, images: List[torch.Tensor]\n"
        "    ) -> Tuple[Dict[str, torch.Tensor], List[Dict[str, torch.Tensor]]]:",
    )
    .replace("        return found\n", "        return {}, found\n")
)


class OneImage(torch.nn.Module):
    """The detector as torchvision exports one to ONNX: one image [3, H, W] in, boxes, labels
    and scores out."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.score = inner.get_submodule("score")

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Sizes as tensors that follow the input, so the exported graph keeps H and W dynamic.
        w = torch.ones_like(image[0, 0, :]).sum()
        h = torch.ones_like(image[0, :, 0]).sum()
        zero = torch.zeros_like(w)
        boxes = torch.stack(
            [
                torch.stack([zero, zero, w, h]),
                torch.tensor([1.0, 2.0, 3.0, 4.0]),
                torch.stack([w / 4, h / 4, w / 2, h / 2]),
            ]
        )
        scores = torch.sigmoid(self.score(image.mean(dim=(1, 2))))
        return boxes, torch.tensor([1, 2, 3]), scores


def reference(model: torch.nn.Module, image: bytes, names: dict[str, str] | None) -> Any:
    """TorchServe's object_detector: ToTensor only, keep scores >= 0.5, {label: box, score}."""
    with torch.no_grad():
        [found] = model(to_tensor_reference(image)[None])
    keep = found["scores"] >= 0.5
    return [
        {(names or {}).get(str(label), str(label)): box, "score": score}
        for box, label, score in zip(
            found["boxes"][keep].tolist(),
            found["labels"][keep].tolist(),
            found["scores"][keep].tolist(),
            strict=True,
        )
    ]


def assert_same(answer: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert [list(found) for found in answer] == [list(found) for found in expected]
    for found, want in zip(answer, expected, strict=True):
        for key, value in want.items():
            assert found[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def detector(tmp_path: Path, fmt: str) -> tuple[torch.nn.Module, Packed]:
    torch.manual_seed(2)
    model = model_class(SOURCE, tmp_path)().eval()
    if fmt == "eager":
        return model, eager(model, SOURCE)
    if fmt == "torchscript":
        return model, torchscript(model)
    example = {"image": np.zeros((3, 48, 64), np.float32)}
    axes = {"image": {1: "height", 2: "width"}}
    return model, onnx(OneImage(model), example, ["boxes", "labels", "scores"], axes, tmp_path)


IMAGES = [
    encode(random_image(64, 48, seed=6)),
    encode(random_image(64, 48, seed=7), "JPEG"),
    encode(random_image(100, 30, seed=8)),  # another size: its own forward pass
    encode(random_image(64, 48, seed=9, mode="RGBA")),
]


@pytest.mark.parametrize("fmt", ["eager", "torchscript", "onnx"])
def test_detections_match_reference(serve: Serve, tmp_path: Path, fmt: str) -> None:
    model, packed = detector(tmp_path, fmt)
    labelled = packed.plus({"index_to_name.json": json.dumps(INDEX_TO_NAME)})
    [answers] = serve("object_detector", labelled, items(*IMAGES))
    for answer, image in zip(ok(answers), IMAGES, strict=True):
        assert_same(answer, reference(model, image, INDEX_TO_NAME))
        assert 1 <= len(answer) <= 2 and "cat" in answer[0]  # box 0 always, box 1 never


def test_a_scripted_detector_taking_a_list_of_images(serve: Serve, tmp_path: Path) -> None:
    """torchvision's scripted detectors take `images: List[Tensor]`: the batch goes as a list
    (images of different sizes in one pass), the (losses, detections) pair is unpacked."""
    model, _ = detector(tmp_path, "eager")
    listed = model_class(LIST_SOURCE, tmp_path)().eval()
    listed.load_state_dict(model.state_dict())
    [_, images] = torch.jit.script(listed).forward.schema.arguments  # type: ignore[attr-defined]
    assert str(images.type) == "List[Tensor]"
    labelled = torchscript(listed).plus({"index_to_name.json": json.dumps(INDEX_TO_NAME)})
    [answers] = serve("object_detector", labelled, items(*IMAGES))
    for answer, image in zip(ok(answers), IMAGES, strict=True):
        assert_same(answer, reference(model, image, INDEX_TO_NAME))


def test_bad_image_fails_alone_and_labels_default_to_indices(serve: Serve, tmp_path: Path) -> None:
    model, packed = detector(tmp_path, "eager")
    [answers] = serve("object_detector", packed, items(IMAGES[0], b"GIF89a-but-not-really"))
    assert_same(ok(answers[:1])[0], reference(model, IMAGES[0], None))
    assert answers[1].status == 400 and answers[1].body["type"] == "BadRequest"
