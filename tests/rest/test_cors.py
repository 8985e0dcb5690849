"""`api.rest.cors`: TorchServe's three CORS headers on every answer, in process."""

from __future__ import annotations

import asyncio

import httpx

from api.rest.asgi import Receive, Scope, Send, send_response
from api.rest.cors import CorsHeaders, with_cors


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["path"] == "/own":
        headers = {"access-control-allow-origin": "https://own.example"}
        await send_response(send, 200, b"own", headers)
        return
    await send_response(send, 404 if scope["path"] == "/missing" else 200, b"{}", {})


def get(asgi: object, path: str, **headers: str) -> httpx.Response:
    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=asgi)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get(path, headers=headers)

    return asyncio.run(call())


def test_as_written_on_every_answer_whatever_the_origin() -> None:
    cors = CorsHeaders(app, origin="*", methods="GET, POST", headers="Content-Type")
    for path, origin in (("/x", {}), ("/missing", {"origin": "https://a.example"})):
        answer = get(cors, path, **origin)
        assert answer.headers["access-control-allow-origin"] == "*"
        assert answer.headers["access-control-allow-methods"] == "GET, POST"
        assert answer.headers["access-control-allow-headers"] == "Content-Type"
        assert "vary" not in answer.headers
    # A header the app set itself is kept, as TorchServe keeps it.
    answer = get(cors, "/own")
    assert answer.headers.get_list("access-control-allow-origin") == ["https://own.example"]


def test_a_list_of_origins_answers_the_listed_origin_only() -> None:
    cors = CorsHeaders(app, origin="https://a.example, https://b.example")
    answer = get(cors, "/x", origin="https://b.example")
    assert answer.headers["access-control-allow-origin"] == "https://b.example"
    assert answer.headers["vary"] == "Origin"
    answer = get(cors, "/x", origin="https://evil.example")
    assert "access-control-allow-origin" not in answer.headers
    assert "access-control-allow-methods" not in answer.headers


def test_without_the_keys_the_app_is_not_wrapped() -> None:
    assert with_cors(app, origin="", methods="", headers="") is app
    assert isinstance(with_cors(app, origin="", methods="GET", headers=""), CorsHeaders)
