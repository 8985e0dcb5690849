"""The TorchServe proxy backend against a fake TorchServe: a real uvicorn on a free port that
speaks TorchServe's REST shapes (`/ping`, `/predictions/{m}/{v}`, `GET /models/{m}/{v}`) and
echoes what it received. No mocks: every byte goes over loopback HTTP.

The real TorchServe is exercised by tests/integration/test_stack.py.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import orjson
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.app import Torchgate, build
from api.backends.torchserve import (
    TorchServeBackend,
    TorchServeSpec,
    decode_response,
    encode_request,
    open_backend,
)
from api.config import parse_config
from api.core.types import API_TORCHSERVE_GRPC, API_V1_REST, InferenceRequest, ModelSettings
from api.errors import BackendUnavailable, BadRequest, DeadlineExceeded
from tests.support import aio
from tests.support.fake_backend import load_fake_backend, write_fake_archive
from tests.support.inprocess import asgi_clients
from tests.support.torchserve import free_ports

T = TypeVar("T")


run = functools.partial(aio.run, timeout=60)


# -- a fake TorchServe --------------------------------------------------------------------------


@dataclass
class FakeTorchServe:
    """TorchServe's REST API for one model, digits 2.0, with knobs the tests turn."""

    worker_status: str | None = "READY"  # None: the model is not registered
    answer_status: int = 200
    delay_s: float = 0.0
    seen: list[dict[str, Any]] = field(default_factory=list)
    # TorchServe 0.12's token authorization: {"inference": key, "management": key}, or off.
    keys: dict[str, str] | None = None

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/ping", self.ping),
                Route("/models/{model}", self.describe_default),
                Route("/models/{model}/{version}", self.describe),
                Route("/predictions/{model}/{version}", self.predict, methods=["POST"]),
                Route("/predictions/{model}/{version}/{more:path}", self.predict, methods=["POST"]),
                Route("/explanations/{model}/{version}", self.predict, methods=["POST"]),
            ]
        )

    def refused(self, request: Request, kind: str) -> Response | None:
        """TorchServe 0.12's 400 for a missing or wrong key, when its keys are on."""
        if self.keys is None or request.headers.get("authorization") == f"Bearer {self.keys[kind]}":
            return None
        body = {"code": 400, "type": "InvalidKeyException", "message": "Token Authorization failed"}
        return JSONResponse(body, status_code=400)

    async def ping(self, request: Request) -> Response:
        return self.refused(request, "inference") or JSONResponse({"status": "Healthy"})

    async def describe_default(self, request: Request) -> Response:
        return await self.describe(request, version="2.0")

    async def describe(self, request: Request, version: str | None = None) -> Response:
        if (refusal := self.refused(request, "management")) is not None:
            return refusal
        model = request.path_params["model"]
        version = version or request.path_params["version"]
        if self.worker_status is None or (model, version) != ("digits", "2.0"):
            message = f"Model not found: {model}"
            return JSONResponse({"code": 404, "message": message}, status_code=404)
        worker = {"id": "9000", "status": self.worker_status}
        return JSONResponse([{"modelName": model, "modelVersion": version, "workers": [worker]}])

    async def predict(self, request: Request) -> Response:
        if (refusal := self.refused(request, "inference")) is not None:
            return refusal
        raw = await request.body()
        seen: dict[str, Any] = {
            "path": request.url.path,
            "query": list(request.query_params.multi_items()),
            "headers": dict(request.headers),
            "body": base64.b64encode(raw).decode(),
        }
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            seen["form"] = {
                name: (
                    {"text": value}
                    if isinstance(value, str)
                    else {
                        "filename": value.filename,
                        "type": value.content_type,
                        "data": (await value.read()).decode(),
                    }
                )
                for name, value in form.multi_items()
            }
        self.seen.append(seen)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.answer_status != 200:
            return JSONResponse(
                {"code": self.answer_status, "type": "Custom", "message": "handler says no"},
                status_code=self.answer_status,
            )
        headers = {
            "x-handler": "digits",
            "cache-control": "no-cache",
            "access-control-allow-origin": "*",  # TorchServe's cors_allowed_origin=*
        }
        return Response(
            orjson.dumps({"echo": seen}), media_type="application/json", headers=headers
        )


