"""Handler for all-MiniLM-L6-v2 sentence embeddings (TorchScript or ONNX, as the archive says).

Accepted request bodies:

- plain text (bytes or str): one text;
- JSON ``{"text": "..."}`` (one text), ``{"text": ["...", ...]}`` or ``["...", ...]`` (several);
- a KServe v2 request ``{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [n],
  "data": [str or bytes, ...]}]}`` (data may be a numpy object array).

A text body that is not valid JSON is taken as text, so ``[sic]`` still embeds; a body that is
valid JSON must have one of the shapes above. Empty texts are rejected.

Answers: one text -> ``[384 floats]``; several -> ``[[384 floats], ...]``; v2 ->
``{"outputs": [{"name": "embedding", "datatype": "FP32", "shape": [n, 384], "data": ...}]}``.
Embeddings are L2-normalised means of the token states, as sentence-transformers' ``encode()``.

Texts of all valid requests in a batch are tokenized together (padded to the longest, truncated
to the model's 256 tokens) and embedded in one forward pass, then split back per request. A text
is cut to 64 characters a token (16,384) before tokenizing, so megabytes of text cost what a
full-length text does; ordinary text keeps the same 256 tokens.

This module defines exactly one class: TorchServe instantiates the single class of a handler
module that has no module-level ``handle`` function.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from tokenizers import Tokenizer

try:  # in this repo
    from .torchgate_base import (
        CHARACTERS_PER_TOKEN,
        JSON_TOO_DEEP,
        BadRequest,
        Context,
        Decoded,
        ModelHandler,
        as_text,
        is_v2,
        truncate_text,
        v2_input,
        v2_response,
    )
except ImportError:  # extracted flat from an archive: the base module sits next to this file
    from torchgate_base import (  # type: ignore[no-redef]
        CHARACTERS_PER_TOKEN,
        JSON_TOO_DEEP,
        BadRequest,
        Context,
        Decoded,
        ModelHandler,
        as_text,
        is_v2,
        truncate_text,
        v2_input,
        v2_response,
    )

DEFAULT_MAX_LENGTH = 256


def _texts_from_json(value: Any) -> tuple[list[Any], bool]:
    """(texts, single) from parsed JSON; texts still to be checked."""
    if isinstance(value, dict):
        if "text" not in value:
            raise BadRequest('JSON object must hold "text": a string or a list of strings')
        value = value["text"]
    if isinstance(value, str):
        return [value], True
    if isinstance(value, list):
        return value, False
    raise BadRequest('expected text, a JSON list of strings or {"text": ...}')


def _checked(texts: list[Any]) -> list[str]:
    if not texts:
        raise BadRequest("no text to embed: the list is empty")
    out: list[str] = []
    for position, text in enumerate(texts):
        if isinstance(text, (bytes, bytearray)):
            text = as_text(text)
        if not isinstance(text, str):
            raise BadRequest(f"text {position} is {type(text).__name__}, expected a string")
        if not text.strip():
            raise BadRequest(f"text {position} is empty")
        out.append(text)
    return out


class MiniLMHandler(ModelHandler):
    """Embeds texts; see the module docstring for the request/response contract."""

    def setup(self, context: Context) -> None:
        preprocessing = self.signature.get("preprocessing", {})
        tokenizer_file = preprocessing.get("tokenizer_file", "tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(self.model_dir / tokenizer_file))
        # sentence-transformers tokenizes with truncation to max_seq_length and padding to the
        # longest text of the batch; the tokenizer file may say otherwise (128, fixed).
        max_length = int(preprocessing.get("max_length", DEFAULT_MAX_LENGTH))
        self.tokenizer.enable_truncation(max_length=max_length)
        # Cut before tokenizing: the tokenizer reads a whole text before truncating it.
        self.max_characters = max_length * CHARACTERS_PER_TOKEN
        self.tokenizer.enable_padding(
            pad_id=int(preprocessing.get("pad_id", 0)),
            pad_token=str(preprocessing.get("pad_token", "[PAD]")),
        )
        outputs = self.signature.get("outputs") or [{"name": "embedding"}]
        self.output_name = str(outputs[0]["name"])
        inputs = self.signature.get("inputs") or [{"name": "text"}]
        self.input_name = str(inputs[0]["name"])

    def decode(self, payload: Any, item: Any, idx: int, context: Context) -> Decoded:
        if isinstance(payload, (bytes, bytearray)):
            payload = as_text(payload)
        if isinstance(payload, str):
            try:
                parsed = json.loads(payload)
            except json.JSONDecodeError:
                texts = _checked([payload])  # plain text
                return Decoded(1, texts)
            except RecursionError as exc:  # the json module recurses once per nesting level
                raise BadRequest(f"invalid JSON: {JSON_TOO_DEEP}") from exc
            if not isinstance(parsed, (dict, list)):
                return Decoded(1, _checked([payload]))  # e.g. "42": a text that is a number
            payload = parsed
        if is_v2(payload):
            tensor = v2_input(payload, self.input_name)
            data = tensor["data"]
            numpy_out = isinstance(data, np.ndarray)
            values = data.ravel().tolist() if numpy_out else _flatten(data)
            texts = _checked(values)
            return Decoded(len(texts), texts, v2=True, numpy_out=numpy_out)
        raw, single = _texts_from_json(payload)
        texts = _checked(raw)
        return Decoded(len(texts), texts, single=single)

    def collate(self, items: list[Decoded]) -> dict[str, np.ndarray]:
        limit = self.max_characters
        texts = [truncate_text(text, limit) for item in items for text in item.value]
        encodings = self.tokenizer.encode_batch(texts)
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }

    def respond(self, item: Decoded, output: np.ndarray) -> Any:
        if item.v2:
            return v2_response(self.output_name, output, item.numpy_out)
        if item.single:
            return output[0].tolist()
        return output.tolist()


def _flatten(data: Any) -> list[Any]:
    """v2 JSON data may come nested by shape; texts are its leaves, in order.

    A loop, not recursion: nesting deeper than Python's stack allows must be a 400, not a 500.
    """
    leaves: list[Any] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            leaves.append(item)
    return leaves
