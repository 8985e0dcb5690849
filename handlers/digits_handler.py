"""Handler for the 8x8 digits classifier (TorchScript or ONNX, as the archive says).

Accepted request bodies, one image per request unless it is a KServe v2 tensor:

- an image file (PNG, JPEG, ... of up to 40 M pixels, or the context's ``max_image_pixels``:
  a larger one is refused with 413 from its header, undecoded), or the same base64-encoded in
  a text body (wrapped in lines, or a ``data:image/...;base64,`` URL, too); a transparent
  background counts as paper (a canvas drawing);
- a JSON array of 64 numbers (0..16, ink high, as in scikit-learn's ``load_digits``; 8x8 nested
  is fine), or ``{"data": [...64 numbers], "topk": k}``;
- a KServe v2 request ``{"inputs": [{"name", "shape", "datatype", "data"}]}`` whose data (a
  list, nested list or numpy array, 0..16) holds N images: shape ``[..., 64]`` or ``[..., 8, 8]``.

Answers: ``{"7": 0.98, "1": 0.01, ...}``, the top-k labels by probability (k = 5 unless the
request's "topk" field, query parameter or header says otherwise); for a v2 request
``{"outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [N, 10], "data": ...}]}``
with every probability.

Images become what the dataset holds: grayscale, inverted when the digit is dark on a light
background (the dataset's ink is high), cropped to the ink, padded square, area-averaged to
8x8 and scaled to 0..16. The network then sees intensity / 16 (signature.json, preprocessing).

This module defines exactly one class: TorchServe instantiates the single class of a handler
module that has no module-level ``handle`` function.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

try:  # in this repo
    from .torchgate_base import (
        DEFAULT_MAX_IMAGE_PIXELS,
        BadRequest,
        Context,
        Decoded,
        ModelHandler,
        bounded_image,
        decode_base64,
        image_pixel_limit,
        is_v2,
        looks_like_json,
        parse_json,
        v2_input,
        v2_response,
    )
except ImportError:  # extracted flat from an archive: the base module sits next to this file
    from torchgate_base import (  # type: ignore[no-redef]
        DEFAULT_MAX_IMAGE_PIXELS,
        BadRequest,
        Context,
        Decoded,
        ModelHandler,
        bounded_image,
        decode_base64,
        image_pixel_limit,
        is_v2,
        looks_like_json,
        parse_json,
        v2_input,
        v2_response,
    )

PIXELS = 64
MAX_VALUE = 16.0
DEFAULT_TOPK = 5
INK_THRESHOLD = 0.2  # fraction of full ink that counts as part of the digit when cropping


# ITU-R 601 luma, as PIL's convert("L")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _gray_on_paper(image: Image.Image) -> np.ndarray:
    """The image in gray, 0..1, its transparent parts as paper: a drawing from a canvas (ink on
    a transparent background) would otherwise turn all black, ink and background alike, and
    read as a blank digit. The paper is white under dark ink and black under light ink."""
    if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
    alpha, gray = rgba[..., 3], rgba[..., :3] @ _LUMA
    # The ink's shade weighted by its opacity: faint strokes count too (a light drawing made
    # only of half-transparent strokes read as dark ink on white, a blank digit).
    covered = float(alpha.sum())
    light_ink = covered > 0 and float((gray * alpha).sum()) / covered > 0.5
    paper = 0.0 if light_ink else 1.0
    return gray * alpha + paper * (1.0 - alpha)


def image_to_digits(data: bytes, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Any image of at most `max_pixels` pixels -> 64 float32 values 0..16 shaped like a
    ``load_digits`` sample; `TooLarge` (413) before decoding a larger one."""
    try:
        with bounded_image(data, max_pixels) as image:
            image.load()
            gray = _gray_on_paper(image)
    except BadRequest:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise BadRequest(f"body is neither JSON nor a readable image ({exc})") from exc
    # Decide the background from the border: a light border means dark ink on light paper.
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    ink = 1.0 - gray if float(border.mean()) > 0.5 else gray
    rows = np.flatnonzero(ink.max(axis=1) > INK_THRESHOLD)
    cols = np.flatnonzero(ink.max(axis=0) > INK_THRESHOLD)
    if rows.size == 0:
        return np.zeros(PIXELS, dtype=np.float32)  # a blank image is a valid (blank) digit
    ink = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    # Dataset digits fill the height of the 8x8 box and keep their aspect ratio: pad square.
    side = max(ink.shape)
    square = np.zeros((side, side), dtype=np.float32)
    top, left = (side - ink.shape[0]) // 2, (side - ink.shape[1]) // 2
    square[top : top + ink.shape[0], left : left + ink.shape[1]] = ink
    # BOX resampling averages each source area, like the dataset's 4x4 block counts.
    small = Image.fromarray(square, mode="F").resize((8, 8), Image.Resampling.BOX)
    return np.clip(np.asarray(small, dtype=np.float32), 0.0, 1.0).reshape(PIXELS) * MAX_VALUE


def values_to_digits(values: Any) -> np.ndarray:
    """A JSON list (flat 64 or 8x8 nested) -> 64 float32 values."""
    try:
        array = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise BadRequest("expected 64 numbers (8x8 pixels, 0..16)") from exc
    if array.size != PIXELS:
        raise BadRequest(f"expected 64 numbers (8x8 pixels, 0..16), got {array.size}")
    return array.reshape(PIXELS)