@contextmanager
def serving(fake: FakeTorchServe, port: int) -> Iterator[str]:
    """Run `fake` under uvicorn on 127.0.0.1:`port` in a thread; yields its base URL."""
    config = uvicorn.Config(
        fake.app(), host="127.0.0.1", port=port, log_level="error", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "fake TorchServe did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def fake() -> FakeTorchServe:
    return FakeTorchServe()


@pytest.fixture
def port() -> int:
    return free_ports(1)[0]


def spec(port: int, **overrides: Any) -> TorchServeSpec:
    base = f"http://127.0.0.1:{port}"
    values: dict[str, Any] = {
        "inference_url": base,
        "management_url": base,
        "model_name": "digits",
        "model_version": "2.0",
        "health_interval_s": 3600.0,  # tests call check() themselves unless they say otherwise
        **overrides,
    }
    return TorchServeSpec(**values)


@asynccontextmanager
async def backend_for(spec: TorchServeSpec, timeout_s: float = 30.0) -> AsyncIterator[Any]:
    backend = await open_backend(
        spec, ModelSettings(response_timeout_s=timeout_s), name="digits", version="2.0"
    )
    try:
        yield backend
    finally:
        await backend.close()


def echoed(body: bytes) -> dict[str, Any]:
    echo: dict[str, Any] = orjson.loads(body)["echo"]
    return echo


# -- forwarding ---------------------------------------------------------------------------------


def test_forwards_body_headers_query_and_request_id(fake: FakeTorchServe, port: int) -> None:
    request = InferenceRequest(
        {"body": {"data": [1, 2.5]}, "topk": "3"},
        {
            "content-type": "application/json; charset=utf-8",
            "authorization": "Bearer gateway-key",
            "x-user-id": "u1",
            "host": "gateway:8080",
            # Bytes past ASCII, as received (read as Latin-1): sent on as those bytes.
            "x-note": b"caf\xe9".decode("latin-1"),
        },
        "rid-1",
    )

    async def scenario() -> None:
        async with backend_for(spec(port)) as backend:
            prediction = await backend.forward(request)
        assert prediction.status == 200
        assert prediction.headers["content-type"] == "application/json"
        assert prediction.headers["x-handler"] == "digits"  # a handler's own header passes
        assert "cache-control" not in prediction.headers  # TorchServe's per-response headers
        assert "access-control-allow-origin" not in prediction.headers  # the gateway's CORS
        assert "content-length" not in prediction.headers
        seen = echoed(prediction.body)
        assert seen["path"] == "/predictions/digits/2.0"
        assert seen["query"] == [["topk", "3"]]
        assert orjson.loads(base64.b64decode(seen["body"])) == {"data": [1, 2.5]}
        headers = seen["headers"]
        assert headers["content-type"] == "application/json; charset=utf-8"  # the client's
        assert headers["x-request-id"] == "rid-1"
        assert headers["x-user-id"] == "u1"
        assert headers["x-note"] == b"caf\xe9".decode("latin-1")
        assert "authorization" not in headers  # the gateway's key stays at the gateway
        assert headers["accept-encoding"] == "identity"  # streams are relayed as read
        assert headers["host"] == f"127.0.0.1:{port}"

    with serving(fake, port):
        run(scenario())


def test_the_path_below_the_version_goes_to_torchserve(fake: FakeTorchServe, port: int) -> None:
    headers = {"url_path": "v1/chat/completions", "explain": "False"}
    request = InferenceRequest({"body": b"x"}, headers, "rid-3")

    async def scenario() -> None:
        async with backend_for(spec(port)) as backend:
            seen = echoed((await backend.forward(request)).body)
        # TorchServe sets url_path and explain itself, from the path it is called on.
        assert seen["path"] == "/predictions/digits/2.0/v1/chat/completions"
        assert "url_path" not in seen["headers"] and "explain" not in seen["headers"]

    with serving(fake, port):
        run(scenario())


@pytest.mark.parametrize("below", ["../../mnist/1.0", "v1/../../../mnist", "./x", "a/.."])
def test_a_path_below_the_version_never_leaves_it(
    fake: FakeTorchServe, port: int, below: str
) -> None:
    """Dot segments would be resolved on the way to TorchServe: `/predictions/digits/2.0/
    ../../mnist/1.0` reached another model there, with the gateway's key."""
    request = InferenceRequest({"body": b"x"}, {"url_path": below}, "rid-4")

    async def scenario() -> None:
        async with backend_for(spec(port)) as backend:
            with pytest.raises(BadRequest, match="Invalid path below the model version"):
                await backend.forward(request)
        assert fake.seen == []

    with serving(fake, port):
        run(scenario())


def test_requests_past_concurrency_do_not_wait_for_a_connection(
    fake: FakeTorchServe, port: int
) -> None:
    """The scale API sets the lanes (requests in flight) past `concurrency` at run time: the
    connection pool, sized from `concurrency`, made the extra requests wait for a connection
    and fail (503) once they had waited `timeout_s`."""
    fake.delay_s = 0.5

    async def scenario() -> None:
        async with backend_for(spec(port, concurrency=1), timeout_s=1.5) as backend:
            # 3 connections (concurrency + 2) took 5 rounds of 0.5 s: the last ones waited
            # past 1.5 s for theirs.
            requests = [InferenceRequest({"body": b"x"}, {}, f"r{i}") for i in range(13)]
            answers = await asyncio.gather(*(backend.forward(r) for r in requests))
        assert [answer.status for answer in answers] == [200] * 13

    with serving(fake, port):
        run(scenario())


def test_encodes_bodies_as_they_came() -> None:
    raw = encode_request(InferenceRequest({"body": b"\x89PNG\x00"}, {}, "r"))
    assert raw.content == b"\x89PNG\x00" and "Content-Type" not in raw.headers
    typed = encode_request(InferenceRequest({"body": b"\x00"}, {"content-type": "image/png"}))
    assert typed.headers["Content-Type"] == "image/png"
    text = encode_request(InferenceRequest({"body": "héllo"}, {}))
    assert text.content == "héllo".encode() and text.headers["Content-Type"].startswith("text/")
    parsed = encode_request(InferenceRequest({"body": [1, 2]}, {}))
    assert parsed.content == b"[1,2]" and parsed.headers["Content-Type"] == "application/json"
    # A v2 request: numpy tensors become JSON lists; v2 wire headers are not forwarded.
    tensor = np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::2]  # not contiguous
    v2 = encode_request(
        InferenceRequest(
            {"body": {"inputs": [{"name": "x", "data": tensor}]}},
            {"content-type": "application/octet-stream", "inference-header-content-length": "9"},
            "r2",
            kserve_v2=True,
        )
    )
    assert orjson.loads(v2.content or b"") == {"inputs": [{"name": "x", "data": [[0, 2], [3, 5]]}]}
    assert v2.headers == {"X-Request-Id": "r2", "Content-Type": "application/json"}
    # TorchServe's gRPC API: inputs are bytes parameters; gRPC metadata is not an HTTP header.
    grpc = encode_request(
        InferenceRequest(
            {"data": b"\x01"},
            {"content-type": "application/grpc", ":authority": "gw", "te": "trailers"},
            "r3",
            API_TORCHSERVE_GRPC,
        )
    )
    assert grpc.headers == {"X-Request-Id": "r3"}
    # Bytes without a content type: a plain field, which TorchServe passes with none either.
    assert grpc.files == [("data", (None, b"\x01", None))]


