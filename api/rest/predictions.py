"""`/predictions/{model}[/{version}]` and `/explanations/...`: TorchServe's inference endpoints,
as plain ASGI.

As in TorchServe, any method runs inference (`curl -T file` PUTs, a bare GET sends an empty
body) except OPTIONS, which answers the model's OpenAPI description. `/explanations` runs the
same request with the request header `explain: True` (`False` on `/predictions`): that header is
how TorchServe's `BaseHandler` knows to call `explain_handle`.

Inputs reach the handler the way TorchServe's frontend and Python worker pass them: the raw body
as the "body" parameter, each form field (multipart or `application/x-www-form-urlencoded`)
under its own name, each query parameter under its own name. Bodies and files are decoded by
content type (JSON parsed, text/* as str, else bytes); plain form fields stay bytes.

A handler that streams (`send_intermediate_predict_response`) is answered with chunked transfer:
the first intermediate response's status and headers, then one chunk per response, the final
one last (`ChunkedReply`). If the request fails after the first chunk, the connection is closed
without the closing chunk, as TorchServe resets it: the client sees a truncated body.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.requests import Request

from api.core.dataplane import Answer
from api.core.streaming import PredictionStream
from api.core.types import API_TORCHSERVE_REST, InferenceRequest, Prediction
from api.encoding import JSON, Encoded, encode_prediction
from api.errors import BadRequest, NotFound
from api.rest.asgi import Scope, Send
from api.rest.endpoint import InferenceEndpoint
from api.rest.inference import model_api_document

log = logging.getLogger(__name__)

# The prefixes this endpoint answers (api.rest.apps mounts it on them, for every method).
PREFIXES = ("/predictions/", "/explanations/")


class PredictionsEndpoint(InferenceEndpoint):
    def route(self, path: str) -> tuple[str, str | None]:
        parts = [p for p in path.split("/") if p]  # the server already percent-decoded it
        if len(parts) == 2 or (len(parts) == 3 and parts[2]):
            return parts[1], parts[2] if len(parts) == 3 else None
        raise NotFound(f"Requested resource is not found, please refer to API document: {path}")

    async def respond(
        self,
        scope: Scope,
        headers: dict[str, str],
        rid: str,
        body: bytes,
        model: str,
        version: str | None,
        send: Send,
    ) -> Encoded | None:
        if scope["method"] == "OPTIONS":
            return self._description(model, version)
        request = await self._request(scope, headers, rid, body)
        chunks = ChunkedReply(send, rid)
        stream = PredictionStream(request, chunks.part)

        def infer(item: InferenceRequest) -> Awaitable[Answer]:
            return self.dataplane.infer(model, version, item)

        try:
            answer = await stream.run(infer)
        except Exception as exc:
            if not stream.streamed:
                raise
            # Too late for an error status. Returning without the last chunk makes the server
            # close the connection: the client sees a truncated body, as TorchServe's reset.
            log.warning("stream for %s cut short after it started: %s", model, exc)
            return None
        if not stream.streamed:
            return reply_parts(answer)
        await chunks.last(answer.prediction)
        return None

    def _description(self, model: str, version: str | None) -> Encoded:
        self.dataplane.registry.get(model, version)  # ModelNotFound, as TorchServe
        return Encoded(200, model_api_document(model), [("content-type", JSON)])

    async def _request(
        self, scope: Scope, headers: dict[str, str], rid: str, body: bytes
    ) -> InferenceRequest:
        inputs = await decode_inputs(scope, body, headers)
        # TorchServe's frontend sets this on every inference request, over the client's.
        headers["explain"] = "True" if scope["path"].startswith("/explanations/") else "False"
        return InferenceRequest(inputs, headers, rid, API_TORCHSERVE_REST)


def reply_parts(answer: Answer) -> Encoded:
    encoded = encode_prediction(answer.prediction)
    encoded.headers.append(("x-model-version", answer.model_version.version))
    return encoded


class ChunkedReply:
    """A streaming handler's responses as HTTP chunks, as TorchServe's frontend sends them.

    The status and headers are the first intermediate response's (with TorchServe's
    `ts_stream_next: true`); each response's body is one chunk, the final one's last.
    """

    def __init__(self, send: Send, rid: str) -> None:
        self._send = send
        self._rid = rid
        self._started = False

    async def part(self, prediction: Prediction) -> None:
        if not self._started:
            self._started = True
            first = encode_prediction(prediction)
            first.headers.append(("x-request-id", self._rid))
            raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in first.headers]
            # No content-length: the server sends the body with chunked transfer-encoding.
            start = {"type": "http.response.start", "status": first.status, "headers": raw}
            await self._send(start)
            payload = first.body
        else:
            payload = encode_prediction(prediction).body
        await self._send({"type": "http.response.body", "body": payload, "more_body": True})

    async def last(self, prediction: Prediction) -> None:
        payload = encode_prediction(prediction).body
        await self._send({"type": "http.response.body", "body": payload, "more_body": False})


async def decode_inputs(scope: Scope, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    """TorchServe's request item for one HTTP request."""
    inputs: dict[str, Any] = {}
    query = scope.get("query_string", b"")
    if query:
        inputs.update(parse_qsl(query.decode("latin-1"), keep_blank_values=True))
    content_type = headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        inputs.update(await _form_fields(scope, body))
    elif content_type.split(";", 1)[0].strip().lower() == "application/x-www-form-urlencoded":
        # As TorchServe's form decoder: each field's value as bytes.
        for name, value in parse_qsl(body, keep_blank_values=True):
            inputs[name.decode("utf-8", "replace")] = value
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
                fields[name] = value.encode()  # a plain field: bytes, as TorchServe gives it
            else:
                data = await value.read()
                fields[name] = decode_value(data, value.content_type or "")
    finally:
        await form.close()
    return fields
