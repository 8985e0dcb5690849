"""KServe v2 over REST, in process: `api.app.build(...).inference_app` through httpx's ASGI
transport, with fake archives served by a tensor-doubling backend (no torch, no handler).

Model "m" (1.0 default, 2.0) has a signature: input "x" FP32 [-1, 2], outputs "y" (x * 2) and
"total" (row sums). Model "plain" has none, as a third-party archive. A request parameter
"answer" makes the backend answer as a plain handler would (see `TensorWorker`).
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as thttp
from tritonclient.http._utils import _get_inference_request as triton_http_request

from api.app import Torchgate
from api.core.types import API_V2_REST
from api.v2 import bridge
from tests.support.aio import run
from tests.support.inprocess import started_torchgate
from tests.support.tensor_backend import (
    SIGNATURE,
    TensorBackend,
    load_tensor_backend,
    write_archive,
)

T = TypeVar("T")
HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_REQUEST_SIZE = 4096


@dataclass
class Serving:
    tg: Torchgate
    client: httpx.AsyncClient

    def backend(self, model: str = "m", version: str = "1.0") -> TensorBackend:
        backend = self.tg.registry.get(model, version).backend
        assert isinstance(backend, TensorBackend)
        return backend


@asynccontextmanager
async def serving(tmp_path: Path, **config: str) -> AsyncIterator[Serving]:
    store = tmp_path / "model_store"
    archives = [
        write_archive(store, "m", "1.0", SIGNATURE),
        write_archive(store, "m", "2.0", SIGNATURE),
        write_archive(store, "plain", "1.0", None),
    ]
    config = {
        "model_store": str(store),
        "load_models": ",".join(archives),
        "max_request_size": str(MAX_REQUEST_SIZE),
        **config,
    }
    async with started_torchgate(tmp_path, config, load_tensor_backend) as run:
        transport = httpx.ASGITransport(app=run.tg.inference_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://torchgate") as client:
            yield Serving(run.tg, client)


def x_input(rows: list[list[float]], **extra: Any) -> dict[str, Any]:
    return {"name": "x", "datatype": "FP32", "shape": [len(rows), 2], "data": rows, **extra}


def binary_body(
    header: dict[str, Any], *chunks: bytes, **headers: str
) -> tuple[bytes, dict[str, str]]:
    """A request with Triton's binary tensor extension: JSON header, then raw tensor bytes."""
    head = orjson.dumps(header)
    return head + b"".join(chunks), {HEADER_LENGTH: str(len(head)), **headers}


def split_binary(response: httpx.Response) -> tuple[dict[str, Any], bytes]:
    length = int(response.headers[HEADER_LENGTH])
    header: dict[str, Any] = orjson.loads(response.content[:length])
    return header, response.content[length:]


def error_of(response: httpx.Response, status: int) -> str:
    """The `{"error": ...}` message of a v2 error response, checked for its status."""
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"]
    message: str = body["error"]
    return message


# -- health and metadata ---------------------------------------------------------------------