def test_forwards_multipart_forms(fake: FakeTorchServe, port: int) -> None:
    request = InferenceRequest(
        {"image": b"\x01\x02", "meta": {"a": 1}, "topk": "2", "plain": b"p"},
        {"content-type": "multipart/form-data; boundary=client-boundary"},
        "rid-2",
        input_types={"image": "image/png"},
    )

    async def scenario() -> None:
        async with backend_for(spec(port)) as backend:
            prediction = await backend.forward(request)
        seen = echoed(prediction.body)
        assert "client-boundary" not in seen["headers"]["content-type"]  # re-encoded
        assert seen["form"] == {
            "image": {"filename": "image", "type": "image/png", "data": "\x01\x02"},
            "meta": {"filename": "meta", "type": "application/json", "data": '{"a":1}'},
            "topk": {"text": "2"},
            "plain": {"text": "p"},
        }
        assert seen["query"] == []

    with serving(fake, port):
        run(scenario())


def test_error_status_passes_through_as_the_items_answer(fake: FakeTorchServe, port: int) -> None:
    fake.answer_status = 507

    async def scenario() -> None:
        async with backend_for(spec(port)) as backend:
            prediction = await backend.forward(InferenceRequest({"body": b"x"}, {}, "r"))
        assert prediction.status == 507 and not prediction.ok
        assert orjson.loads(prediction.body)["message"] == "handler says no"  # TorchServe's body
        assert prediction.message == "handler says no"

    with serving(fake, port):
        run(scenario())


