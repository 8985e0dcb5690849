"""`/predictions` and `/explanations` in process: streaming replies, verbs, forms, OPTIONS.

A fake worker streams the way the worker backend does (each intermediate response handed to
the request's `stream` callback before the final one); the real inference app answers over
httpx's ASGI transport. The same behaviours against real TorchServe are in
tests/integration/test_torchserve_examples_stream.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from api.core.dataplane import DataPlane
from api.core.registry import Registry
from api.core.types import InferenceRequest, ModelSettings, Prediction
from api.errors import InferenceFailed
from api.rest.apps import build_inference_app
from api.rest.inference import model_api_document
from tests.support import aio
from tests.support.echo_backend import factory


class StreamingWorker:
    """Streams each word of the body as one intermediate response; "fail" fails the batch
    after the words before it, "bad" answers that item with a handler's 400."""

    device = "cpu"

    async def predict(self, batch: Sequence[InferenceRequest]) -> list[Prediction]:
        answers = []
        for request in batch:
            body = request.inputs.get("body", b"")
            words = body.decode().split() if isinstance(body, bytes) else []
            for word in words[:-1]:
                if word == "fail":
                    raise InferenceFailed("the handler failed mid-stream")
                if request.stream is not None:
                    request.stream(Prediction(word + " ", headers={"ts_stream_next": "true"}))
                await asyncio.sleep(0)
            if words and words[-1] == "bad":
                answers.append(Prediction("", status=400, message="bad input"))
                continue
            answers.append(
                Prediction(
                    {
                        "last": words[-1] if words else None,
                        "inputs": {k: _plain(v) for k, v in request.inputs.items()},
                        "types": dict(request.input_types),
                        "explain": request.headers.get("explain"),
                    }
                )
            )
        return answers

    async def close(self) -> None:
        pass


def _plain(value: Any) -> Any:
    return ["bytes", value.decode()] if isinstance(value, bytes) else value


class StreamingBackend:
    batches = True
    signature: Mapping[str, Any] | None = None
    manifest: Mapping[str, Any] = {"model": {"modelName": "m", "modelVersion": "1.0"}}

    async def start_worker(self, index: int) -> StreamingWorker:
        return StreamingWorker()

    async def close(self) -> None:
        pass


@asynccontextmanager
async def app() -> AsyncIterator[Any]:
    registry = Registry()
    backend: Any = StreamingBackend()
    settings = ModelSettings(max_batch_delay_ms=0)
    await registry.register("m", "1.0", "m.mar", factory(backend), settings)
    try:
        yield build_inference_app(
            DataPlane(registry),
            max_request_size=1 << 20,
            max_response_size=1 << 20,
            auth=None,
            max_items=16,
        )
    finally:
        await registry.close()


@asynccontextmanager
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with app() as inference:
        transport = httpx.ASGITransport(app=inference)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            yield http


async def asgi_messages(app: Any, path: str, body: bytes) -> list[dict[str, Any]]:
    """What the app sends for one request, message by message (httpx's ASGI transport joins
    the body parts, and refuses a response that never completes)."""
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "query_string": b"",
        "headers": [(b"content-length", str(len(body)).encode())],
    }
    sent: list[dict[str, Any]] = []
    done = asyncio.Event()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    done.set()
    return sent


def test_a_streaming_handler_is_answered_in_chunks() -> None:
    async def scenario() -> None:
        async with app() as inference:
            sent = await asgi_messages(inference, "/predictions/m", b"one two three")
        start, *parts = sent
        headers = dict(start["headers"])
        assert start["status"] == 200
        assert headers[b"ts_stream_next"] == b"true"
        assert b"content-length" not in headers  # chunked transfer
        assert [p["body"] for p in parts[:2]] == [b"one ", b"two "]
        assert json.loads(parts[2]["body"])["last"] == "three"
        assert [p["more_body"] for p in parts] == [True, True, False]

    aio.run(scenario())


def test_a_failure_mid_stream_ends_the_body_early_and_one_before_is_an_error() -> None:
    async def scenario() -> None:
        async with app() as inference:
            sent = await asgi_messages(inference, "/predictions/m", b"one fail x")
            # No closing part: the server closes the connection, the body is cut short.
            assert [m.get("body") for m in sent[1:]] == [b"one "]
            assert sent[-1]["more_body"] is True
            sent = await asgi_messages(inference, "/predictions/m", b"fail x")
            assert sent[0]["status"] == 500
            assert json.loads(sent[1]["body"])["message"] == "the handler failed mid-stream"

    aio.run(scenario())


def test_a_handler_that_does_not_stream_gets_a_plain_reply() -> None:
    async def scenario() -> None:
        async with client() as http:
            reply = await http.post("/predictions/m", content=b"single")
            assert reply.headers["content-length"] == str(len(reply.content))
            assert reply.headers["x-model-version"] == "1.0"
            assert reply.json()["last"] == "single"
            bad = await http.post("/predictions/m", content=b"bad")
            assert bad.status_code == 400

    aio.run(scenario())


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "POST"])
def test_every_method_runs_inference(method: str) -> None:
    async def scenario() -> None:
        async with client() as http:
            reply = await http.request(method, "/predictions/m/1.0", content=b"file")
            assert reply.status_code == 200
            assert reply.json()["inputs"] == {"body": ["bytes", "file"]}
            assert reply.json()["explain"] == "False"

    aio.run(scenario())


def test_explanations_carry_the_explain_header() -> None:
    async def scenario() -> None:
        async with client() as http:
            headers = {"explain": "False"}  # the client's value never wins
            reply = await http.post("/explanations/m", content=b"x", headers=headers)
            assert reply.json()["explain"] == "True"
            missing = await http.post("/explanations/nope", content=b"x")
            assert missing.status_code == 404

    aio.run(scenario())


def test_forms_reach_the_handler_as_fields() -> None:
    async def scenario() -> None:
        async with client() as http:
            reply = await http.post("/predictions/m", data={"a": "1", "b": "two words"})
            assert reply.json()["inputs"] == {"a": ["bytes", "1"], "b": ["bytes", "two words"]}
            files = {"doc": ("d.json", b'{"k": 1}', "application/json")}
            reply = await http.post("/predictions/m", data={"f": "v"}, files=files)
            # Each as it came, with a file's content type: the worker decodes (api.workers.items).
            assert reply.json()["inputs"] == {"f": ["bytes", "v"], "doc": ["bytes", '{"k": 1}']}
            assert reply.json()["types"] == {"doc": "application/json"}

    aio.run(scenario())


def test_options_answers_the_model_description() -> None:
    async def scenario() -> None:
        async with client() as http:
            reply = await http.options("/predictions/m")
            assert reply.status_code == 200
            assert reply.content == model_api_document("m")
            assert reply.json()["info"]["title"] == "RESTful API for: m"
            missing = await http.options("/predictions/nope")
            assert missing.status_code == 404
            assert missing.json()["type"] == "ModelNotFoundException"

    aio.run(scenario())
