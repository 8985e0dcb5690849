"""`/predictions/{model}[/{version}]` and `/explanations/...`: TorchServe's inference endpoints,
as plain ASGI.

As in TorchServe, any method runs inference (`curl -T file` PUTs, a bare GET sends an empty
body) except OPTIONS, which answers the model's OpenAPI description. `/explanations` runs the
same request with the request header `explain: True` (`False` on `/predictions`): that header is
how TorchServe's `BaseHandler` knows to call `explain_handle`.

Inputs reach the handler the way TorchServe's frontend and Python worker pass them: the raw body
as the "body" parameter, each form field (multipart or `application/x-www-form-urlencoded`)
under its own name. Query parameters are not passed here, as in TorchServe (its other inference
paths pass them: `api.rest.invocations`). Each value goes as the bytes it came as, with its
content type: the worker decodes it as TorchServe's worker does (`api.workers.items`: JSON
parsed, text as str, unless `decode_input_request` or the handler's own environment says not
to). `/predictions/{model}/{version}/{path...}` serves the model too, the rest of the path in
the request header `url_path` (TorchServe 0.12's, for handlers that serve OpenAI-style paths;
empty on the plain path).

A handler that streams (`send_intermediate_predict_response`) is answered with chunked transfer:
the first intermediate response's status and headers, then one chunk per response, the final
one last (`ChunkedReply`). If the request fails after the first chunk, the connection is closed
without the closing chunk, as TorchServe resets it: the client sees a truncated body.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote_to_bytes

from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

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

# The most fields a urlencoded form may have: the bound Starlette puts on a multipart form's
# fields. Each is an input the worker decodes and a header entry; TorchServe has no bound.
MAX_FORM_FIELDS = 1000
# A urlencoded form this large is parsed in a thread: splitting and unquoting a body of the
# default max_request_size takes a second or more (6.5 MB of `&` or of `%41`), which would
# hold up every other request on the event loop; a thread gives the loop back every switch
# interval. Lower than v2's 1 MiB (api.v2.bridge.DECODE_IN_THREAD_BYTES): the worst 1 MiB
# form still takes 0.1 s, the worst 64 KiB one 5 ms, and the thread costs far less than that.
PARSE_IN_THREAD_BYTES = 1 << 16
# The content type of a multipart file sent without one: netty's, as TorchServe's frontend
# hands it to the worker.
UNTYPED_FILE = "application/octet-stream"


class PredictionsEndpoint(InferenceEndpoint):
    # TorchServe hands query parameters to handlers on its other inference paths only.
    takes_query = False

    def route(self, path: str) -> tuple[str, str | None]:
        parts = [p for p in path.split("/") if p]  # the server already percent-decoded it
        if len(parts) >= 2:
            return parts[1], parts[2] if len(parts) >= 3 else None
        raise NotFound(f"Requested resource is not found, please refer to API document: {path}")

    def model_for(self, scope: Scope, model: str, item: RequestItem) -> str:
        """The model a request goes to: the one its path names here."""
        return model

    def item_headers(self, scope: Scope, headers: dict[str, str]) -> None:
        """The request headers TorchServe's frontend adds on these paths."""
        # Set on every inference request, over the client's: how BaseHandler picks explain.
        headers["explain"] = "True" if scope["path"].startswith("/explanations/") else "False"
        parts = [p for p in scope["path"].split("/") if p]
        headers["url_path"] = "/".join(parts[3:])

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
        item = await request_item(scope, body, headers, query=self.takes_query)
        model = self.model_for(scope, model, item)
        if scope["method"] == "OPTIONS":
            return self._description(model, version)
        as_aggregated(headers, body)
        self.item_headers(scope, headers)
        request = item.request(headers, rid)
        chunks = ChunkedReply(send, rid, lambda body: self.check_size(body, scope["path"]))
        stream = PredictionStream(request, chunks.part)

        def infer(item: InferenceRequest) -> Awaitable[Answer]:
            return self.dataplane.infer(model, version, item)

        try:
            answer = await stream.run(infer)
            if stream.streamed:
                await chunks.last(answer.prediction)
        except Exception as exc:
            if not chunks.started:
                raise  # nothing sent yet: the error gets its own status
            # Too late for an error status. Returning without the last chunk makes the server
            # close the connection: the client sees a truncated body, as TorchServe's reset.
            log.warning("stream for %s cut short after it started: %s", model, exc)
            return None
        return None if stream.streamed else reply_parts(answer)

    def _description(self, model: str, version: str | None) -> Encoded:
        self.dataplane.registry.get(model, version)  # ModelNotFound, as TorchServe
        return Encoded(200, model_api_document(model), [("content-type", JSON)])


def as_aggregated(headers: dict[str, str], body: bytes) -> None:
    """The headers as TorchServe's frontend hands them on once it has the whole body (Netty's
    aggregator): a Content-Length always, no chunked Transfer-Encoding."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        del headers["transfer-encoding"]
    headers.setdefault("content-length", str(len(body)))


def reply_parts(answer: Answer) -> Encoded:
    encoded = encode_prediction(answer.prediction)
    encoded.headers.append(("x-model-version", answer.model_version.version))
    return encoded


class ChunkedReply:
    """A streaming handler's responses as HTTP chunks, as TorchServe's frontend sends them.

    The status and headers are the first intermediate response's (with TorchServe's
    `ts_stream_next: true`); each response's body is one chunk, the final one's last.
    `check_size` sees each chunk before it is sent (max_response_size bounds each of a
    streaming handler's responses, as each is one message from TorchServe's worker).
    """

    def __init__(self, send: Send, rid: str, check_size: Callable[[bytes], None]) -> None:
        self._send = send
        self._rid = rid
        self._check_size = check_size
        self._started = False

    @property
    def started(self) -> bool:
        """Whether the response's status and headers went out."""
        return self._started

    async def part(self, prediction: Prediction) -> None:
        if not self._started:
            first = encode_prediction(prediction)
            self._check_size(first.body)
            self._started = True
            first.headers.append(("x-request-id", self._rid))
            raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in first.headers]
            # No content-length: the server sends the body with chunked transfer-encoding.
            start = {"type": "http.response.start", "status": first.status, "headers": raw}
            await self._send(start)
            payload = first.body
        else:
            payload = encode_prediction(prediction).body
            self._check_size(payload)
        await self._send({"type": "http.response.body", "body": payload, "more_body": True})

    async def last(self, prediction: Prediction) -> None:
        payload = encode_prediction(prediction).body
        self._check_size(payload)
        await self._send({"type": "http.response.body", "body": payload, "more_body": False})


