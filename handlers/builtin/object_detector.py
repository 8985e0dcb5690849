"""TorchServe's built-in ``object_detector``: an image in, its detections above 0.5 out.

Contract (TorchServe 0.12): an image per request (forms in `vision.py`), turned into a CHW
float tensor in [0, 1] and nothing else (no resize, no normalisation: detection models do their
own); a model answering, per image, ``{"boxes": [K, 4], "labels": [K], "scores": [K]}`` as
torchvision's detection models do; per request the detections with ``score >= 0.5``, in the
model's order, each ``{label: [x1, y1, x2, y2], "score": score}`` with the label from
``index_to_name.json`` (the class index as a string without it).

Also taken: a scripted torchvision detector, whose forward takes ``images: List[Tensor]``
and answers a ``(losses, detections)`` pair (one forward pass for the whole batch, whatever the
images' sizes); and an ONNX graph answering ``boxes``, ``labels``, ``scores`` (by those names,
else in that order). An ONNX graph whose image input has rank 3 (torchvision's export takes one
image) is run once per image.

Otherwise images of different sizes in one batch run as separate forward passes (TorchServe
stacks them and fails the batch). This module defines exactly one class (TorchServe's loader
takes it).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from PIL import Image

from .base import Prepared
from .labels import label
from .model import OnnxModel, TorchModel
from .vision import VisionHandler, to_tensor

_KEYS = ("boxes", "labels", "scores")


class ObjectDetector(VisionHandler):
    threshold = 0.5

    def transform(self, image: Image.Image) -> torch.Tensor:
        return to_tensor(image)

    def group_key(self, prepared: Prepared) -> Hashable:
        if isinstance(self.model, TorchModel) and self.model.takes_tensor_list:
            return prepared.tensor.dtype  # a list of images of any sizes is one forward pass
        return super().group_key(prepared)

    def run(self, items: list[Prepared]) -> list[Any]:
        model = self.model
        if isinstance(model, OnnxModel) and model.input_ranks[:1] == [3]:
            return [self.postprocess(model(item.tensor), 1)[0] for item in items]
        if isinstance(model, TorchModel) and model.takes_tensor_list:
            found = model.call_with_list([item.tensor for item in items])
            return self.postprocess(found, len(items))
        return super().run(items)

    def postprocess(self, output: Any, count: int) -> list[Any]:
        return [self._detections(found) for found in _per_image(output, count)]

    def _detections(self, found: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
        keep = found["scores"] >= self.threshold
        boxes, classes, scores = (found[key][keep].tolist() for key in _KEYS)
        return [
            {label(self.labels, int(index)): box, "score": score}
            for index, box, score in zip(classes, boxes, scores, strict=True)
        ]


def _per_image(output: Any, count: int) -> list[Mapping[str, torch.Tensor]]:
    """The model's answer as one {"boxes", "labels", "scores"} per image."""
    if (
        isinstance(output, tuple)
        and len(output) == 2
        and isinstance(output[0], dict)
        and isinstance(output[1], list)
    ):
        output = output[1]  # a scripted torchvision detector: (losses, detections)
    if isinstance(output, dict):
        found = {key: output[key] for key in _KEYS if key in output}
        if len(found) < len(_KEYS) and len(output) == len(_KEYS):
            found = dict(zip(_KEYS, output.values(), strict=True))  # ONNX outputs in order
        if len(found) == len(_KEYS):
            if found["boxes"].dim() == 2 and count == 1:
                return [found]
            if found["boxes"].dim() == 3:
                return [{key: found[key][i] for key in _KEYS} for i in range(count)]
    elif isinstance(output, list | tuple) and all(
        isinstance(row, dict) and all(key in row for key in _KEYS) for row in output
    ):
        return list(output)
    raise TypeError(
        'expected {"boxes", "labels", "scores"} per image from the model, got '
        f"{type(output).__name__}"
    )
