"""Small ASGI helpers for the hot prediction paths, which skip FastAPI's routing on purpose.

On small models the HTTP stack, not the model, is the cost (see DESIGN.md's performance notes),
so `POST /predictions/...` and `POST /v2/.../infer` are plain ASGI: read the body once, call the
dataplane, send one response. Everything else goes through FastAPI.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from api.encoding import ErrorBody, encode_error, torchserve_error_body
from api.errors import PayloadTooLarge
from api.observability.access_lines import AccessLines
from api.request_ids import request_id

# What TorchServe answers on its paths that take any method (/ping, /predictions, /metrics,
# /api-description): every method an HTTP client sends to an API.
EVERY_METHOD = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class TrailingSlashIgnored:
    """ASGI middleware: `/models/` is `/models`, as in TorchServe, which splits a path on '/'
    and drops the empty segments at its end. Starlette would answer a 307 redirect instead,
    which costs a probe a round trip and which clients do not follow for PUT or POST."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            scope = {**scope, "path": path.rstrip("/") or "/"}
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: `max_request_size` on the paths that go through FastAPI (management,
    metadata), as TorchServe bounds every request on every port. The body is read whole before
    the app runs, as TorchServe's aggregator reads it, so one over `limit` (declared or chunked)
    is refused with 413 even where the route never reads it."""

    def __init__(
        self, app: ASGIApp, limit: int, error_body: ErrorBody = torchserve_error_body
    ) -> None:
        self.app = app
        self.limit = limit
        self.error_body = error_body  # the API's own: KServe's under /v1 and /v2

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(receive, self.limit, header_dict(scope))
        except ClientDisconnected:
            return
        except PayloadTooLarge as exc:
            refusal = encode_error(exc, self.error_body)
            await send_response(send, refusal.status, refusal.body, refusal.headers)
            return
        await self.app(scope, replayed(body, then=receive), send)


class RequestIdHeader:
    """ASGI middleware: the answer carries `x-request-id` (the client's, or a new one), as every
    TorchServe answer does. The plain-ASGI prediction and /ping paths set their own, so this
    wraps only what goes through FastAPI."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(header_dict(scope)).encode("latin-1")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if all(name.lower() != b"x-request-id" for name, _ in headers):
                    headers.append((b"x-request-id", rid))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


class StatusTold:
    """ASGI middleware: `answered` is told the status of every answer `app` sends (what
    TorchServe's Requests2XX, Requests4XX and Requests5XX count, on every port)."""

    def __init__(self, app: ASGIApp, answered: Callable[[int], None]) -> None:
        self.app, self.answered = app, answered

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answered = self.answered

        async def send_and_tell(message: Message) -> None:
            if message["type"] == "http.response.start":
                answered(message["status"])
            await send(message)

        await self.app(scope, receive, send_and_tell)


class AccessLogged:
    """ASGI middleware: `StatusTold`'s, and a line in TorchServe's access_log.log for every
    answer (`api.observability.access_lines`); one wrapper, not two, on the hot path."""

    def __init__(self, app: ASGIApp, answered: Callable[[int], None], lines: AccessLines) -> None:
        self.app, self.answered, self.lines = app, answered, lines

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answered, lines = self.answered, self.lines
        started = time.monotonic()

        async def send_and_log(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                answered(status)
                lines.http(
                    scope.get("client"),
                    scope["method"],
                    request_target(scope),
                    scope["http_version"],
                    status,
                    started,
                )
            await send(message)

        await self.app(scope, receive, send_and_log)


def request_target(scope: Scope) -> str:
    """The path and query as the client sent them (`/api-description?x=1`)."""
    path = scope.get("raw_path") or scope["path"].encode("utf-8")
    query = scope.get("query_string")
    target = path + b"?" + query if query else path
    return target.decode("latin-1")


async def _disconnected() -> Message:
    return {"type": "http.disconnect"}


def replayed(body: bytes, then: Receive = _disconnected) -> Receive:
    """A `receive` that hands an app the `body` already read, whole, and then what `then`
    gives (by default a disconnect: nothing more is coming)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return await then()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


class ClientDisconnected(Exception):
    """The client went away before its body was read."""


def header_dict(scope: Scope) -> dict[str, str]:
    """Request headers with lower-case names (the last one wins for repeated names)."""
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


async def read_body(receive: Receive, limit: int, headers: dict[str, str]) -> bytes:
    """The whole body, or PayloadTooLarge as soon as it passes `limit` bytes."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"Request body of {declared} bytes exceeds max_request_size of {limit} bytes"
        )
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"Request body exceeds max_request_size of {limit} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send_response(
    send: Send, status: int, body: bytes, headers: dict[str, str] | list[tuple[str, str]]
) -> None:
    items = headers.items() if isinstance(headers, dict) else headers
    raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in items]
    raw_headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


# Scope key set by the edge protocol (`api.rest.edge`): `watch()` cancels the calling task when
# the client's connection is lost and returns the function that stops watching.
DISCONNECT_WATCH = "torchgate.watch_disconnect"


async def cancel_on_disconnect(scope: Scope, receive: Receive, work: Awaitable[Any]) -> Any:
    """Await `work`, cancelling it if the client disconnects first.

    Cancelling reaches the batcher as a cancelled future, so a request whose client went away
    while it was queued is never run. Under torchgate's edge protocol the connection itself
    says when it is lost; any other ASGI server is asked through `receive()`, which costs a
    task per request.
    """
    watch_disconnect = scope.get(DISCONNECT_WATCH)
    if watch_disconnect is not None:
        stop = watch_disconnect()
        try:
            return await work
        finally:
            stop()

    task = asyncio.current_task()
    assert task is not None

    def on_message(watch: asyncio.Future[Message]) -> None:
        disconnected = (
            not watch.cancelled()
            and watch.exception() is None
            and watch.result().get("type") == "http.disconnect"
        )
        if disconnected:
            task.cancel()

    watch = asyncio.ensure_future(receive())
    watch.add_done_callback(on_message)
    try:
        return await work
    finally:
        watch.remove_done_callback(on_message)
        watch.cancel()