def test_v2_answers_are_parsed() -> None:
    response = httpx.Response(
        200, content=b'{"outputs": []}', headers={"content-type": "application/json"}
    )
    assert decode_response(response, v2=True).body == {"outputs": []}
    assert decode_response(response, v2=False).body == b'{"outputs": []}'
    untyped = httpx.Response(200, content=b'{"outputs": []}')  # TorchServe sends dicts so
    assert decode_response(untyped, v2=True).body == {"outputs": []}
    binary = httpx.Response(200, content=b"\x00", headers={"content-type": "image/png"})
    assert decode_response(binary, v2=True).body == b"\x00"


# -- down, timeouts, recovery -------------------------------------------------------------------


def test_down_is_backend_unavailable_and_not_ready(port: int) -> None:
    async def scenario() -> None:
        async with backend_for(spec(port, connect_timeout_s=2.0)) as backend:
            assert backend.unavailable is not None and "unreachable" in backend.unavailable
            assert backend.info["status"] == "UNAVAILABLE"
            with pytest.raises(BackendUnavailable, match=r"TorchServe at http://127\.0\.0\.1"):
                await backend.forward(InferenceRequest({"body": b"x"}, {}, "r"))

    run(scenario())  # nothing listens on `port`


def test_slow_answer_is_deadline_exceeded(fake: FakeTorchServe, port: int) -> None:
    fake.delay_s = 1.0  # orders of magnitude past the read timeout below

    async def scenario() -> None:
        async with backend_for(spec(port, timeout_s=0.01)) as backend:
            with pytest.raises(DeadlineExceeded, match=r"did not answer within 0\.01 s"):
                await backend.forward(InferenceRequest({"body": b"x"}, {}, "r"))

    with serving(fake, port):
        run(scenario())


def test_recovers_without_restart(fake: FakeTorchServe, port: int) -> None:
    """Up, down (refused), model without READY workers, up again: one backend throughout."""
    request = InferenceRequest({"body": b"x"}, {}, "r")

    async def scenario() -> None:
        backend: TorchServeBackend
        async with backend_for(spec(port)) as backend:
            assert backend.unavailable is None
            assert backend.info["torchserve_workers"] == {"ready": 1, "total": 1}
            assert (await backend.forward(request)).status == 200

            await asyncio.to_thread(stack.close)  # TorchServe goes away
            await backend.check()
            assert backend.unavailable is not None and "unreachable" in backend.unavailable
            with pytest.raises(BackendUnavailable):
                await backend.forward(request)

            fake.worker_status = "UNLOADING"
            await asyncio.to_thread(stack.enter_context, serving(fake, port))
            await backend.check()
            assert backend.unavailable is not None and "no READY worker" in backend.unavailable

            fake.worker_status = "READY"
            await backend.check()
            assert backend.unavailable is None
            assert (await backend.forward(request)).status == 200

    with ExitStack() as stack:
        stack.enter_context(serving(fake, port))
        run(scenario())