def test_server_metadata_and_health(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as s:
            response = await s.client.get("/v2")
            assert response.json() == {
                "name": "torchgate",
                "version": "0.1.0",
                "extensions": ["binary_tensor_data"],
            }
            assert (await s.client.get("/v2/health/live")).json() == {"live": True}
            ready = await s.client.get("/v2/health/ready")
            assert (ready.status_code, ready.json()) == (200, {"ready": True})
            s.tg.dataplane.accepting = False  # shutting down: not ready, still live
            ready = await s.client.get("/v2/health/ready")
            assert (ready.status_code, ready.json()) == (503, {"ready": False})
            assert (await s.client.get("/v2/health/live")).status_code == 200

    run(scenario())


def test_model_readiness_with_and_without_version(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as s:
            for path in ("/v2/models/m/ready", "/v2/models/m/versions/2.0/ready"):
                response = await s.client.get(path)
                assert (response.status_code, response.json()) == (
                    200,
                    {"name": "m", "ready": True},
                )
            message = error_of(await s.client.get("/v2/models/nope/ready"), 404)
            assert message == "Model not found: nope"
            message = error_of(await s.client.get("/v2/models/m/versions/9/ready"), 404)
            assert message == "Model version: 9 does not exist for model: m"

    run(scenario())


def test_model_metadata_comes_from_the_signature(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as s:
            metadata = (await s.client.get("/v2/models/m")).json()
            assert metadata == {
                "name": "m",
                "versions": ["1.0", "2.0"],
                "platform": "torchserve_handler",
                "inputs": SIGNATURE["inputs"],
                "outputs": SIGNATURE["outputs"],
            }
            metadata = (await s.client.get("/v2/models/m/versions/2.0")).json()
            assert metadata["versions"] == ["2.0"]
            plain = (await s.client.get("/v2/models/plain")).json()
            assert (plain["inputs"], plain["outputs"]) == ([], [])
            assert error_of(await s.client.get("/v2/models/nope"), 404) == "Model not found: nope"

    run(scenario())


# -- inference -------------------------------------------------------------------------------


def test_json_inference(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as s:
            request = {"id": "r-1", "inputs": [x_input([[1.0, 2.0], [3.0, 4.5]])]}
            response = await s.client.post(
                "/v2/models/m/infer", json=request, headers={"x-request-id": "abc"}
            )
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == "application/json"
            assert response.headers["x-request-id"] == "abc"
            assert response.headers["x-model-version"] == "1.0"
            assert response.json() == {
                "model_name": "m",
                "model_version": "1.0",
                "id": "r-1",
                "outputs": [
                    {"name": "y", "datatype": "FP32", "shape": [2, 2], "data": [2, 4, 6, 9]},
                    {"name": "total", "datatype": "FP32", "shape": [2], "data": [3, 7.5]},
                ],
            }
            [item] = s.backend().seen
            assert (item.api, item.request_id, item.kserve_v2) == (API_V2_REST, "abc", True)
            [tensor] = item.inputs["body"]["inputs"]
            assert tensor["data"].dtype == np.float32

    run(scenario())


def test_explicit_version_and_requested_outputs(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as s:
            request = {"inputs": [x_input([[1.0, 1.0]])], "outputs": [{"name": "total"}]}
            response = await s.client.post("/v2/models/m/versions/2.0/infer", json=request)
            assert response.json() == {
                "model_name": "m",
                "model_version": "2.0",
                "outputs": [{"name": "total", "datatype": "FP32", "shape": [1], "data": [2.0]}],
            }
            assert len(s.backend(version="2.0").seen) == 1
            assert s.backend(version="1.0").seen == []

    run(scenario())


def test_binary_inputs_and_outputs(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as s:
            x = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
            header = {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "FP32",
                        "shape": [2, 2],
                        "parameters": {"binary_data_size": x.nbytes},
                    }
                ],
                "outputs": [
                    {"name": "y", "parameters": {"binary_data": True}},
                    {"name": "total", "parameters": {"binary_data": False}},
                ],
            }
            content, headers = binary_body(header, x.tobytes())
            response = await s.client.post("/v2/models/m/infer", content=content, headers=headers)
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == "application/octet-stream"
            doc, raw = split_binary(response)
            y, total = doc["outputs"]
            assert y == {
                "name": "y",
                "datatype": "FP32",
                "shape": [2, 2],
                "parameters": {"binary_data_size": 16},
            }
            np.testing.assert_array_equal(np.frombuffer(raw, np.float32).reshape(2, 2), x * 2)
            assert total["data"] == [3.0, 7.0]

    run(scenario())


def test_nan_and_infinities_survive_a_tritonclient_json_round_trip(tmp_path: Path) -> None:
    """tritonclient writes NaN, Infinity and -Infinity for non-finite floats in JSON, and reads
    them back; Triton reads and writes them too (orjson alone reads none, writes null)."""

    async def scenario() -> None:
        async with serving(tmp_path) as s:
            x = np.array([[np.nan, np.inf], [-np.inf, 1.5]], np.float32)
            tensor = thttp.InferInput("x", [2, 2], "FP32").set_data_from_numpy(x, False)
            outputs = [thttp.InferRequestedOutput("y", binary_data=False)]
            body, _ = triton_http_request([tensor], "", outputs, 0, False, False, 0, None, None)
            response = await s.client.post("/v2/models/m/infer", content=body)
            assert response.status_code == 200, response.text
            assert b'"data":[NaN,Infinity,-Infinity,3.0]' in response.content
            result = thttp.InferResult.from_response_body(response.content)
            np.testing.assert_array_equal(result.as_numpy("y"), x * 2)

    run(scenario())


def test_binary_data_output_makes_every_output_binary(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as s:
            request = {
                "inputs": [x_input([[1.0, 2.0]])],
                "parameters": {"binary_data_output": True},
            }
            response = await s.client.post("/v2/models/m/infer", json=request)
            doc, raw = split_binary(response)
            sizes = [o["parameters"]["binary_data_size"] for o in doc["outputs"]]
            assert sizes == [8, 4]
            assert np.frombuffer(raw, np.float32).tolist() == [2.0, 4.0, 3.0]

    run(scenario())


def test_gzip_and_deflate_request_bodies(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as s:
            body = orjson.dumps({"inputs": [x_input([[1.0, 2.0]])]})
            for encoding, packed in (
                ("gzip", gzip.compress(body)),
                ("deflate", zlib.compress(body)),
            ):
                response = await s.client.post(
                    "/v2/models/m/infer", content=packed, headers={"content-encoding": encoding}
                )
                assert response.json()["outputs"][1]["data"] == [3.0], encoding
            response = await s.client.post(
                "/v2/models/m/infer", content=body, headers={"content-encoding": "br"}
            )
            assert error_of(response, 415) == (
                "Unsupported Content-Encoding: br (this server takes gzip, deflate)"
            )
            assert response.headers["accept-encoding"] == "gzip, deflate"  # RFC 7694
            response = await s.client.post(
                "/v2/models/m/infer", content=b"not gzip", headers={"content-encoding": "gzip"}
            )
            assert error_of(response, 400).startswith("Body is not valid gzip data")
            response = await s.client.post(
                "/v2/models/m/infer",
                content=gzip.compress(body)[:-12],  # cut off: zlib would return a prefix
                headers={"content-encoding": "gzip"},
            )
            assert error_of(response, 400).endswith("the stream is truncated")
            bomb = gzip.compress(b" " * (MAX_REQUEST_SIZE * 4))  # small on the wire only
            response = await s.client.post(
                "/v2/models/m/infer", content=bomb, headers={"content-encoding": "gzip"}
            )
            assert "exceeds max_request_size" in error_of(response, 413)

    run(scenario())


@pytest.mark.parametrize(
    ("accept", "coding"),
    [
        ("gzip", "gzip"),
        ("deflate", "deflate"),
        ("deflate;q=0.5, gzip;q=0.4", "deflate"),
        ("br, gzip", "gzip"),
        ("*", "gzip"),
        ("identity", None),
        ("gzip;q=0.5, identity", None),
        ("gzip;q=0", None),
        ("gzip;q=nan", None),
        ("br", None),
    ],
)
def test_answers_are_compressed_as_accept_encoding_asks(
    tmp_path: Path, accept: str, coding: str | None
) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as s:
            doc = {"inputs": [x_input([[1.0, 2.0]])], "parameters": {"binary_data_output": True}}
            headers = {"accept-encoding": accept}
            # Streamed, to read the bytes as sent: httpx would undo the coding.
            async with s.client.stream(
                "POST", "/v2/models/m/infer", json=doc, headers=headers
            ) as response:
                assert response.status_code == 200
                raw = b"".join([chunk async for chunk in response.aiter_raw()])
            assert response.headers.get("content-encoding") == coding
            assert response.headers["vary"] == "Accept-Encoding"
            if coding is not None:
                raw = zlib.decompress(raw, 31 if coding == "gzip" else 15)
            length = int(response.headers[HEADER_LENGTH])  # of the uncompressed answer
            assert orjson.loads(raw[:length])["outputs"][1]["name"] == "total"
            assert np.frombuffer(raw[length:][-4:], np.float32).tolist() == [3.0]

    run(scenario())


@pytest.mark.parametrize(
    ("answer", "output"),
    [
        (
            "label",
            {"name": "output0", "datatype": "BYTES", "shape": [1], "data": ['{"7":0.9,"1":0.1}']},
        ),
        ("text", {"name": "output0", "datatype": "BYTES", "shape": [1], "data": ["version 1.0"]}),
    ],
)
def test_plain_answers_become_bytes_tensors(
    tmp_path: Path, answer: str, output: dict[str, Any]
) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as s:
            request = {"inputs": [x_input([[1.0, 2.0]])]}
            headers = {"x-answer": answer}  # a plain handler never sees v2 parameters
            response = await s.client.post("/v2/models/plain/infer", json=request, headers=headers)
            assert response.json()["outputs"] == [output]

    run(scenario())


def test_a_plain_archive_takes_any_input(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as s:
            request = {
                "inputs": [
                    {"name": "anything", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]}
                ],
                "parameters": {"answer": "text"},
            }
            response = await s.client.post("/v2/models/plain/infer", json=request)
            assert response.status_code == 200, response.text

    run(scenario())


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "request_doc", "status", "message"),
    [
        ("/v2/models/nope/infer", {"inputs": [x_input([[1, 2]])]}, 404, "Model not found: nope"),
        (
            "/v2/models/m/versions/9/infer",
            {"inputs": [x_input([[1, 2]])]},
            404,
            "Model version: 9 does not exist for model: m",
        ),
        (
            "/v2/models/m/infer",
            {"inputs": [{"name": "x", "datatype": "INT32", "shape": [1, 2], "data": [1, 2]}]},
            400,
            "input 'x': datatype INT32, the model takes FP32",
        ),
        (
            "/v2/models/m/infer",
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]},
            400,
            "input 'x': shape [1, 3] does not fit the model's [-1, 2]",
        ),
        (
            "/v2/models/m/infer",
            {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]},
            400,
            "unexpected input 'z': the model takes 'x'",
        ),
        (
            "/v2/models/m/infer",
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1]}]},
            400,
            "input 'x': 1 elements in data, shape [1, 2] needs 2",
        ),
        (
            "/v2/models/m/infer",
            {"inputs": [x_input([[1, 2]])], "outputs": [{"name": "nope"}]},
            400,
            "unexpected inference output 'nope' for model 'm'",  # Triton's words
        ),
        (
            "/v2/models/m/infer",
            {"inputs": [x_input([[1, 2]])], "parameters": {"triton_x": 1}},
            400,
            "parameter keys starting with 'triton_' are reserved for Triton usage",
        ),
        (
            "/v2/models/m/infer",
            {"inputs": [x_input([[1, 2]])], "parameters": {"binary_data_output": "yes"}},
            400,
            "Unable to parse 'binary_data_output'",
        ),
        (
            "/v2/models/m/infer",
            {"inputs": [x_input([[1, 2]])], "parameters": {"sequence_id": -3}},
            400,
            "Unable to parse 'sequence_id'",
        ),
        (
            "/v2/models/m/infer",
            {"inputs": [x_input([[1, 2]])], "parameters": {"answer": "fail"}},
            400,
            "x must be positive",  # the handler's own message for its item
        ),
        ("/v2/models/m/versions/infer", {"inputs": []}, 404, "Unknown v2 path"),
        # A handler without a signature would get an item with nothing in it (500).
        ("/v2/models/plain/infer", {"inputs": []}, 400, "the request has no inputs"),
        (
            "/v2/models/m/infer",
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [[True, 2]]}]},
            400,
            "input 'x': data does not hold FP32 values",  # numpy would read true as 1.0
        ),
    ],
)
def test_errors_have_the_tables_status_and_a_v2_body(
    tmp_path: Path, path: str, request_doc: dict[str, Any], status: int, message: str
) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as s:
            response = await s.client.post(path, json=request_doc)
            assert error_of(response, status).startswith(message)
            assert response.headers["content-type"] == "application/json"

    run(scenario())


