"""TorchServe's built-in ``image_segmenter``: an image in, the most probable class per pixel out.

Contract (TorchServe 0.12): an image per request (forms in `vision.py`), the ImageNet
transform (resize 256, center crop 224, normalise), a model answering per-pixel class scores
``[N, classes, H, W]`` (torchvision's segmentation models answer ``{"out": ...}``; a plain
tensor is taken too), softmax over the classes, and per request an ``[H, W, 2]`` array: for
every pixel ``[class index, probability]``, both float32 (the index as a float, as TorchServe
stacks them). TorchServe's documentation says ``[N, CL, H, W]``; its code answers this.

The answer is a numpy array, not nested lists: it travels from the worker without being built
as 100,000 Python floats, and serialises to the same JSON (float32 values, shortest form).

This module defines exactly one class (TorchServe's loader takes a module's single class).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from .vision import VisionHandler, imagenet_transform


class ImageSegmenter(VisionHandler):
    def transform(self, image: Image.Image) -> torch.Tensor:
        return imagenet_transform(image)

    def postprocess(self, output: Any, count: int) -> list[Any]:
        scores = output.get("out") if isinstance(output, dict) else output
        if not isinstance(scores, torch.Tensor) or scores.dim() != 4:
            raise TypeError(
                'expected per-pixel class scores [N, classes, H, W] (or {"out": ...}) from the '
                f"model, got {type(output).__name__}"
            )
        best = torch.softmax(scores.float(), dim=1).max(dim=1)
        classes = torch.stack([best.indices.to(best.values.dtype), best.values], dim=3)
        return list(classes.cpu().numpy())
