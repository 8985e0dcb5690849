"""Test images, and TorchServe's documented image preprocessing computed independently.

The reference follows torchvision's transforms as TorchServe 0.12 composes them, on a PIL image:
``Resize(256)`` (shorter side to 256, longer ``int(256 * long / short)``, PIL bilinear),
``CenterCrop(224)`` (offsets ``int(round((side - 224) / 2.0))``), ``ToTensor()`` (/ 255, CHW),
``Normalize(mean, std)`` with ImageNet's statistics. It is written with numpy slicing, not with
the handler's code, so the two can disagree.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def random_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Smooth random colours (blocks scaled up), so resizing has something to average."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(max(height // 16, 2), max(width // 16, 2), 3))
    image = Image.fromarray(blocks.astype(np.uint8), "RGB").resize((width, height))
    return image.convert(mode)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def rgb_array(data: bytes) -> np.ndarray:
    """HWC float32 in [0, 1]: ToTensor's values before the transpose."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255


def imagenet_reference(data: bytes) -> torch.Tensor:
    """TorchServe's image_classifier / image_segmenter input for an image file (CHW)."""
    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    short, long = sorted(image.size)
    size = (256, int(256 * long / short))
    if width > height:
        size = size[::-1]
    array = np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.float32) / 255
    top, left = int(round((size[1] - 224) / 2.0)), int(round((size[0] - 224) / 2.0))  # noqa: RUF046
    array = (array[top : top + 224, left : left + 224] - MEAN) / STD
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def to_tensor_reference(data: bytes) -> torch.Tensor:
    """TorchServe's object_detector input: ToTensor() alone (CHW in [0, 1])."""
    return torch.from_numpy(np.ascontiguousarray(rgb_array(data).transpose(2, 0, 1)))
