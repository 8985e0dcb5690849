"""`POST /predictions/{model}[/{version}]`: TorchServe's inference endpoint, as plain ASGI.

Inputs reach the handler the way TorchServe's frontend and Python worker pass them: the raw body
as the "body" parameter, each multipart form field under its own name, each query parameter
under its own name; values decoded by content type (JSON parsed, text/* as str, else bytes).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.requests import Request

from api.core.types import API_TORCHSERVE_REST, InferenceRequest
from api.errors import BadRequest, NotFound, TorchgateError
from api.rest.asgi import Scope
from api.rest.endpoint import InferenceEndpoint, Reply
from api.rest.responses import error_parts, prediction_parts


class PredictionsEndpoint(InferenceEndpoint):
    def route(self, path: str) -> tuple[str, str | None]:
        parts = [p for p in path.split("/") if p]  # the server already percent-decoded it
        if len(parts) == 2 or (len(parts) == 3 and parts[2]):
            return parts[1], parts[2] if len(parts) == 3 else None
        raise NotFound(f"Requested resource is not found, please refer to API document: {path}")

    async def answer(
        self,
        scope: Scope,
        headers: dict[str, str],
        rid: str,
        body: bytes,
        model: str,
        version: str | None,
    ) -> Reply:
        inputs = await decode_inputs(scope, body, headers)
        request = InferenceRequest(inputs, headers, rid, API_TORCHSERVE_REST)
        answer = await self.dataplane.infer(model, version, request)
        status, payload, content_type = prediction_parts(answer.prediction)
        reply_headers = [
            (k, v) for k, v in answer.prediction.headers.items() if k.lower() != "content-type"
        ]
        reply_headers += [
            ("content-type", content_type),
            ("x-model-version", answer.model_version.version),
        ]
        return status, payload, reply_headers

    def error_reply(self, exc: TorchgateError) -> Reply:
        status, payload, headers = error_parts(exc)
        return status, payload, list(headers.items())


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
        # Text fields may be as large as the body may be (starlette's default is 1 MB).
        form = await Request(scope, replay).form(max_part_size=len(body) + 1)
    except Exception as exc:  # python-multipart raises its own types
        raise BadRequest(f"Malformed multipart form data: {exc}") from None
    fields: dict[str, Any] = {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, str):
                fields[name] = value
            else:
                data = await value.read()
                fields[name] = decode_value(data, value.content_type or "")
    finally:
        await form.close()
    return fields
