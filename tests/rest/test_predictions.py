"""`POST /predictions/{model}[/{version}]` in process (`api.rest.predictions`): routing,
TorchServe's request items, the answer's headers and error bodies. Fake archives answer with
the version that served them (tests/support/fake_backend.py); no worker process runs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.core.types import Prediction
from api.encoding import Encoded, encode_prediction
from api.errors import BadRequest
from api.rest.predictions import decode_inputs, decode_value
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
            for path in ("/predictions/nope", "/predictions/m/9.9", "/predictions/m/1.0/extra"):
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


def test_malformed_json_is_400(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            answer = await client.post(
                "/predictions/m", content=b"{", headers={"content-type": "application/json"}
            )
            assert answer.status_code == 400 and "Malformed JSON" in answer.json()["message"]

    run(scenario())


@pytest.mark.parametrize(
    ("content_type", "raw", "decoded"),
    [
        ("application/json", b'{"a": [1, 2]}', {"a": [1, 2]}),
        ("application/json; charset=utf-8", b"3", 3),
        ("text/plain", "héllo".encode(), "héllo"),
        ("TEXT/CSV", b"a,b", "a,b"),
        ("image/png", b"\x89PNG", b"\x89PNG"),
        ("", b"\x00\x01", b"\x00\x01"),
    ],
)
def test_values_decode_by_content_type_as_torchserve_s_worker(
    content_type: str, raw: bytes, decoded: Any
) -> None:
    assert decode_value(raw, content_type) == decoded


def test_undecodable_text_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="UTF-8"):
        decode_value(b"\xff\xfe", "text/plain")


def test_query_parameters_join_the_body_in_the_request_item() -> None:
    async def scenario() -> dict[str, Any]:
        scope = {"query_string": b"top_k=3&empty="}
        return await decode_inputs(scope, b'{"x": 1}', {"content-type": "application/json"})

    assert run(scenario()) == {"top_k": "3", "empty": "", "body": {"x": 1}}


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
