"""TorchServe's built-in ``base_handler``: tensors in, the model's output rows out.

TorchServe's BaseHandler turns the whole batch into one tensor with ``torch.as_tensor(data)``,
``data`` being the list of request dicts, so every request fails ("Could not infer dtype of
dict"). Here each request's payload (``data`` or ``body``) becomes one input row, with
``torch.as_tensor``'s rules, and the rows are stacked:

- a JSON value (a number or a nested list): as ``torch.as_tensor`` reads it, so integers give
  int64 and any float gives float32 (send ``1.0``, not ``1``, to a float model; an ONNX graph's
  inputs are cast to the type it declares);
- raw bytes: a JSON text when they hold one (a client that sent JSON without its content type),
  else the bytes as a 1-D tensor of their values, as ``torch.as_tensor(bytearray)`` makes;
- a text body: a JSON text, else a 400.

The model's output for N stacked rows is split along its first dimension, and each request gets
its row as nested lists (TorchServe's ``postprocess``: ``output.tolist()``). Inputs of different
shapes run as separate forward passes; a shape the model refuses fails its requests alone (400).

This module defines exactly one class (TorchServe's loader takes a module's single class).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from ..torchgate_base import JSON_TOO_DEEP, BadRequest, looks_like_json
from .base import BuiltinHandler, Prepared

_JSON_SCALARS = (int, float, bool)


class BaseHandler(BuiltinHandler):
    def prepare(self, payload: Any) -> Prepared:
        if isinstance(payload, bytes | bytearray | memoryview):
            raw = bytes(payload)
            if not looks_like_json(raw):
                return Prepared(torch.as_tensor(bytearray(raw)), from_client=True)
            payload = _parse_json(raw)
        elif isinstance(payload, str):
            payload = _parse_json(payload)
        if not isinstance(payload, (list, *_JSON_SCALARS)):
            raise BadRequest(
                f"expected a JSON number or list of numbers, got {type(payload).__name__}"
            )
        try:
            return Prepared(torch.as_tensor(payload), from_client=True)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise BadRequest(f"not a rectangular list of numbers: {exc}") from exc

    def postprocess(self, output: Any, count: int) -> list[Any]:
        if not isinstance(output, torch.Tensor) or output.dim() == 0:
            raise TypeError(
                f"expected a tensor with one row per input, got {type(output).__name__}"
            )
        rows: list[Any] = output.tolist()
        return rows


def _parse_json(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"expected a JSON number or list: {exc}") from exc
    except RecursionError as exc:  # the json module recurses once per nesting level
        raise BadRequest(f"expected a JSON number or list: {JSON_TOO_DEEP}") from exc
