"""Shared machinery of torchgate's example handlers (TorchServe's handler contract).

This module travels inside every example archive as an extra file, next to the handler, and
archives are extracted flat: there the handler imports it as ``torchgate_base``, in this repo as
``handlers.torchgate_base``. The distinctive name keeps it from shadowing, or being shadowed by,
another archive's ``base``/``common`` module. It imports only the standard library, numpy,
torch and (lazily) onnxruntime and Pillow, because it runs inside TorchServe workers too.

A handler subclasses `ModelHandler` and implements three steps; `ModelHandler.handle` runs them
so that every valid item of a batch goes through the model in ONE forward pass and a bad item
fails alone::

    decode(payload, item, idx, context) -> Decoded   # one request; raise BadRequest if bad
    collate([Decoded, ...]) -> {input name: array}   # the whole batch, rows in item order
    respond(Decoded, rows) -> JSON-able response     # this item's rows of the model output

A bad item gets ``context.set_response_status(400, message, idx)`` and the response body
``{"code": 400, "type": "BadRequest", "message": ...}`` (413 and "PayloadTooLarge" for an image
of too many pixels, or more rows than ``max_items_per_request`` in one request); TorchServe
sends each item's status and body to its own client. Every response carries the header
``x-batch-size`` (number of requests that shared the forward pass), so batching is observable
from outside.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

logger = logging.getLogger(__name__)

BATCH_SIZE_HEADER = "x-batch-size"
# Request fields that carry options, never the payload, when an item is a form/query dict.
OPTION_FIELDS = frozenset({"topk"})
TORCHSCRIPT_SUFFIXES = frozenset({".pt", ".pth", ".ts", ".torchscript"})
JSON_TOO_DEEP = "nested deeper than the parser's recursion limit"
# torchgate passes its torchgate.max_image_pixels as the system property "max_image_pixels";
# elsewhere (TorchServe) this default applies, the same as torchgate's.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# The same for torchgate.max_items_per_request ("max_items_per_request"): the most rows (images,
# texts) one request may bring; 1.5 M one-word texts fit in a 6 MB JSON list.
DEFAULT_MAX_ITEMS_PER_REQUEST = 1024
# Texts are cut to this many characters per token of the model's maximum sequence length
# before tokenizing. English averages about 4 characters a token; 64 leaves room for long
# words, numbers and indentation, so for ordinary text every token the model keeps comes from
# the part kept, and 6 MB of text costs what a full-length one does (tokenizing all of it took
# seconds and gigabytes, to keep the first 256 tokens).
CHARACTERS_PER_TOKEN = 64


class BadRequest(ValueError):
    """The item cannot be served as sent; its message goes back to that item's client."""

    code = 400
    type = "BadRequest"

    def to_response(self) -> dict[str, Any]:
        return {"code": self.code, "type": self.type, "message": str(self)}


class TooLarge(BadRequest):
    """The item is larger than the handler serves (an image with too many pixels)."""

    code = 413
    type = "PayloadTooLarge"


@dataclass
class Decoded:
    """One valid request of a batch: `rows` model-input rows (images, texts) in `value`."""

    rows: int
    value: Any
    v2: bool = False  # answer with KServe v2 "outputs" instead of the plain response
    numpy_out: bool = False  # v2 data came in as numpy; hand numpy back (the engine encodes it)
    single: bool = True  # one text/image sent bare, not as a list
    options: dict[str, Any] = field(default_factory=dict)


class Context(Protocol):
    """The part of TorchServe's `ts.context.Context` these handlers use."""

    @property
    def system_properties(self) -> dict[str, Any]: ...

    manifest: dict[str, Any] | None

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None: ...


# --- payload helpers ---------------------------------------------------------------------------