def test_health_loop_notices_by_itself(fake: FakeTorchServe, port: int) -> None:
    async def wait_for(condition: Any) -> None:
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        async with backend_for(spec(port, health_interval_s=0.02)) as backend:
            assert backend.unavailable is None
            fake.worker_status = None  # unregistered in TorchServe
            await wait_for(lambda: backend.unavailable is not None)
            assert "does not serve it (describe answered 404)" in (backend.unavailable or "")
            fake.worker_status = "READY"
            await wait_for(lambda: backend.unavailable is None)

    with serving(fake, port):
        run(scenario())


# -- the spec -----------------------------------------------------------------------------------


def test_spec_from_url_and_config() -> None:
    from_url = TorchServeSpec.from_url("torchserve://ts:8080/digits/2.0?timeout_s=5&concurrency=4")
    assert from_url.inference_url == "http://ts:8080"
    assert from_url.management_url == "http://ts:8081"  # TorchServe's layout: port + 1
    assert (from_url.model_name, from_url.model_version) == ("digits", "2.0")
    assert (from_url.timeout_s, from_url.concurrency) == (5.0, 4)
    assert from_url.url == "torchserve://ts:8080/digits/2.0"
    assert TorchServeSpec.from_config(from_url.to_json()) == from_url  # snapshot round trip

    tls = TorchServeSpec.from_url("torchserve+https://ts:443/m?management_url=none")
    assert tls.inference_url == "https://ts:443" and tls.management_url is None
    assert tls.model_version is None and tls.url == "torchserve+https://ts:443/m"

    for bad, message in [
        ({"kind": "torchserve"}, "inference_url is required"),
        ({"kind": "torchserve", "inference_url": "ts:8080"}, "must be an http"),
        ({"kind": "tf", "inference_url": "http://ts:8080"}, "kind must be"),
        ({"kind": "torchserve", "inference_url": "http://t:1", "timeout": 1}, "unknown key"),
        ({"kind": "torchserve", "inference_url": "http://t:1", "concurrency": 0}, r"1\.\.1024"),
        # Each slot is a lane and a pooled connection: a url must not ask for millions.
        ({"kind": "torchserve", "inference_url": "http://t:1", "concurrency": 10**6}, "1024"),
    ]:
        with pytest.raises(BadRequest, match=message):
            TorchServeSpec.from_config(bad)
    with pytest.raises(BadRequest, match="torchserve://HOST:PORT/MODEL"):
        TorchServeSpec.from_url("torchserve://ts:8080/")


@asynccontextmanager
async def started(
    tmp_path: Path, models: dict[str, Any], load_models: str = "all", **raw: str
) -> AsyncIterator[Torchgate]:
    """torchgate over `tmp_path`/model_store with config.properties' `models={...}`, started
    (its start-up errors in `startup_errors`), archives on the fake backend."""
    config = parse_config(
        {
            "model_store": str(tmp_path / "model_store"),
            "load_models": load_models,
            "models": orjson.dumps(models).decode(),
            "torchgate.snapshot_file": "",
            "disable_token_authorization": "true",
            **raw,
        },
        base_dir=tmp_path,
    )
    tg = build(config, work_dir=tmp_path / "work", backend_loader=load_fake_backend)
    try:
        await tg.start()
        yield tg
    finally:
        await tg.stop()


def test_a_bad_backend_entry_fails_that_version_only(tmp_path: Path) -> None:
    store = tmp_path / "model_store"
    write_fake_archive(store, "m", "1.0")
    models = {
        "m": {
            "1.0": {"marName": "m-1.0.mar", "defaultVersion": True},
            "2.0": {"torchgate.backend": {"inference_url": "http://ts:8080"}},  # no kind
            "3.0": {"torchgate.backend": {"kind": "torchserve", "inference_url": "ftp://ts:1"}},
        }
    }

    async def scenario() -> None:
        async with started(tmp_path, models) as tg:
            assert [v.version for v in tg.registry.versions("m")] == ["1.0"]
            assert len(tg.startup_errors) == 2
            assert "kind must be" in tg.startup_errors[0]
            assert "must be an http(s) URL" in tg.startup_errors[1]

    run(scenario())