def test_requested_outputs_are_checked_before_the_model_runs(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as s:
            doc = {"inputs": [x_input([[1, 2]])], "outputs": [{"name": "total"}, {"name": "z"}]}
            response = await s.client.post("/v2/models/m/infer", json=doc)
            assert error_of(response, 400) == "unexpected inference output 'z' for model 'm'"
            assert s.backend().seen == []  # refused before it was queued, as Triton does
            # A name asked for twice is answered once, with the first one's flags (Triton).
            binary = {"name": "total", "parameters": {"binary_data": True}}
            doc = {"inputs": [x_input([[1, 2]])], "outputs": [binary, {"name": "total"}]}
            response = await s.client.post("/v2/models/m/infer", json=doc)
            header, raw = split_binary(response)
            assert [o["name"] for o in header["outputs"]] == ["total"]
            assert np.frombuffer(raw, np.float32).tolist() == [3.0]

    run(scenario())


def test_a_requested_output_the_answer_lacks_is_whose_fault_the_signature_says(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as s:
            # "m" lists "total" (checked before it ran): a handler that did not return it
            # failed, not the client. A plain answer is one tensor, named "y" here.
            doc = {
                "inputs": [x_input([[1, 2]])],
                "outputs": [{"name": "total"}],
                "parameters": {"answer": "text"},
            }
            response = await s.client.post("/v2/models/m/infer", json=doc)
            assert "did not return output 'total'" in error_of(response, 500)
            # "plain" lists no outputs: an unknown name was never checked, and is the client's.
            doc = {"inputs": [x_input([[1, 2]])], "outputs": [{"name": "zz"}]}
            response = await s.client.post("/v2/models/plain/infer", json=doc)
            assert error_of(response, 400) == "unknown output 'zz' requested"

    run(scenario())


def test_sequence_parameters_reach_the_handler_as_torchserves_headers(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as s:
            parameters = {"sequence_id": 42, "sequence_start": True, "sequence_end": True}
            doc = {"inputs": [x_input([[1, 2]])], "parameters": parameters}
            response = await s.client.post("/v2/models/m/infer", json=doc)
            assert response.status_code == 200, response.text
            headers = s.backend().seen[-1].headers
            assert headers["ts_request_sequence_id"] == "42"
            assert headers["ts_request_sequence_start"] == "true"
            assert headers["ts_request_sequence_end"] == "true"

    run(scenario())


def test_priority_is_accepted_and_warned_about_once_per_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bridge, "_priority_noted", set())  # once per process: start afresh

    async def scenario() -> None:
        async with serving(tmp_path) as s:
            doc = {"inputs": [x_input([[1, 2]])], "parameters": {"priority": 2}}
            response = await s.client.post("/v2/models/nope/infer", json=doc)
            assert response.status_code == 404
            for _ in range(2):
                response = await s.client.post("/v2/models/m/infer", json=doc)
                assert response.status_code == 200, response.text

    with caplog.at_level(logging.WARNING, logger="api.v2.bridge"):
        run(scenario())
    notes = [r.getMessage() for r in caplog.records if "'priority'" in r.getMessage()]
    assert len(notes) == 1 and notes[0].startswith("m: ")  # not for the unknown model


def test_malformed_bodies_are_400(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as s:
            post = s.client.post
            response = await post("/v2/models/m/infer", content=b"{not json")
            assert error_of(response, 400).startswith("request body is not valid JSON")
            content, headers = binary_body({"inputs": [x_input([[1, 2]])]}, b"\x00" * 4)
            response = await post("/v2/models/m/infer", content=content, headers=headers)
            assert "no input's binary_data_size claims them" in error_of(response, 400)
            response = await post(
                "/v2/models/m/infer", content=b"{}", headers={HEADER_LENGTH: "99"}
            )
            assert "outside the 2-byte body" in error_of(response, 400)
            # The header as a Content-Length: ASCII digits only, though int() takes "1_0".
            content, headers = binary_body({"inputs": [x_input([[1, 2]])]})
            length = headers[HEADER_LENGTH]
            headers[HEADER_LENGTH] = f"{length[0]}_{length[1:]}"
            response = await post("/v2/models/m/infer", content=content, headers=headers)
            assert f"{HEADER_LENGTH} must be an integer" in error_of(response, 400)

    run(scenario())


def test_a_handler_that_raises_is_500(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as s:
            request = {"inputs": [x_input([[1, 2]])], "parameters": {"answer": "raise"}}
            response = await s.client.post("/v2/models/m/infer", json=request)
            assert response.status_code == 500
            assert "error" in response.json()

    run(scenario())


def test_oversized_bodies_are_413(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as s:
            rows = [[1.0, 2.0]] * MAX_REQUEST_SIZE
            response = await s.client.post("/v2/models/m/infer", json={"inputs": [x_input(rows)]})
            assert "exceeds max_request_size" in error_of(response, 413)
            assert s.backend().seen == []

    run(scenario())


def test_token_authorization(tmp_path: Path) -> None:
    async def scenario() -> None:
        key_file = tmp_path / "keys" / "key_file.json"
        key_file.parent.mkdir()
        config = {"disable_token_authorization": "false", "torchgate.key_file": str(key_file)}
        async with serving(tmp_path, **config) as s:
            key = json.loads(key_file.read_text())["inference"]["key"]
            request = {"inputs": [x_input([[1, 2]])]}
            response = await s.client.post("/v2/models/m/infer", json=request)
            assert error_of(response, 401).startswith("Token Authorization failed")
            response = await s.client.post(
                "/v2/models/m/infer", json=request, headers={"Authorization": "Bearer wrong"}
            )
            assert response.status_code == 401
            response = await s.client.post(
                "/v2/models/m/infer", json=request, headers={"Authorization": f"Bearer {key}"}
            )
            assert response.status_code == 200, response.text
            assert len(s.backend().seen) == 1
            # Health and metadata need no key, on REST as on gRPC.
            assert (await s.client.get("/v2/health/ready")).status_code == 200
            assert (await s.client.get("/v2/models/m")).status_code == 200

    run(scenario())


def test_a_request_is_checked_against_the_version_it_is_routed_to(tmp_path: Path) -> None:
    """An A/B split may route to a version with another signature, or none: the check and the
    bridge rule are that version's, not the default's."""
    store = tmp_path / "model_store"
    archives = [
        write_archive(store, "ab", "1.0", SIGNATURE),
        write_archive(store, "ab", "2.0", None),
    ]
    config = {
        "model_store": str(store),
        "load_models": ",".join(archives),
        "torchgate.traffic": json.dumps({"ab": {"weights": {"1.0": 0, "2.0": 100}}}),
    }
    ints = {"name": "anything", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]}

    async def scenario() -> None:
        async with started_torchgate(tmp_path, config, load_tensor_backend) as started:
            transport = httpx.ASGITransport(app=started.tg.inference_app)
            async with httpx.AsyncClient(transport=transport, base_url="http://tg") as client:
                # The default (1.0) would refuse INT64 input "anything"; 2.0 takes any input.
                routed = await client.post("/v2/models/ab/infer", json={"inputs": [ints]})
                assert routed.status_code == 200, routed.text
                assert routed.json()["model_version"] == "2.0"
                pinned = await client.post(
                    "/v2/models/ab/versions/1.0/infer", json={"inputs": [ints]}
                )
                assert "anything" in error_of(pinned, 400)

    run(scenario())
