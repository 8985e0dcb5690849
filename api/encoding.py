"""Encoding answers the same way on every transport: fast JSON, TorchServe's error body, a
handler's output as bytes and content type (REST sends them, gRPC puts the bytes in its reply).
"""

from __future__ import annotations

from typing import Any

import orjson

from api.core.types import Prediction
from api.errors import InferenceFailed, wrapping

JSON = "application/json"
_ORJSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=_ORJSON_OPTIONS)


def error_body(status: int, type_name: str, message: str) -> bytes:
    """TorchServe's error shape: `{"code": 404, "type": "...", "message": "..."}`."""
    return dumps({"code": status, "type": type_name, "message": message})


def prediction_parts(prediction: Prediction) -> tuple[int, bytes, str]:
    """Body and content type for a handler's answer, following TorchServe's worker.

    bytes go out as they are, str as UTF-8 text, anything else as JSON. A per-item error with
    no body of its own gets TorchServe's error JSON.
    """
    body = prediction.body
    content_type = next(
        (v for k, v in prediction.headers.items() if k.lower() == "content-type"), None
    )
    if not prediction.ok and body in (None, b"", ""):
        return (
            prediction.status,
            error_body(
                prediction.status,
                "InternalServerException" if prediction.status >= 500 else "BadRequestException",
                prediction.message,
            ),
            JSON,
        )
    if isinstance(body, bytes | bytearray | memoryview):
        return prediction.status, bytes(body), content_type or "application/octet-stream"
    if isinstance(body, str):
        return prediction.status, body.encode(), content_type or "text/plain; charset=utf-8"
    with wrapping(InferenceFailed, "Handler output cannot be sent as JSON"):
        encoded = dumps(body)
    return prediction.status, encoded, content_type or JSON