def test_load_models_names_a_proxied_version_by_its_label_and_an_archive_keeps_its_own_backend(
    tmp_path: Path,
) -> None:
    """A proxied version's marName is a label, not a file in the store: load_models naming it
    registers the proxy, with no error for a missing archive. An entry for a proxied version
    that load_models does not ask for still gives its settings to the archive of that name and
    version (TorchServe's rule), but not its TorchServe: that archive is served here."""
    store = tmp_path / "model_store"
    write_fake_archive(store, "m", "1.0")
    write_fake_archive(store, "n", "2.0")
    down = {"kind": "torchserve", "inference_url": "http://127.0.0.1:9", "health_interval_s": 3600}
    models = {
        "m": {"2.0": {"marName": "m-remote.mar", "torchgate.backend": down}},
        "n": {"2.0": {"marName": "n-remote.mar", "batchSize": 3, "torchgate.backend": down}},
    }

    async def scenario() -> None:
        async with started(tmp_path, models, "m-1.0.mar,m-remote.mar,n-2.0.mar") as tg:
            assert tg.startup_errors == []
            assert tg.registry.get("m", "1.0").backend_info["kind"] == "local"
            assert tg.registry.get("m", "2.0").backend_info["kind"] == "torchserve"
            archive = tg.registry.get("n", "2.0")
            assert archive.backend_info["kind"] == "local"
            assert "torchgate.backend" not in archive.backend_info  # a snapshot keeps it local
            assert archive.settings.batch_size == 3

    run(scenario())


# -- in the gateway: registry, management API, health endpoints ---------------------------------


@asynccontextmanager
async def gateway(tmp_path: Path, ts_url: str) -> AsyncIterator[tuple[Torchgate, Any, Any]]:
    """torchgate with model m: 1.0 in-process (fake archive), 2.0 proxied to `ts_url`."""
    store = tmp_path / "model_store"
    write_fake_archive(store, "m", "1.0")
    backend = {
        "kind": "torchserve",
        "inference_url": ts_url,
        "management_url": ts_url,
        "model_name": "digits",
        "health_interval_s": 3600,
    }
    models = {
        "m": {
            "1.0": {"marName": "m-1.0.mar", "defaultVersion": True},
            "2.0": {"responseTimeout": 5, "torchgate.backend": backend},
        }
    }
    # Registrations through the API may aim the gateway at a local TorchServe only.
    allowed = r"torchserve://127\.0\.0\.1:\d+"
    async with started(tmp_path, models, enable_model_api="true", allowed_urls=allowed) as tg:
        assert tg.startup_errors == []
        async with asgi_clients(tg) as (inference, management):
            yield tg, inference, management


