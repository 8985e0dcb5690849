"""Images in, tensors out, as TorchServe's VisionHandler does, with Pillow + numpy + torch.

TorchServe's vision handlers read a request as an image file (bytes), the same base64-encoded
(a str: a text body or a JSON string), or an already prepared tensor (a JSON list, used as is).
Also accepted here: ``{"b64": "..."}`` or ``{"data": ...}`` in a JSON object, and base64 as a
``data:`` URL. Images are
converted to RGB first: TorchServe hands a grayscale or RGBA PNG to its transforms as it is, and
the 3-channel normalisation then fails the whole batch.

The ImageNet transform is torchvision's ``Resize(256)``, ``CenterCrop(224)``, ``ToTensor()``,
``Normalize(mean, std)`` on a PIL image, rebuilt from what torchvision does:

- Resize(256): the shorter side becomes 256, the longer ``int(256 * long / short)``, with PIL's
  bilinear filter (torchvision hands PIL images to ``Image.resize``; PIL antialiases);
- CenterCrop(224): offsets ``round((side - 224) / 2)``, Python's (banker's) rounding;
- ToTensor: HWC uint8 -> CHW float32 / 255; Normalize: ``(x - mean) / std`` per channel.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..torchgate_base import (
    DEFAULT_MAX_IMAGE_PIXELS,
    BadRequest,
    Context,
    bounded_image,
    decode_base64,
    image_pixel_limit,
)
from .base import BuiltinHandler, Prepared

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE = 256
CROP = 224

# What Pillow raises for bytes that are not a whole, readable image (SyntaxError: some broken
# PNG chunks; DecompressionBombError: past twice Image.MAX_IMAGE_PIXELS).
_UNREADABLE = (
    UnidentifiedImageError,
    Image.DecompressionBombError,
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
)


def decode_image(payload: Any, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB image from image bytes or base64 text; BadRequest for anything else, TooLarge
    (413) before decoding an image of more than `max_pixels` pixels."""
    if isinstance(payload, dict):
        payload = payload.get("b64") or payload.get("data")
    if isinstance(payload, str):
        data = decode_base64(payload)
    elif isinstance(payload, bytes | bytearray | memoryview):
        data = bytes(payload)
    else:
        raise BadRequest("expected an image (bytes or base64 text) or a JSON list of numbers")
    try:
        with bounded_image(data, max_pixels) as image:
            image.load()  # decode now: a truncated file fails here, not later in a batch
            return image.convert("RGB")
    except BadRequest:
        raise
    except UnidentifiedImageError as exc:  # its message names a BytesIO object: useless
        raise BadRequest("not an image: Pillow knows no image format in these bytes") from exc
    except _UNREADABLE as exc:
        raise BadRequest(f"not a readable image: {exc}") from exc


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """torchvision's ``Resize(size)`` for a PIL image: the shorter side becomes `size`."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    if new_size == image.size:
        return image
    return image.resize(new_size, Image.Resampling.BILINEAR)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's ``CenterCrop(size)`` for an image at least `size` on both sides."""
    width, height = image.size
    left = round((width - size) / 2)
    top = round((height - size) / 2)
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """torchvision's ``ToTensor()`` for an RGB image: CHW float32 in [0, 1]."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    return pixels.permute(2, 0, 1).contiguous().to(torch.float32).div(255)


def normalize(
    tensor: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=tensor.dtype).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=tensor.dtype).view(-1, 1, 1)
    return (tensor - mean_t) / std_t


def imagenet_transform(image: Image.Image) -> torch.Tensor:
    """TorchServe's image_classifier / image_segmenter preprocessing (module docstring)."""
    cropped = center_crop(resize_shorter(image, RESIZE), CROP)
    return normalize(to_tensor(cropped), IMAGENET_MEAN, IMAGENET_STD)


def tensor_from_list(values: list[Any]) -> torch.Tensor:
    """A prepared input sent as a JSON list, as TorchServe's ``torch.FloatTensor(list)``."""
    try:
        tensor = torch.as_tensor(values, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise BadRequest(f"a JSON input must be a rectangular list of numbers: {exc}") from exc
    if not torch.isfinite(tensor).all():
        raise BadRequest("a JSON input must hold finite numbers")
    return tensor


class VisionHandler(BuiltinHandler):
    """An image (or a prepared JSON tensor) per request, transformed by `transform`."""

    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS  # from the context in `setup`

    def setup(self, context: Context) -> None:
        self.max_pixels = image_pixel_limit(context)
        # TorchServe's rule: without limit_max_image_pixels, Pillow's bomb limit is off.
        if self.max_pixels is None:
            Image.MAX_IMAGE_PIXELS = None

    def prepare(self, payload: Any) -> Prepared:
        if isinstance(payload, dict) and isinstance(payload.get("data"), list):
            payload = payload["data"]
        if isinstance(payload, list):
            return Prepared(tensor_from_list(payload), from_client=True)
        return Prepared(self.transform(decode_image(payload, self.max_pixels)))

    @abstractmethod
    def transform(self, image: Image.Image) -> torch.Tensor:
        """The model input (CHW) for one RGB image."""
