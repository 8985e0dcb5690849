"""`POST /predictions/{model}[/{version}]`: TorchServe's inference endpoint, as plain ASGI.

Inputs reach the handler the way TorchServe's frontend and Python worker pass them: the raw body
as the "body" parameter, each multipart form field under its own name, each query parameter
under its own name; values decoded by content type (JSON parsed, text/* as str, else bytes).
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qsl, unquote

import orjson
from starlette.requests import Request

from api.core.dataplane import DataPlane
from api.core.types import API_TORCHSERVE_REST, REJECT_AUTH, REJECT_TOO_LARGE, InferenceRequest
from api.errors import BadRequest, NotFound, PayloadTooLarge, TorchgateError, Unauthenticated
from api.rest.asgi import (
    ClientDisconnected,
    Receive,
    Scope,
    Send,
    cancel_on_disconnect,
    header_dict,
    read_body,
    request_id,
    send_response,
)
from api.rest.responses import error_parts, prediction_parts
from api.rest.security import INFERENCE, TokenAuth


class PredictionsEndpoint:
    def __init__(
        self,
        dataplane: DataPlane,
        *,
        max_request_size: int,
        auth: TokenAuth | None = None,
    ) -> None:
        self.dataplane = dataplane
        self.max_request_size = max_request_size
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = header_dict(scope)
        rid = request_id(headers)
        try:
            model, version = _model_and_version(scope["path"])
            if self.auth is not None:
                self.auth.check(INFERENCE, headers.get("authorization"))
            body = await read_body(receive, self.max_request_size, headers)
            inputs = await decode_inputs(scope, body, headers)
            request = InferenceRequest(inputs, headers, rid, API_TORCHSERVE_REST)
            answer = await cancel_on_disconnect(
                receive, self.dataplane.infer(model, version, request)
            )
            status, payload, content_type = prediction_parts(answer.prediction)
        except (ClientDisconnected, asyncio.CancelledError):
            return  # nobody is left to answer
        except TorchgateError as exc:
            self._note_rejection(exc, scope)
            status, payload, error_headers = error_parts(exc)
            error_headers["x-request-id"] = rid
            await send_response(send, status, payload, error_headers)
            return
        response_headers = [
            (k, v) for k, v in answer.prediction.headers.items() if k.lower() != "content-type"
        ]
        response_headers += [
            ("content-type", content_type),
            ("x-request-id", rid),
            ("x-model-version", answer.model_version.version),
        ]
        await send_response(send, status, payload, response_headers)

    def _note_rejection(self, exc: TorchgateError, scope: Scope) -> None:
        reason = (
            REJECT_AUTH
            if isinstance(exc, Unauthenticated)
            else REJECT_TOO_LARGE
            if isinstance(exc, PayloadTooLarge)
            else None
        )
        if reason is not None:
            model, version = _safe_model_and_version(scope["path"])
            self.dataplane.note_rejected(model, version, reason)


def _model_and_version(path: str) -> tuple[str, str | None]:
    parts = [unquote(p) for p in path.split("/") if p]
    if len(parts) == 2 or (len(parts) == 3 and parts[2]):
        return parts[1], parts[2] if len(parts) == 3 else None
    raise NotFound(f"Requested resource is not found, please refer to API document: {path}")


def _safe_model_and_version(path: str) -> tuple[str, str]:
    try:
        model, version = _model_and_version(path)
    except TorchgateError:
        return "", ""
    return model, version or ""


async def decode_inputs(scope: Scope, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    """TorchServe's request item for one HTTP request."""
    inputs: dict[str, Any] = {}
    query = scope.get("query_string", b"")
    if query:
        inputs.update(parse_qsl(query.decode("latin-1"), keep_blank_values=True))
    content_type = headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        inputs.update(await _form_fields(scope, body))
    elif body or "body" not in inputs:
        inputs["body"] = decode_value(body, content_type)
    return inputs


def decode_value(value: bytes, content_type: str) -> Any:
    """Decode one parameter as TorchServe's Python worker does (JSON, text, else bytes)."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "application/json":
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"Malformed JSON body: {exc}") from None
    if media_type.startswith("text/"):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("Text body is not valid UTF-8") from None
    return value


async def _form_fields(scope: Scope, body: bytes) -> dict[str, Any]:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, replay).form()
    except Exception as exc:  # python-multipart raises its own types
        raise BadRequest(f"Malformed multipart form data: {exc}") from None
    fields: dict[str, Any] = {}
    for name, value in form.multi_items():
        if isinstance(value, str):
            fields[name] = value
        else:
            data = await value.read()
            fields[name] = decode_value(data, value.content_type or "")
    await form.close()
    return fields