def request_payload(item: Any) -> Any:
    """The payload of one TorchServe request item.

    TorchServe hands each item as a dict: the raw body under "body" (or "data"), multipart form
    fields and query parameters under their own names; the value is bytes, a str for text/*
    bodies, or already-parsed JSON for application/json. A dict carrying "inputs" is a KServe v2
    request handed over directly (torchgate's engine does that for v2 tensors).
    """
    if not isinstance(item, dict):
        return item
    for key in ("body", "data"):
        if item.get(key) is not None:
            return item[key]
    if "inputs" in item:
        return item
    for key, value in item.items():
        if key not in OPTION_FIELDS and value is not None:
            return value
    raise BadRequest("empty request: no body, no form field")


def as_text(value: bytes | bytearray | str) -> str:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"body is not valid UTF-8 text ({exc.reason})") from exc


def decode_base64(text: str) -> bytes:
    """Base64 as clients send it: wrapped in lines (the `base64` tool wraps at 76 columns,
    which TorchServe's lenient decoder accepts) or as a ``data:image/...;base64,`` URL."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"text is not base64-encoded image data: {exc}") from exc


def parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"invalid JSON: {exc.msg} at position {exc.pos}") from exc
    except RecursionError as exc:  # the json module recurses once per nesting level
        raise BadRequest(f"invalid JSON: {JSON_TOO_DEEP}") from exc


def truncate_text(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, without a word cut in two at the end."""
    if len(text) <= limit:
        return text
    if text[limit].isspace():
        return text[:limit]
    cut = text[:limit]
    last_space = max(cut.rfind(" "), cut.rfind("\n"), cut.rfind("\t"))
    return cut[:last_space] if last_space > 0 else cut


def image_pixel_limit(context: Context) -> int | None:
    """The most pixels an image may have (None: no limit), from the context's properties.

    TorchServe's ``limit_max_image_pixels`` false lifts the limit, as it lifts Pillow's there.
    """
    properties = context.system_properties
    if not properties.get("limit_max_image_pixels", True):
        return None
    return int(properties.get("max_image_pixels") or DEFAULT_MAX_IMAGE_PIXELS)


@contextmanager
def bounded_image(data: bytes, limit: int | None) -> Iterator[Any]:
    """Pillow's image of `data`, refused with `TooLarge` before a pixel is decoded when its
    header declares more than `limit` pixels. A 164 KB PNG can declare 13000x13000 pixels,
    1.5 GB once decoded: the header is all that is read of it here.
    """
    from PIL import Image  # here: only image handlers need Pillow

    with warnings.catch_warnings():
        # Pillow warns past its own MAX_IMAGE_PIXELS; the limit is checked right below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
    with image:
        width, height = image.size
        if limit is not None and width * height > limit:
            raise TooLarge(
                f"image of {width}x{height} pixels is over the limit of {limit:,} pixels"
            )
        yield image


def looks_like_json(value: bytes | bytearray | str) -> bool:
    head = value[:64].lstrip()
    if isinstance(head, str):
        return head[:1] in ("[", "{")
    return head[:1] in (b"[", b"{")


def is_v2(payload: Any) -> bool:
    return isinstance(payload, dict) and isinstance(payload.get("inputs"), list)


