"""`POST /predictions/{model}[/{version}]` in process (`api.rest.predictions`): routing,
TorchServe's request items, the answer's headers and error bodies. Fake archives answer with
the version that served them (tests/support/fake_backend.py); no worker process runs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from api.core.types import Prediction
from api.encoding import Encoded, encode_prediction
from api.rest.invocations import is_invocation_path
from api.rest.predictions import RequestItem, request_item
from tests.support.aio import run
from tests.support.fake_backend import load_fake_backend, write_fake_archive
from tests.support.inprocess import started_torchgate


@asynccontextmanager
async def serving(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    store = tmp_path / "model_store"
    archives = [write_fake_archive(store, "m", v) for v in ("1.0", "2.0")]
    archives.append(write_fake_archive(store, "broken", "1.0", fail=True))
    config = {"model_store": str(store), "load_models": ",".join(archives)}
    async with started_torchgate(tmp_path, config, load_fake_backend) as serving:
        transport = httpx.ASGITransport(app=serving.tg.inference_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://torchgate") as client:
            yield client


def test_the_default_or_the_named_version_answers_and_says_which(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            default = await client.post("/predictions/m", json={"x": 1})
            assert default.status_code == 200
            assert default.json() == {"model": "m", "version": "1.0", "body": {"x": 1}}
            assert default.headers["x-model-version"] == "1.0"
            assert default.headers["content-type"] == "application/json"
            named = await client.post("/predictions/m/2.0", content=b"raw")
            assert named.json()["version"] == "2.0" and named.json()["body"] == "raw"
            assert named.headers["x-model-version"] == "2.0"

    run(scenario())


def test_unknown_models_versions_and_paths_are_torchserve_404s(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            for path in ("/predictions/nope", "/predictions/m/9.9", "/predictions/m/9.9/extra"):
                answer = await client.post(path, content=b"1")
                assert answer.status_code == 404, path
                assert set(answer.json()) == {"code", "type", "message"}

    run(scenario())


def test_a_failing_handler_is_500_and_the_server_keeps_serving(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            failed = await client.post("/predictions/broken", content=b"1")
            assert failed.status_code == 500 and failed.json()["code"] == 500
            assert (await client.post("/predictions/m", content=b"1")).status_code == 200

    run(scenario())


def test_malformed_json_reaches_the_handler_as_it_came(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            answer = await client.post(
                "/predictions/m", content=b"{", headers={"content-type": "application/json"}
            )
            # As TorchServe's worker: not decoded, passed on (a bytearray) with a warning.
            assert answer.status_code == 200 and answer.json()["body"] == "{"

    run(scenario())


def test_a_path_below_the_version_is_the_url_path_header(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            answer = await client.post("/predictions/m/2.0/v1/chat/completions", content=b"x")
            assert answer.status_code == 200 and answer.json()["version"] == "2.0"

    run(scenario())


def items(query: bytes, body: bytes, content_type: str, *, takes_query: bool) -> RequestItem:
    scope = {"query_string": query}
    headers = {"content-type": content_type} if content_type else {}
    return run(request_item(scope, body, headers, query=takes_query))


def test_the_body_goes_as_bytes_with_its_media_type() -> None:
    item = items(b"", b'{"x": 1}', "application/json; charset=utf-8", takes_query=False)
    assert item == RequestItem({"body": b'{"x": 1}'}, {"body": "application/json"})
    assert items(b"", b"\x00", "", takes_query=False) == RequestItem({"body": b"\x00"}, {})


def test_query_parameters_join_the_item_only_where_the_path_takes_them() -> None:
    # /predictions drops them, as TorchServe; /invocations and the others pass them as bytes.
    assert items(b"top_k=3", b"x", "text/plain", takes_query=False).inputs == {"body": b"x"}
    taken = items(b"top_k=3&empty=", b"x", "text/plain", takes_query=True)
    assert taken.inputs == {"top_k": b"3", "empty": b"", "body": b"x"}
    assert taken.types == {"body": "text/plain"}


@pytest.mark.parametrize(
    ("path", "taken"),
    [
        ("/invocations", True),
        ("/invocations/", True),
        ("/models/m/invoke", True),
        ("/m/predict", True),
        ("/m/1.0/predict", True),
        ("/invocations/x", False),
        ("/models/m/predict", False),
        ("/ping/predict", False),
        ("/predictions/predict", False),
        ("/m/1.0/x/predict", False),
    ],
)
def test_invocation_paths(path: str, taken: bool) -> None:
    assert is_invocation_path(path) is taken


@pytest.mark.parametrize(
    ("prediction", "status", "payload", "content_type"),
    [
        (Prediction({"a": 1}), 200, b'{"a":1}', "application/json"),
        (Prediction("text"), 200, b"text", "text/plain; charset=utf-8"),
        (Prediction(b"\x01"), 200, b"\x01", "application/octet-stream"),
        (
            Prediction(b"<x/>", headers={"Content-Type": "application/xml"}),
            200,
            b"<x/>",
            "application/xml",
        ),
    ],
)
def test_handler_outputs_are_encoded_as_torchserve_sends_them(
    prediction: Prediction, status: int, payload: bytes, content_type: str
) -> None:
    assert encode_prediction(prediction) == Encoded(
        status, payload, [("content-type", content_type)]
    )
