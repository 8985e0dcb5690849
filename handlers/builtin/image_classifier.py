"""TorchServe's built-in ``image_classifier``: an image in, its top 5 classes out.

Contract (TorchServe 0.12): an image per request (see `vision.py` for the accepted forms), the
ImageNet transform (resize 256, center crop 224, normalise), softmax over the model's class
scores ``[N, classes]``, and per request ``{label: probability}`` for the five most probable
classes, labelled through ``index_to_name.json`` (the class index as a string without it).
A model with fewer than five classes answers all of them (TorchServe fails the batch).

This module defines exactly one class: TorchServe's loader instantiates a handler module's
single class.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from .labels import label
from .vision import VisionHandler, imagenet_transform


class ImageClassifier(VisionHandler):
    topk = 5

    def transform(self, image: Image.Image) -> torch.Tensor:
        return imagenet_transform(image)

    def postprocess(self, output: Any, count: int) -> list[Any]:
        if not isinstance(output, torch.Tensor) or output.dim() != 2:
            raise TypeError(
                f"expected class scores [N, classes] from the model, got {_kind(output)}"
            )
        probabilities = torch.softmax(output.float(), dim=1)
        top = torch.topk(probabilities, min(self.topk, probabilities.shape[1]), dim=1)
        return [
            {
                label(self.labels, index): probability
                for index, probability in zip(*row, strict=True)
            }
            for row in zip(top.indices.tolist(), top.values.tolist(), strict=True)
        ]


def _kind(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return f"a tensor of shape {list(output.shape)}"
    return type(output).__name__