def test_gateway_serves_a_torchserve_version_beside_a_local_one(
    fake: FakeTorchServe, port: int, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with gateway(tmp_path, f"http://127.0.0.1:{port}") as (tg, inference, management):
            remote = tg.registry.get("m", "2.0")
            assert remote.backend.batches is False and remote.batcher.max_batch_size == 1
            assert remote.url == f"torchserve://127.0.0.1:{port}/digits/2.0"
            assert len(remote.workers) == 16  # concurrency: the in-flight slots

            answer = await inference.post("/predictions/m/2.0", json=[1, 2])
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-model-version"] == "2.0"
            assert echoed(answer.content)["path"] == "/predictions/digits/2.0"

            described = (await management.get("/models/m/2.0")).json()[0]
            assert described["backend"]["kind"] == "torchserve"
            assert described["backend"]["status"] == "READY"
            assert described["modelUrl"].startswith("torchserve://")

            # TorchServe goes away: 2.0 answers 503 with the reason; 1.0 keeps serving.
            await asyncio.to_thread(stack.close)
            backend = remote.backend
            assert isinstance(backend, TorchServeBackend)
            answer = await inference.post("/predictions/m/2.0", json=[1, 2])
            assert answer.status_code == 502, answer.text  # before the health check notices
            await backend.check()
            answer = await inference.post("/predictions/m/2.0", json=[1, 2])
            assert answer.status_code == 503
            assert "TorchServe at http://127.0.0.1" in answer.json()["message"]
            assert (await inference.post("/predictions/m/1.0", content=b"x")).status_code == 200
            assert (await inference.get("/ping")).status_code == 200  # the default is local
            ready = await inference.get("/v2/models/m/versions/2.0/ready")
            assert ready.status_code != 200
            described = (await management.get("/models/m/2.0")).json()[0]
            assert described["backend"]["status"] == "UNAVAILABLE"

            # Back, on the same port: ready again without restarting the gateway.
            await asyncio.to_thread(stack.enter_context, serving(fake, port))
            await backend.check()
            answer = await inference.post("/predictions/m/2.0", json=[1, 2])
            assert answer.status_code == 200
            assert (await inference.get("/v2/models/m/versions/2.0/ready")).status_code == 200

            # A/B across the two hosts.
            policy = {"weights": {"1.0": 50, "2.0": 50}, "sticky_header": None}
            assert (await management.put("/models/m/traffic", json=policy)).status_code == 200
            versions = set()
            for _ in range(40):
                answer = await inference.post("/predictions/m", content=b"x")
                assert answer.status_code == 200
                versions.add(answer.headers["x-model-version"])
            assert versions == {"1.0", "2.0"}  # each misses 40 times with p = 2**-40

    with ExitStack() as stack:
        stack.enter_context(serving(fake, port))
        run(scenario())


def test_register_through_the_management_api(
    fake: FakeTorchServe, port: int, tmp_path: Path
) -> None:
    base = f"http://127.0.0.1:{port}"

    async def scenario() -> None:
        async with gateway(tmp_path, base) as (_, inference, management):
            url = f"torchserve://127.0.0.1:{port}/digits?management_url={base}&concurrency=2"
            answer = await management.post("/models", params={"url": url, "model_name": "d"})
            assert answer.status_code == 200, answer.text
            assert (
                answer.json()["status"]
                == 'Model "d" Version: 2.0 registered with 2 initial workers'
            )
            described = (await management.get("/models/d/2.0")).json()[0]
            assert described["backend"]["torchgate.backend"]["concurrency"] == 2
            answer = await inference.post("/predictions/d", content=b"x")
            assert answer.status_code == 200
            # Its workers are in-flight slots, bounded all the same: a scale to a million
            # would have run a million slot starts under the registry's lock.
            scaled = await management.put("/models/d/2.0", params={"min_worker": 10**6})
            assert scaled.status_code == 400
            assert "requests in flight to one TorchServe" in scaled.json()["message"]
            assert (await management.delete("/models/d/2.0")).status_code == 200

            refused = await management.post(
                "/models", params={"url": "torchserve://127.0.0.1:1/m?management_url=none"}
            )
            assert refused.status_code == 400  # no version, and no management API to ask

    with serving(fake, port):
        run(scenario())


def test_registers_while_torchserve_is_down_and_becomes_ready(
    fake: FakeTorchServe, port: int, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with gateway(tmp_path, f"http://127.0.0.1:{port}") as (tg, inference, _):
            remote = tg.registry.get("m", "2.0")
            assert not remote.ready  # registered all the same: the gateway started
            answer = await inference.post("/predictions/m/2.0", content=b"x")
            assert answer.status_code == 503
            assert (await inference.post("/predictions/m/1.0", content=b"x")).status_code == 200
            with serving(fake, port):
                backend = remote.backend
                assert isinstance(backend, TorchServeBackend)
                await backend.check()
                assert remote.ready
                answer = await inference.post("/predictions/m/2.0", content=b"x")
                assert answer.status_code == 200

    run(scenario())


def test_snapshot_restores_a_torchserve_version(
    fake: FakeTorchServe, port: int, tmp_path: Path
) -> None:
    from api.snapshot import capture, restore

    async def scenario() -> None:
        async with gateway(tmp_path, f"http://127.0.0.1:{port}") as (tg, _, _):
            assert tg.router is not None
            saved = capture(tg.registry, tg.router)
            original = tg.registry.get("m", "2.0").backend
            assert isinstance(original, TorchServeBackend)
        entry = saved["models"]["m"]["2.0"]
        assert entry["marName"] == f"torchserve://127.0.0.1:{port}/digits/2.0"
        assert entry["torchgate.backend"]["model_name"] == "digits"
        assert "status" not in entry  # live health is not state

        config = parse_config(
            {"model_store": str(tmp_path / "model_store"), "torchgate.snapshot_file": ""},
            base_dir=tmp_path,
        )
        again = build(config, work_dir=tmp_path / "again", backend_loader=load_fake_backend)
        assert again.router is not None
        try:
            assert await restore(saved, again.loader, again.router) == []
            restored = again.registry.get("m", "2.0")
            assert isinstance(restored.backend, TorchServeBackend)
            assert restored.backend.spec == original.spec
            assert restored.ready and again.registry.default_version("m") == "1.0"
        finally:
            await again.stop()

    with serving(fake, port):
        run(scenario())


def test_a_torchserve_with_token_authorization_gets_its_keys_from_key_file(
    fake: FakeTorchServe, port: int, tmp_path: Path
) -> None:
    """TorchServe 0.12 turns token authorization on by default: without its keys the version
    is not ready and says why; with `key_file`, predictions carry the inference key, the
    health check the management key, and keys TorchServe regenerates are picked up."""
    fake.keys = {"inference": "i-1", "management": "m-1"}
    key_file = tmp_path / "key_file.json"

    def write_keys() -> None:
        assert fake.keys is not None
        document = {kind: {"key": key} for kind, key in fake.keys.items()}
        key_file.write_bytes(orjson.dumps({**document, "API": {"key": "a"}}))

    write_keys()

    async def scenario() -> None:
        async with backend_for(spec(port)) as backend:
            assert backend.unavailable is not None and "refused the key" in backend.unavailable
        async with backend_for(spec(port, key_file="/dev/zero")) as backend:  # read bounded
            assert backend.unavailable is not None and "larger than" in backend.unavailable
        async with backend_for(spec(port, key_file=str(key_file))) as backend:
            assert backend.unavailable is None
            answer = await backend.forward(InferenceRequest({"body": b"x"}, {}, "r"))
            assert answer.status == 200
            assert echoed(answer.body)["headers"]["authorization"] == "Bearer i-1"
            fake.keys = {"inference": "i-2", "management": "m-2"}  # TorchServe's /token
            write_keys()
            await backend.check()
            assert backend.unavailable is None
            answer = await backend.forward(InferenceRequest({"body": b"x"}, {}, "r"))
            assert echoed(answer.body)["headers"]["authorization"] == "Bearer i-2"

    with serving(fake, port):
        run(scenario())


def test_a_kserve_v1_explain_goes_to_explanations(fake: FakeTorchServe, port: int) -> None:
    request = InferenceRequest({"body": b"x"}, {"explain": "True"}, "r", API_V1_REST)

    async def scenario() -> None:
        async with backend_for(spec(port)) as backend:
            seen = echoed((await backend.forward(request)).body)
        assert seen["path"] == "/explanations/digits/2.0"

    with serving(fake, port):
        run(scenario())


def test_a_grpc_request_with_several_inputs_sends_them_all() -> None:
    """TorchServe's gRPC API hands every `input` entry to the handler; its `/predictions`
    drops query parameters, so they go as multipart fields, with the body."""
    request = InferenceRequest(
        {"body": b"a", "x": b"1", "op": b"add"}, {}, "r", API_TORCHSERVE_GRPC
    )
    raw = encode_request(request)
    assert raw.params == []
    assert raw.files is not None and sorted(part[0] for part in raw.files) == ["body", "op", "x"]