@dataclass(slots=True)
class RequestItem:
    """TorchServe's request item for one HTTP request: each input's value (bytes), and the
    content type of each input that came with one."""

    inputs: dict[str, Any] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)

    def request(self, headers: dict[str, str], rid: str) -> InferenceRequest:
        """The item as the request the dataplane takes, from TorchServe's REST API."""
        return InferenceRequest(
            self.inputs, headers, rid, API_TORCHSERVE_REST, input_types=self.types
        )


async def request_item(
    scope: Scope, body: bytes, headers: dict[str, str], *, query: bool = False
) -> RequestItem:
    """The item as TorchServe's frontend builds it: `query` parameters first (where the path
    takes them), then the form fields, or else the body under "body"."""
    item = RequestItem()
    if query and (raw_query := scope.get("query_string", b"")):
        for name, value in parse_qsl(raw_query.decode("latin-1"), keep_blank_values=True):
            item.inputs[name] = value.encode()
    content_type = headers.get("content-type", "")
    media_type = media_type_of(content_type)
    media = media_type.lower()
    if media == "multipart/form-data":
        await _form_fields(content_type, body, item)
    elif media == "application/x-www-form-urlencoded":
        for name, value in await _urlencoded_fields(body):
            item.inputs[name] = value
    else:
        item.inputs["body"] = body
        if media_type:
            item.types["body"] = media_type
    return item


async def _urlencoded_fields(body: bytes) -> list[tuple[str, bytes]]:
    """A urlencoded form's fields, parsed off the event loop when the body is large."""
    if len(body) < PARSE_IN_THREAD_BYTES:
        return _urlencoded(body)
    return await asyncio.to_thread(_urlencoded, body)


def _urlencoded(body: bytes) -> list[tuple[str, bytes]]:
    """A form's fields, each value the bytes its percent-escapes stand for (`%C3%A9` is UTF-8
    `é`, `%FF` a byte of its own): parse_qsl on bytes encodes what it unquoted as ASCII and
    failed on both. A field without `=` is dropped, as TorchServe's frontend drops it, and
    does not count towards MAX_FORM_FIELDS."""
    fields: list[tuple[str, bytes]] = []
    for pair in body.split(b"&"):
        name, equals, value = pair.partition(b"=")
        if not equals:
            continue
        if len(fields) == MAX_FORM_FIELDS:  # before unquoting: the rest is never decoded
            raise BadRequest(f"Too many fields. Maximum number of fields is {MAX_FORM_FIELDS}.")
        key = unquote_to_bytes(name.replace(b"+", b" ")).decode("utf-8", "replace")
        fields.append((key, unquote_to_bytes(value.replace(b"+", b" "))))
    return fields


def media_type_of(content_type: str) -> str:
    """A Content-Type without its parameters, as TorchServe's frontend passes it on."""
    return content_type.split(";", 1)[0].strip()


async def _form_fields(content_type: str, body: bytes, item: RequestItem) -> None:
    parser = _RawFieldsParser(Headers({"content-type": content_type}), body)
    try:
        form = await parser.parse()
    # Starlette's limits, python-multipart's parse errors (ValueErrors); anything else is a
    # bug of ours (say, Starlette's parser changed under _RawFieldsParser): a 500, logged.
    except (MultiPartException, ValueError) as exc:
        raise BadRequest(f"Malformed multipart form data: {exc}") from None
    try:
        for name, value in parser.parts:
            if isinstance(value, bytes):  # a plain field: no content type of its own
                item.inputs[name] = value
                item.types.pop(name, None)
            else:
                item.inputs[name] = await value.read()
                item.types[name] = media_type_of(value.content_type or UNTYPED_FILE)
    finally:
        await form.close()


class _RawFieldsParser(MultiPartParser):
    """Starlette's multipart parser, with its limits (1000 fields, 1000 files, python-multipart's
    bounds on part headers), keeping each plain field's bytes as they were sent.

    Starlette hands a part without a filename on as str, decoded by the form's charset (latin-1
    when that is unknown), and encoding it again changes its bytes: `é` under `charset=bogus`,
    any binary part (`curl -F 'x=<file'`). TorchServe's frontend passes the part's bytes as
    they came. `parts` holds each part in order: a field's bytes, or a file's UploadFile.
    """

    def __init__(self, headers: Headers, body: bytes) -> None:
        # Text fields may be as large as the body may be (Starlette's default is 1 MB).
        super().__init__(headers, _whole(body), max_part_size=len(body) + 1)
        self.parts: list[tuple[str, bytes | UploadFile]] = []

    def on_part_end(self) -> None:
        part = self._current_part  # Starlette's: the part just read, its data not yet decoded
        self.parts.append((part.field_name, bytes(part.data) if part.file is None else part.file))
        super().on_part_end()


async def _whole(body: bytes) -> AsyncGenerator[bytes, None]:
    """The body, already read, as the stream Starlette's parser reads."""
    yield body