def v2_to_digits(tensor: dict[str, Any]) -> np.ndarray:
    """A KServe v2 input tensor -> ``[N, 64]`` float32, N >= 1."""
    datatype = tensor.get("datatype", "FP32")
    if datatype not in ("FP32", "FP64", "FP16", "INT32", "INT64", "UINT8"):
        raise BadRequest(f"input datatype {datatype} not supported, send FP32")
    try:
        array = np.asarray(tensor["data"], dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise BadRequest("input data must be numbers") from exc
    shape = tensor.get("shape")
    if shape is not None:
        try:
            shape = [int(dim) for dim in shape]
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"input shape must be a list of integers, got {shape!r}") from exc
        if int(np.prod(shape)) != array.size:
            raise BadRequest(f"shape {shape} does not match {array.size} data values")
        if not (shape[-1:] == [PIXELS] or shape[-2:] == [8, 8]):
            raise BadRequest(f"shape {shape}: expected [..., 64] or [..., 8, 8]")
    if array.size == 0 or array.size % PIXELS:
        raise BadRequest(f"expected a multiple of 64 values, got {array.size}")
    return finite_pixels(array.reshape(-1, PIXELS))


def finite_pixels(pixels: np.ndarray) -> np.ndarray:
    """`pixels` unless one is NaN or infinite: the network would answer NaN probabilities.

    The one check for every way numbers arrive (a JSON array on /predictions, a v2 tensor as
    JSON, binary or gRPC contents), so every API refuses them alike.
    """
    if not np.isfinite(pixels).all():
        raise BadRequest("pixel values must be finite numbers")
    return pixels


class DigitsHandler(ModelHandler):
    """Classifies 8x8 digits; see the module docstring for the request/response contract."""

    def setup(self, context: Context) -> None:
        self.max_pixels = image_pixel_limit(context)
        self.labels: list[str] = list(self.signature.get("labels") or map(str, range(10)))
        self.scale = float(self.signature.get("preprocessing", {}).get("divide_by", MAX_VALUE))
        outputs = self.signature.get("outputs") or [{"name": "probabilities"}]
        self.output_name = str(outputs[0]["name"])
        inputs = self.signature.get("inputs") or [{"name": "pixels"}]
        self.input_name = str(inputs[0]["name"])

    def decode(self, payload: Any, item: Any, idx: int, context: Context) -> Decoded:
        if isinstance(payload, (bytes, bytearray)):
            if not looks_like_json(payload):
                return self._image(self._digits(bytes(payload)), payload, item, idx, context)
            payload = parse_json(bytes(payload).decode("utf-8", "replace"))
        elif isinstance(payload, str):
            if not looks_like_json(payload):
                image = decode_base64(payload)
                return self._image(self._digits(image), payload, item, idx, context)
            payload = parse_json(payload)
        if is_v2(payload):
            tensor = v2_input(payload, self.input_name)
            pixels = v2_to_digits(tensor)
            numpy_out = isinstance(tensor["data"], np.ndarray)
            return Decoded(len(pixels), pixels, v2=True, numpy_out=numpy_out)
        # Parsed JSON by now, so a {"data": ..., "topk": k} body is seen whatever its encoding.
        options: dict[str, Any] = {"topk": self._topk(payload, item, idx, context)}
        if isinstance(payload, dict):
            if "data" not in payload:
                raise BadRequest('JSON object must hold "data": [64 numbers]')
            payload = payload["data"]
        if not isinstance(payload, (list, np.ndarray)):
            raise BadRequest("expected an image, a JSON array of 64 numbers or a v2 request")
        pixels = finite_pixels(values_to_digits(payload))
        return Decoded(1, pixels[None], options=options)

    def _digits(self, image: bytes) -> np.ndarray:
        return image_to_digits(image, self.max_pixels)

    def _image(
        self, pixels: np.ndarray, payload: Any, item: Any, idx: int, context: Context
    ) -> Decoded:
        options = {"topk": self._topk(payload, item, idx, context)}
        return Decoded(1, pixels[None], options=options)

    def collate(self, items: list[Decoded]) -> dict[str, np.ndarray]:
        pixels = np.concatenate([item.value for item in items]) / self.scale
        return {self.input_name: np.ascontiguousarray(pixels.reshape(-1, 1, 8, 8), np.float32)}

    def respond(self, item: Decoded, output: np.ndarray) -> Any:
        if item.v2:
            return v2_response(self.output_name, output, item.numpy_out)
        # Ten values: sorted as Python floats, one numpy call instead of one per label read
        # (a numpy call right after the forward pass runs with cold caches, several us each).
        # Python's sort is stable with reverse=True too: ties keep label order.
        probabilities = output[0].tolist()
        top = sorted(range(len(probabilities)), key=probabilities.__getitem__, reverse=True)
        return {self.labels[i]: probabilities[i] for i in top[: item.options["topk"]]}

    def _topk(self, payload: Any, item: Any, idx: int, context: Context) -> int:
        raw: Any = None
        if isinstance(payload, dict) and "topk" in payload:
            raw = payload["topk"]
        elif isinstance(item, dict) and item.get("topk") is not None:
            raw = item["topk"]  # query parameter or form field
        else:
            get_header = getattr(context, "get_request_header", None)
            if get_header is not None:
                try:
                    raw = get_header(idx, "topk")
                except (AttributeError, IndexError, KeyError, TypeError):
                    raw = None  # a context without per-request headers
        if raw is None:
            return min(DEFAULT_TOPK, len(self.labels))
        if isinstance(raw, (bytes, bytearray)):
            raw = raw.decode("utf-8", "replace")
        try:
            topk = int(raw)
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"topk must be an integer, got {raw!r}") from exc
        if not 1 <= topk <= len(self.labels):
            raise BadRequest(f"topk must be between 1 and {len(self.labels)}, got {topk}")
        return topk
