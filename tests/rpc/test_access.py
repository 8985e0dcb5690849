"""`AccessInterceptor`: a line in access_log.log for every gRPC call, with the status code the
client got, on a real grpc.aio server on a free port: unary and streaming methods, an abort, a
code set without one, an exception (UNKNOWN), a call cancelled by its deadline (CANCELLED), and
calls refused by the token check before the servicer ran (streaming ones included)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import empty_pb2

from api.auth import INFERENCE, TokenAuth
from api.observability.access_lines import AccessLines
from api.rpc.access import AccessInterceptor
from api.rpc.generated import inference_pb2 as inference
from api.rpc.generated import inference_pb2_grpc as inference_grpc
from api.rpc.server import TokenInterceptor
from tests.support.aio import run

SERVICE = "org.pytorch.serve.grpc.inference.InferenceAPIsService"
LINE = re.compile(
    r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d,\d{3} - /127\.0\.0\.1:\d+ "gRPC (\S+) HTTP/2\.0" (\d+) \d+$'
)


class Servicer(inference_grpc.InferenceAPIsServiceServicer):
    """Does what the model name says."""

    async def Ping(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return inference.TorchServeHealthResponse(health="ok")

    async def Predictions(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        match request.model_name:
            case "abort":
                await context.abort(grpc.StatusCode.NOT_FOUND, "no such model")
            case "raise":
                raise ValueError("a servicer bug")
            case "set-code":
                context.set_code(grpc.StatusCode.INTERNAL)
            case "slow":
                await asyncio.sleep(30)
        return inference.PredictionResponse(prediction=b"ok")

    async def StreamPredictions(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        yield inference.PredictionResponse(prediction=b"1")
        if request.model_name == "abort":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "gone")
        yield inference.PredictionResponse(prediction=b"2")

    async def StreamPredictions2(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async for request in requests:
            yield inference.PredictionResponse(prediction=request.model_name.encode())


async def _calls(tmp_path: Path, auth: TokenAuth | None) -> list[tuple[str, str]]:
    lines = AccessLines(tmp_path)
    interceptors: list[grpc.aio.ServerInterceptor] = [AccessInterceptor(lines)]
    if auth is not None:
        interceptors.append(TokenInterceptor(auth, INFERENCE, lambda: None))
    server = grpc.aio.server(interceptors=interceptors)
    inference_grpc.add_InferenceAPIsServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_grpc.InferenceAPIsServiceStub(channel)
            await stub.Ping(empty_pb2.Empty())
            for name in ("ok", "abort", "raise", "set-code", "slow"):
                call = stub.Predictions(inference.PredictionsRequest(model_name=name), timeout=0.5)
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await call
            for name in ("ok", "abort"):
                stream = stub.StreamPredictions(inference.PredictionsRequest(model_name=name))
                with contextlib.suppress(grpc.aio.AioRpcError):
                    _ = [answer async for answer in stream]
            requests = [inference.PredictionsRequest(model_name=n) for n in ("a", "b")]
            with contextlib.suppress(grpc.aio.AioRpcError):
                _ = [answer async for answer in stub.StreamPredictions2(iter(requests))]
        await asyncio.sleep(0.2)  # the cancelled call's line is written as its task ends
    finally:
        await server.stop(0)
        lines.close()
    found = [LINE.match(line) for line in (tmp_path / "access_log.log").read_text().splitlines()]
    assert all(found), (tmp_path / "access_log.log").read_text()
    return [(m[1].removeprefix(f"{SERVICE}/"), m[2]) for m in found if m is not None]


def test_each_call_is_logged_with_the_code_its_client_got(tmp_path: Path) -> None:
    # Sorted: the line of the call its deadline cancelled comes when the server notices.
    assert sorted(run(_calls(tmp_path, None))) == sorted(
        [
            ("Ping", "0"),
            ("Predictions", "0"),
            ("Predictions", "5"),  # aborted NOT_FOUND
            ("Predictions", "2"),  # an exception: UNKNOWN, as grpc answers it
            ("Predictions", "13"),  # set_code(INTERNAL) without an abort
            ("Predictions", "1"),  # cancelled under it when its deadline passed
            ("StreamPredictions", "0"),
            ("StreamPredictions", "14"),  # aborted UNAVAILABLE after a message
            ("StreamPredictions2", "0"),
        ]
    )


def test_calls_refused_by_the_token_check_are_logged(tmp_path: Path) -> None:
    auth = TokenAuth(tmp_path / "key_file.json")
    codes = dict(run(_calls(tmp_path, auth)))  # no key sent: every call but Ping refused
    assert codes["Ping"] == "0"
    unauthenticated = str(grpc.StatusCode.UNAUTHENTICATED.value[0])
    assert codes["Predictions"] == codes["StreamPredictions"] == unauthenticated
    assert codes["StreamPredictions2"] == unauthenticated  # a streaming method's refusal
