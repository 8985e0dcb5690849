"""Each HTTP API answers errors in its own shape, in process (`api.rest.errors`).

TorchServe's apps answer `{"code", "type", "message"}`; the KServe v2 app `{"error": ...}`.
The app serving a path decides, never the path's spelling: an unknown path under `/v2` is the
KServe app's 404, an unknown path elsewhere TorchServe's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from api.encoding import kserve_error_body, torchserve_error_body
from api.errors import NotFound, Overloaded
from api.rest.errors import install_error_handlers
from tests.support.aio import run
from tests.support.inprocess import started_torchgate
from tests.support.tensor_backend import SIGNATURE, load_tensor_backend, write_archive


@asynccontextmanager
async def inference(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    store = tmp_path / "model_store"
    config = {"model_store": str(store), "load_models": write_archive(store, "m", "1.0", SIGNATURE)}
    async with started_torchgate(tmp_path, config, load_tensor_backend) as serving:
        transport = httpx.ASGITransport(app=serving.tg.inference_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://torchgate") as client:
            yield client


def torchserve_shape(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    body: dict[str, object] = response.json()
    assert set(body) == {"code", "type", "message"} and body["code"] == status
    return body


def kserve_shape(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"]
    return str(body["error"])


def test_each_api_on_the_inference_port_answers_its_own_shape(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with inference(tmp_path) as client:
            body = torchserve_shape(await client.post("/predictions/nope", content=b"1"), 404)
            assert body["type"] == "ModelNotFoundException"
            torchserve_shape(await client.get("/no/such/path"), 404)
            torchserve_shape(await client.delete("/"), 405)

            assert "nope" in kserve_shape(await client.get("/v2/models/nope"), 404)
            # An unknown model is 404 before the body is parsed, as in KServe and Triton.
            assert "nope" in kserve_shape(await client.post("/v2/models/nope/infer", json={}), 404)
            kserve_shape(await client.post("/v2/models/m/infer", json={}), 400)
            kserve_shape(await client.get("/v2/no/such/path"), 404)
            kserve_shape(await client.post("/v2/health/live"), 405)
            # The bare prefix is the KServe app's (server metadata), a longer word is not.
            assert (await client.get("/v2")).json()["name"] == "torchgate"
            torchserve_shape(await client.get("/v2x"), 404)

    run(scenario())


def test_the_port_describes_both_apis_in_one_document(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with inference(tmp_path) as client:
            paths = (await client.get("/api-description")).json()["paths"]
            assert {"/ping", "/predictions/{model_name}", "/v2/health/ready"} <= set(paths)
            assert "/v2/models/{model}/infer" in paths

    run(scenario())


@pytest.mark.parametrize(
    ("encode", "expected"),
    [
        (
            torchserve_error_body,
            {"code": 503, "type": "ServiceUnavailableException", "message": "busy"},
        ),
        (kserve_error_body, {"error": "busy"}),
    ],
)
def test_an_app_encodes_the_error_tree_validation_and_routing_errors(
    encode: object, expected: dict[str, object]
) -> None:
    app = FastAPI()
    install_error_handlers(app, encode)  # type: ignore[arg-type]

    @app.get("/busy")
    async def busy() -> None:
        raise Overloaded("busy")

    @app.get("/missing")
    async def missing() -> None:
        raise NotFound("gone")

    @app.get("/typed")
    async def typed(count: int) -> int:
        return count

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            answer = await client.get("/busy")
            assert answer.status_code == 503 and answer.json() == expected
            assert (await client.get("/missing")).status_code == 404
            invalid = await client.get("/typed", params={"count": "x"})
            assert invalid.status_code == 400 and "count" in invalid.text
            assert (await client.get("/nowhere")).status_code == 404

    run(scenario())


@pytest.mark.parametrize(
    ("encode", "expected"),
    [
        (
            torchserve_error_body,
            {"code": 500, "type": "InternalServerException", "message": "Internal server error"},
        ),
        (kserve_error_body, {"error": "Internal server error"}),
    ],
)
def test_a_bug_in_a_route_is_answered_500_in_the_api_s_shape(
    encode: object, expected: dict[str, object]
) -> None:
    # Starlette answers an unexpected exception with plain text unless the app handles it.
    app = FastAPI()
    install_error_handlers(app, encode)  # type: ignore[arg-type]

    @app.get("/bug")
    async def bug() -> None:
        raise ZeroDivisionError("a bug of ours")

    async def scenario() -> None:
        # The exception still reaches the server (uvicorn logs its traceback): not raised here.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            answer = await client.get("/bug")
            assert answer.status_code == 500
            assert answer.headers["content-type"] == "application/json"
            assert answer.json() == expected
            assert "a bug of ours" not in answer.text

    run(scenario())
