"""A request as TorchServe's Python worker hands it to a handler: its row of `data` and the
headers behind `context.get_request_header`.

TorchServe's worker (`ts.service.Service.retrieve_data_for_inference`) builds both from what its
frontend sends for each request:

- the row maps each input (the raw `body`, form fields, query parameters where the path takes
  them) to its value, decoded by its content type: `application/json` parsed, `text...` as
  str, anything else a **bytearray**, never bytes. A value that does not decode is passed as
  it came, with a warning. The environment variable `TS_DECODE_INPUT_REQUEST` (set from
  `decode_input_request`; handlers set it to "false" at import to decode bodies themselves) is
  read at every batch, as TorchServe's worker reads it for every input;
- the headers are one entry per input, its name mapped to `{"content-type": ...}` (empty when
  the input had none), then the request's headers, written over an input of the same name: a
  form field named `explain` or `url_path` cannot stand in for the header the frontend sets.

One difference is unavoidable: HTTP servers hand torchgate header names in lower case, where
TorchServe keeps the client's spelling and matches names exactly. So `RequestHeaders` finds a
name in any case: a handler written `get_request_header(idx, "Content-Type")` against curl's
headers finds the header here too.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import orjson

log = logging.getLogger(__name__)

DECODE_VARIABLE = "TS_DECODE_INPUT_REQUEST"
_RAW = (bytes, bytearray)  # what the worker decodes: exactly these types, as they came


class RequestHeaders(dict[str, Any]):
    """Headers with lower-case names, looked up in any case (`[]`, `get`, `in`)."""

    __slots__ = ()

    def __missing__(self, key: Any) -> Any:
        if isinstance(key, str):
            lower = key.lower()
            if lower != key and dict.__contains__(self, lower):
                return dict.__getitem__(self, lower)
        raise KeyError(key)

    def get(self, key: Any, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or (
            isinstance(key, str) and dict.__contains__(self, key.lower())
        )


def handler_row(inputs: dict[str, Any], input_types: Mapping[str, str]) -> dict[str, Any]:
    """The row as TorchServe's worker hands it over: bytes values decoded (or a bytearray).
    Values that are not bytes (KServe's, already decoded) pass as they are."""
    if not any(type(value) in _RAW for value in inputs.values()):
        return inputs
    decode = os.environ.get(DECODE_VARIABLE) in (None, "true")
    return {
        name: decoded(value, input_types.get(name, ""), decode) if type(value) in _RAW else value
        for name, value in inputs.items()
    }


def decoded(value: bytes | bytearray, content_type: str, decode: bool = True) -> Any:
    """One value as TorchServe's worker decodes it (its content type compared as written)."""
    if decode and content_type == "application/json":
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            pass
        try:  # what orjson refuses and Python's json reads: NaN, integers past 64 bits
            return json.loads(value)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            log.warning("Failed json decoding of input data. Forwarding encoded payload: %s", exc)
    elif decode and content_type.startswith("text"):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            log.warning("Failed utf-8 decoding of input data. Forwarding encoded payload: %s", exc)
    return value if type(value) is bytearray else bytearray(value)


def handler_headers(
    headers: Mapping[str, str], inputs: Mapping[str, Any], input_types: Mapping[str, str]
) -> RequestHeaders:
    """Each input's content type under the input's name, then the request's headers over them
    (in this order, as TorchServe's worker builds the map: a header wins over an input)."""
    merged = RequestHeaders({name: {"content-type": input_types.get(name, "")} for name in inputs})
    merged.update(headers)
    return merged
