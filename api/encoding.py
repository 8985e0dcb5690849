"""Encoding answers the same way on every transport: fast JSON, TorchServe's error body, a
handler's output as bytes and content type (REST sends them, gRPC puts the bytes in its reply).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from api.core.types import Prediction
from api.errors import (
    InferenceFailed,
    ResponseTooLarge,
    TorchgateError,
    http_status,
    retry_after,
    wrapping,
)

log = logging.getLogger(__name__)

JSON = "application/json"
_ORJSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=_ORJSON_OPTIONS)


def error_body(status: int, type_name: str, message: str) -> bytes:
    """TorchServe's error shape: `{"code": 404, "type": "...", "message": "..."}`."""
    return dumps({"code": status, "type": type_name, "message": message})


@dataclass(slots=True)
class Encoded:
    """One answer encoded for the wire: REST sends all three parts; gRPC sends the body and
    maps the status. `headers` holds the content type and, for a prediction, the headers the
    handler set (`context.set_response_header`)."""

    status: int
    body: bytes
    headers: list[tuple[str, str]]


ErrorBody = Callable[[int, str, str], bytes]
"""Encodes (status, TorchServe's type name, message) as one API's error body."""


def torchserve_error_body(status: int, type_name: str, message: str) -> bytes:
    return error_body(status, type_name, message)


def kserve_error_body(status: int, type_name: str, message: str) -> bytes:
    """KServe's protocols (v1 and v2): `{"error": "..."}`."""
    return dumps({"error": message})


def error_headers(exc: TorchgateError) -> list[tuple[str, str]]:
    headers = [("content-type", JSON)]
    seconds = retry_after(exc)
    if seconds is not None:
        headers.append(("retry-after", seconds))
    return headers


def encode_error(exc: TorchgateError, body: ErrorBody = torchserve_error_body) -> Encoded:
    """`exc` with the status from `api.errors`' table, in one API's error body."""
    status = http_status(exc)
    return Encoded(status, body(status, exc.type_name, exc.message), error_headers(exc))


def check_response_size(body: bytes, limit: int, where: str) -> None:
    """`ResponseTooLarge` (500) for a handler's answer over `max_response_size` (`limit`),
    with a WARNING naming `where` (a path, a model).

    TorchServe bounds what a worker may send back by that key: a larger answer fails its
    request with 500 (there "Worker died.", and the worker is restarted with its whole batch
    lost). Here the answer is dropped, its request alone gets 500 saying why, and the worker
    keeps serving.
    """
    check_answer_size(len(body), limit, where)


def check_answer_size(size: int, limit: int, where: str) -> None:
    """`check_response_size` for an answer of `size` bytes (an encoded message)."""
    if size > limit:
        message = (
            f"Response of {size} bytes exceeds max_response_size of {limit} bytes "
            "(config.properties)"
        )
        log.warning("%s: %s; not sent", where, message)
        raise ResponseTooLarge(message)


# Headers a handler may set that are not passed on as they are: its content type (chosen below)
# and the ones that frame the message or the connection, which the server writes itself (a
# second Content-Length or Transfer-Encoding would make clients and proxies read it wrong).
_NOT_PASSED_ON = frozenset(
    ("content-type", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade")
)


def encode_prediction(prediction: Prediction) -> Encoded:
    """A handler's answer, following TorchServe's worker: bytes go out as they are, str as
    UTF-8 text, anything else as JSON; a per-item error with no body of its own gets
    TorchServe's error JSON. The handler's content type wins over those defaults."""
    body = prediction.body
    headers = [(k, v) for k, v in prediction.headers.items() if k.lower() not in _NOT_PASSED_ON]
    chosen = next((v for k, v in prediction.headers.items() if k.lower() == "content-type"), None)
    if not prediction.ok and body in (None, b"", ""):
        type_name = "InternalServerException" if prediction.status >= 500 else "BadRequestException"
        payload = error_body(prediction.status, type_name, prediction.message)
        content_type = JSON
    elif isinstance(body, bytes | bytearray | memoryview):
        payload, content_type = bytes(body), chosen or "application/octet-stream"
    elif isinstance(body, str):
        payload, content_type = body.encode(), chosen or "text/plain; charset=utf-8"
    else:
        with wrapping(InferenceFailed, "Handler output cannot be sent as JSON"):
            payload = dumps(body)
        content_type = chosen or JSON
    headers.append(("content-type", content_type))
    return Encoded(prediction.status, payload, headers)