def v2_input(payload: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """The KServe v2 input tensor called `name` (or the only/first one), checked for "data"."""
    inputs = payload["inputs"]
    if not inputs:
        raise BadRequest('KServe v2 request has an empty "inputs" list')
    chosen = next((t for t in inputs if isinstance(t, dict) and t.get("name") == name), inputs[0])
    if not isinstance(chosen, dict) or "data" not in chosen:
        raise BadRequest(
            'KServe v2 input must be an object with "name", "shape", "datatype", "data"'
        )
    return chosen


def v2_response(name: str, array: np.ndarray, numpy_out: bool) -> dict[str, Any]:
    """KServe v2 "outputs" for one item: flat row-major list data (JSON-able, what TorchServe
    can serialize), or the array itself when the request came with numpy data."""
    data: Any = array if numpy_out else array.ravel().tolist()
    return {
        "outputs": [{"name": name, "datatype": "FP32", "shape": list(array.shape), "data": data}]
    }


def reason_phrase(message: str) -> str:
    """TorchServe puts the phrase in the HTTP status line: one ASCII line, kept short."""
    line = " ".join(message.split())
    return line.encode("ascii", "replace").decode("ascii")[:200]


# --- devices and runtimes ------------------------------------------------------------------------


def select_device(context: Context) -> torch.device:
    """CUDA device `gpu_id` when CUDA is there and TorchServe assigned a GPU, else CPU (the
    rule of TorchServe's BaseHandler: no gpu_id means the operator chose CPU)."""
    gpu_id = context.system_properties.get("gpu_id")
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device("cuda", int(gpu_id))
    return torch.device("cpu")


class Runner(ABC):
    """A loaded serialized model: named numpy inputs in, first output as numpy out."""

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray: ...


class TorchScriptRunner(Runner):
    def __init__(self, path: Path, input_names: list[str], device: torch.device) -> None:
        self.module = torch.jit.load(str(path), map_location=device)
        self.module.eval()
        self.input_names = input_names
        self.device = device

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            tensors = [torch.from_numpy(inputs[n]).to(self.device) for n in self.input_names]
            output: torch.Tensor = self.module(*tensors)
            return output.cpu().numpy()

    def warm_up(self, specs: list[dict[str, Any]], max_batch: int) -> None:
        """Run every batch size the batcher can send, twice, before serving.

        TorchScript's profiling executor specializes the graph for each new input shape over
        its first runs; unwarmed, the first requests of each batch size took 3-30 ms instead of
        0.1 ms, and showed up as p99 spikes under load.
        """
        sizes = sorted({*range(1, min(max_batch, 16) + 1), max_batch})
        for size in sizes:
            example = {
                spec["name"]: np.zeros(
                    [size, *(d if d > 0 else 8 for d in spec["shape"][1:])],
                    dtype=spec.get("numpy_dtype", "float32"),
                )
                for spec in specs
            }
            for _ in range(2):
                self.run(example)


class OnnxRunner(Runner):
    def __init__(self, path: Path, device: torch.device) -> None:
        import onnxruntime

        providers: list[Any] = ["CPUExecutionProvider"]
        if device.type == "cuda":
            # Ask for CUDA only with a GPU: onnxruntime-gpu falls back to CPU, noisily, without
            # one. preload_dlls() (ORT >= 1.21) loads the CUDA/cuDNN libraries torch ships with.
            if hasattr(onnxruntime, "preload_dlls"):
                onnxruntime.preload_dlls()
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), *providers]
        options = onnxruntime.SessionOptions()
        # One pool per worker, sized like torch's for this worker thread, and no spin-waiting:
        # a spinning pool thread takes the core the server's event loop needs between batches.
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(
            str(path), sess_options=options, providers=providers
        )
        if device.type == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            # A CPU build of onnxruntime (not onnxruntime-gpu) has no CUDA provider.
            logger.warning("%s runs on CPU: this onnxruntime has no CUDA provider", path.name)
        self.input_names = [node.name for node in self.session.get_inputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        feed = {name: inputs[name] for name in self.input_names}
        return np.asarray(self.session.run(None, feed)[0])


def model_format(signature: dict[str, Any], serialized_file: str) -> str:
    """The model format, "torchscript" or "onnx": signature.json says so, or else the file
    extension of the serialized model decides."""
    declared = signature.get("format")
    if declared in ("torchscript", "onnx"):
        return str(declared)
    suffix = Path(serialized_file).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in TORCHSCRIPT_SUFFIXES:
        return "torchscript"
    raise ValueError(f"cannot tell the format of {serialized_file!r}")


# --- the handler skeleton ------------------------------------------------------------------------


class ModelHandler(ABC):
    """Loads signature.json and the serialized model of an extracted archive, then serves
    batches through `decode` / `collate` / `respond` (see the module docstring)."""

    def __init__(self) -> None:
        self.initialized = False
        self.signature: dict[str, Any] = {}
        self.model_dir = Path()
        self.device = torch.device("cpu")
        self.runner: Runner | None = None
        self.format = ""
        self.max_rows = DEFAULT_MAX_ITEMS_PER_REQUEST

    def initialize(self, context: Context) -> None:
        self.model_dir = Path(context.system_properties["model_dir"])
        signature_path = self.model_dir / "signature.json"
        self.signature = json.loads(signature_path.read_text()) if signature_path.exists() else {}
        manifest = context.manifest or {}
        serialized = manifest.get("model", {}).get("serializedFile") or self.signature.get(
            "serialized_file"
        )
        if not serialized:
            raise ValueError("archive names no serialized model (manifest serializedFile)")
        self.device = select_device(context)
        properties = context.system_properties
        self.max_rows = int(properties.get("max_items_per_request") or self.max_rows)
        path = self.model_dir / serialized
        fmt = model_format(self.signature, serialized)
        if fmt == "onnx":
            self.runner = OnnxRunner(path, self.device)
        else:
            specs = self.signature.get("model_inputs", [])
            runner = TorchScriptRunner(path, [spec["name"] for spec in specs], self.device)
            if specs:
                runner.warm_up(specs, int(context.system_properties.get("batch_size") or 1))
            self.runner = runner
        self.format = fmt
        self.setup(context)
        self.initialized = True
        logger.info("loaded %s (%s) on %s", path.name, fmt, self.device)

    def setup(self, context: Context) -> None:  # noqa: B027 - optional hook, empty by default
        """Model-specific loading after the model (labels, tokenizer)."""

    @abstractmethod
    def decode(self, payload: Any, item: Any, idx: int, context: Context) -> Decoded:
        """Validate one request; raise `BadRequest` with a message meant for its client."""

    @abstractmethod
    def collate(self, items: list[Decoded]) -> dict[str, np.ndarray]:
        """Model inputs for all `items`, their rows concatenated in order."""

    @abstractmethod
    def respond(self, item: Decoded, output: np.ndarray) -> Any:
        """The response for one item from its `item.rows` rows of the model output."""

    def handle(self, data: list[Any] | None, context: Context) -> list[Any] | None:
        """TorchServe entry point: one response per request in `data`, in order."""
        if data is None:  # TorchServe's function-style init call; nothing to serve
            return None
        if not self.initialized or self.runner is None:
            raise RuntimeError("handler used before initialize()")
        responses: list[Any] = [None] * len(data)
        valid: list[tuple[int, Decoded]] = []
        for idx, item in enumerate(data):
            try:
                decoded = self.decode(request_payload(item), item, idx, context)
                if decoded.rows > self.max_rows:  # before the tokenizer and the model see them
                    raise TooLarge(
                        f"{decoded.rows} items in one request, over the limit of "
                        f"{self.max_rows}: send them in several requests"
                    )
                valid.append((idx, decoded))
            except BadRequest as exc:
                context.set_response_status(exc.code, reason_phrase(str(exc)), idx)
                responses[idx] = exc.to_response()
            except Exception as exc:  # a decoding bug: fail this item alone, loudly
                logger.exception("request %d of the batch could not be decoded", idx)
                message = f"could not decode the request: {type(exc).__name__}: {exc}"
                context.set_response_status(500, reason_phrase(message), idx)
                responses[idx] = {"code": 500, "type": "InternalServerError", "message": message}
        if valid:
            output = self.runner.run(self.collate([decoded for _, decoded in valid]))
            expected_rows = sum(decoded.rows for _, decoded in valid)
            if len(output) != expected_rows:
                raise RuntimeError(f"model returned {len(output)} rows for {expected_rows}")
            start = 0
            for idx, decoded in valid:
                responses[idx] = self.respond(decoded, output[start : start + decoded.rows])
                start += decoded.rows
        set_header = getattr(context, "set_response_header", None)
        if set_header is not None:
            for idx in range(len(data)):
                set_header(idx, BATCH_SIZE_HEADER, str(len(data)))
        logger.debug("batch of %d requests, %d valid", len(data), len(valid))
        return responses
