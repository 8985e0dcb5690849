"""TorchServe's gRPC inference and management APIs, on a real grpc.aio server on free ports.

torchgate is built by `api.app.build` with fake archives (JSON files standing in for `.mar`s)
and an echo backend, so the loader, registry, dataplane, interceptor and servicers are the real
ones. Clients are the generated `*_pb2_grpc` stubs, as a TorchServe user's would be.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import empty_pb2

from api.app import Torchgate
from api.auth import INFERENCE, MANAGEMENT
from api.core.types import InferenceRequest, ModelSettings, Prediction
from api.rpc.generated import inference_pb2 as inference
from api.rpc.generated import inference_pb2_grpc as inference_grpc
from api.rpc.generated import management_pb2 as management
from api.rpc.generated import management_pb2_grpc as management_grpc
from tests.support.aio import expect_grpc_error as expect_error
from tests.support.aio import run
from tests.support.fake_backend import write_fake_archive
from tests.support.inprocess import started_torchgate

Code = grpc.StatusCode


class EchoWorker:
    """Answers with what the handler received; input "fail" fails that item with status 400,
    input "crash" raises (the whole batch fails)."""

    device = "cpu"

    def __init__(self, backend: EchoBackend) -> None:
        self.backend = backend

    async def predict(self, batch: Sequence[InferenceRequest]) -> list[Prediction]:
        backend = self.backend
        backend.batches_seen += 1
        if backend.gate is not None:
            await backend.gate.wait()
        if any("crash" in r.inputs for r in batch):
            raise RuntimeError("the handler raised")
        return [self._answer(r) for r in batch]

    def _answer(self, request: InferenceRequest) -> Prediction:
        if "fail" in request.inputs:
            return Prediction(
                {"code": 400, "type": "BadRequest", "message": "bad pixels"},
                status=400,
                message="bad pixels",
            )
        return Prediction(
            {
                "version": self.backend.version,
                "inputs": {k: [type(v).__name__, v.decode()] for k, v in request.inputs.items()},
                "request_id": request.request_id,
                "api": request.api,
                "sticky": request.headers.get("x-sticky"),
            }
        )

    async def close(self) -> None:
        pass


class EchoBackend:
    batches = True
    signature: Mapping[str, Any] | None = None

    def __init__(self, name: str, version: str) -> None:
        self.version = version
        self.manifest: Mapping[str, Any] = {"model": {"modelName": name, "modelVersion": version}}
        self.gate: asyncio.Event | None = None
        self.batches_seen = 0

    async def start_worker(self, index: int) -> EchoWorker:
        return EchoWorker(self)

    async def close(self) -> None:
        pass


async def load_echo_backend(path: Path, settings: ModelSettings, work_dir: Path) -> EchoBackend:
    model = json.loads(path.read_text())["model"]
    return EchoBackend(model["modelName"], model["modelVersion"])


@dataclass
class Client:
    tg: Torchgate
    inference: inference_grpc.InferenceAPIsServiceStub
    management: management_grpc.ManagementAPIsServiceStub
    rest_management: httpx.AsyncClient

    def backend(self, version: str = "1.0", model: str = "m") -> EchoBackend:
        backend = self.tg.registry.get(model, version).backend
        assert isinstance(backend, EchoBackend)
        return backend


@asynccontextmanager
async def serving(tmp_path: Path, **config: str) -> AsyncIterator[Client]:
    """torchgate with model "m" 1.0 (default) and 2.0 loaded, "n" 1.0 in the store only."""
    store = tmp_path / "model_store"
    write_fake_archive(store, "m", "1.0")
    write_fake_archive(store, "m", "2.0")
    write_fake_archive(store, "n", "1.0")
    config = {"model_store": str(store), "load_models": "m-1.0.mar,m-2.0.mar", **config}
    async with started_torchgate(tmp_path, config, load_echo_backend, grpc=True) as run:
        inference_channel = grpc.aio.insecure_channel(f"127.0.0.1:{run.grpc_inference_port}")
        management_channel = grpc.aio.insecure_channel(f"127.0.0.1:{run.grpc_management_port}")
        rest = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=run.tg.management_app),
            base_url="http://localhost",
        )
        try:
            yield Client(
                run.tg,
                inference_grpc.InferenceAPIsServiceStub(inference_channel),
                management_grpc.ManagementAPIsServiceStub(management_channel),
                rest,
            )
        finally:
            await rest.aclose()
            await inference_channel.close()
            await management_channel.close()


def predictions_request(
    model: str = "m", version: str = "", **inputs: bytes
) -> inference.PredictionsRequest:
    return inference.PredictionsRequest(
        model_name=model, model_version=version, input=inputs or {"data": b"[1, 2]"}
    )


# -- inference ----------------------------------------------------------------------------------


def test_ping_answers_torchserve_health_json(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            response = await client.inference.Ping(empty_pb2.Empty())
            assert response.health == '{\n  "status": "Healthy"\n}'  # TorchServe's own text
            client.tg.dataplane.accepting = False
            response = await client.inference.Ping(empty_pb2.Empty())
            assert json.loads(response.health) == {"status": "Unhealthy"}

    run(scenario())


def test_predictions_pass_inputs_as_bytes_and_answer_the_routed_version(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            response = await client.inference.Predictions(
                predictions_request(data=b"[1, 2]", topk=b"3"),
                metadata=(("x-request-id", "abc-123"), ("x-sticky", "user-7")),
            )
            answer = json.loads(response.prediction)
            assert answer == {
                "version": "1.0",  # empty model_version: the default
                "inputs": {"data": ["bytes", "[1, 2]"], "topk": ["bytes", "3"]},
                "request_id": "abc-123",
                "api": "torchserve-grpc",
                "sticky": "user-7",  # metadata reaches routing and the handler as headers
            }
            response = await client.inference.Predictions(predictions_request(version="2.0"))
            answer = json.loads(response.prediction)
            assert answer["version"] == "2.0"
            assert len(answer["request_id"]) == 36  # generated when the client sends none: a uuid4

    run(scenario())


def test_predictions_errors_map_through_the_error_table(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            predict = client.inference.Predictions
            details = await expect_error(predict(predictions_request("nope")), Code.NOT_FOUND)
            assert details == "Model not found: nope"
            await expect_error(predict(predictions_request(version="9.9")), Code.NOT_FOUND)
            await expect_error(predict(predictions_request("")), Code.INVALID_ARGUMENT)
            # A handler's per-item status 400 fails the call, with the handler's message.
            details = await expect_error(
                predict(predictions_request(fail=b"1")), Code.INVALID_ARGUMENT
            )
            assert details == "bad pixels"
            details = await expect_error(predict(predictions_request(crash=b"1")), Code.INTERNAL)
            assert "the handler raised" in details

    run(scenario())


def test_the_call_request_id_comes_back_in_trailing_metadata(tmp_path: Path) -> None:
    """As REST answers with `X-Request-Id`: the client's, or the new one the handler and the
    logs saw, failed calls too, beside a refusal's `retry-after`."""

    async def scenario() -> None:
        async with serving(tmp_path) as client:
            call = client.inference.Predictions(
                predictions_request(), metadata=(("x-request-id", "abc-123"),)
            )
            await call
            assert ("x-request-id", "abc-123") in tuple(await call.trailing_metadata())
            call = client.inference.Predictions(predictions_request())
            handlers = json.loads((await call).prediction)["request_id"]
            assert ("x-request-id", handlers) in tuple(await call.trailing_metadata())
            call = client.inference.Predictions(
                predictions_request("nope"), metadata=(("x-request-id", "lost-1"),)
            )
            await expect_error(call, Code.NOT_FOUND)
            assert ("x-request-id", "lost-1") in tuple(await call.trailing_metadata())
            streamed = client.inference.StreamPredictions(
                predictions_request(), metadata=(("x-request-id", "s-1"),)
            )
            assert len([message async for message in streamed]) == 1
            assert ("x-request-id", "s-1") in tuple(await streamed.trailing_metadata())
            # No live worker: UNAVAILABLE, retry-after beside the id.
            await client.rest_management.put("/models/m/1.0?min_worker=0&synchronous=true")
            call = client.inference.Predictions(
                predictions_request(), metadata=(("x-request-id", "busy-1"),)
            )
            await expect_error(call, Code.UNAVAILABLE)
            trailing = tuple(await call.trailing_metadata())
            assert ("x-request-id", "busy-1") in trailing
            assert ("retry-after", "1") in trailing

    run(scenario())


def test_stream_predictions_sends_one_message_per_request(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            responses = [r async for r in client.inference.StreamPredictions(predictions_request())]
            assert [json.loads(r.prediction)["version"] for r in responses] == ["1.0"]
            stream = client.inference.StreamPredictions(predictions_request("nope"))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                _ = [r async for r in stream]
            assert info.value.code() == Code.NOT_FOUND

    run(scenario())


def test_stream_predictions2_answers_each_message_and_survives_bad_ones(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:

            async def requests() -> AsyncIterator[inference.PredictionsRequest]:
                yield inference.PredictionsRequest(
                    model_name="m", input={"data": b"1"}, sequence_id="s1"
                )
                yield inference.PredictionsRequest(model_name="m", input={"data": b"2"})
                yield inference.PredictionsRequest(
                    model_name="nope", input={"data": b"3"}, sequence_id="s1"
                )
                yield inference.PredictionsRequest(
                    model_name="m", model_version="2.0", input={"data": b"4"}, sequence_id="s1"
                )

            responses = [r async for r in client.inference.StreamPredictions2(requests())]
            assert len(responses) == 4
            first, no_sequence, unknown, last = responses
            assert json.loads(first.prediction)["inputs"]["data"] == ["bytes", "1"]
            assert not first.HasField("status")
            # As TorchServe 0.12: answers carry no sequence_id, and a message must name one.
            assert not any(r.HasField("sequence_id") for r in responses)
            assert no_sequence.status.code == Code.INVALID_ARGUMENT.value[0]
            assert no_sequence.status.message == "Parameter sequenceId is required."
            assert unknown.status.code == Code.NOT_FOUND.value[0]
            assert json.loads(last.prediction)["version"] == "2.0"

    run(scenario())


def test_each_message_of_a_stream_has_its_own_request_id(tmp_path: Path) -> None:
    """A stream's metadata is the whole call's: its x-request-id names the call, and each
    message gets its own id, as TorchServe gives one (handlers key their state on it)."""

    async def scenario() -> None:
        async with serving(tmp_path) as client:
            messages = [
                inference.PredictionsRequest(model_name="m", input={"data": b"1"}, sequence_id="s")
                for _ in range(2)
            ]
            call = client.inference.StreamPredictions2(
                iter(messages), metadata=(("x-request-id", "the-call"),)
            )
            ids = [json.loads(r.prediction)["request_id"] async for r in call]
            assert len(set(ids)) == 2 and "the-call" not in ids
            unary = await client.inference.Predictions(
                predictions_request(), metadata=(("x-request-id", "the-call"),)
            )
            assert json.loads(unary.prediction)["request_id"] == "the-call"

    run(scenario())


def test_cancelled_call_is_never_run(tmp_path: Path) -> None:
    """grpc.aio cancels the servicer coroutine; that cancels the queued batcher future."""

    async def scenario() -> None:
        async with serving(tmp_path) as client:
            backend = client.backend()
            backend.gate = asyncio.Event()
            running = client.inference.Predictions(predictions_request(data=b"first"))
            batcher = client.tg.registry.get("m").batcher
            await wait_for(lambda: backend.batches_seen == 1)  # the worker holds it at the gate
            queued = client.inference.Predictions(predictions_request(data=b"second"))
            await wait_for(lambda: batcher.depth == 1)
            queued.cancel()
            await wait_for(lambda: batcher._queue[0].future.cancelled())
            backend.gate.set()
            assert json.loads((await running).prediction)["inputs"]["data"][1] == "first"
            third = await client.inference.Predictions(predictions_request(data=b"third"))
            assert json.loads(third.prediction)["inputs"]["data"][1] == "third"
            assert backend.batches_seen == 2  # first, third: the cancelled one never ran

    run(scenario())


async def wait_for(condition: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


# -- management ---------------------------------------------------------------------------------


def test_describe_and_list_answer_the_rest_documents(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            describe, rest = client.management.DescribeModel, client.rest_management
            for version, path in (
                ("", "/models/m"),
                ("2.0", "/models/m/2.0"),
                ("all", "/models/m/all"),
            ):
                response = await describe(
                    management.DescribeModelRequest(model_name="m", model_version=version)
                )
                assert json.loads(response.msg) == (await rest.get(path)).json()
            await expect_error(
                describe(management.DescribeModelRequest(model_name="nope")), Code.NOT_FOUND
            )
            await expect_error(
                describe(management.DescribeModelRequest(model_name="m", model_version="9.9")),
                Code.NOT_FOUND,
            )
            response = await client.management.ListModels(management.ListModelsRequest())
            assert json.loads(response.msg) == (await rest.get("/models")).json()
            assert [m["modelName"] for m in json.loads(response.msg)["models"]] == ["m"]

    run(scenario())


def test_scale_and_set_default(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            scale, set_default = client.management.ScaleWorker, client.management.SetDefault
            response = await scale(
                management.ScaleWorkerRequest(
                    model_name="m", model_version="2.0", min_worker=2, synchronous=True
                )
            )
            assert response.msg == "Workers scaled to 2 for model: m, version: 2.0"
            assert len(client.tg.registry.get("m", "2.0").workers) == 2
            # Unset min_worker means 1, as in TorchServe; asynchronous answers TorchServe's text.
            response = await scale(
                management.ScaleWorkerRequest(model_name="m", model_version="2.0")
            )
            assert response.msg == "Processing worker updates..."
            assert len(client.tg.registry.get("m", "2.0").workers) == 1
            await expect_error(
                scale(management.ScaleWorkerRequest(model_name="nope")), Code.NOT_FOUND
            )
            # Below 1 means the default on gRPC, as TorchServe's getRegisterParam reads it
            # (REST refuses min_worker=-1 with 400, where TorchServe fails 500).
            response = await scale(
                management.ScaleWorkerRequest(
                    model_name="m",
                    model_version="2.0",
                    min_worker=-1,
                    max_worker=-1,
                    synchronous=True,
                )
            )
            assert response.msg == "Workers scaled to 1 for model: m, version: 2.0"

            response = await set_default(
                management.SetDefaultRequest(model_name="m", model_version="2.0")
            )
            assert response.msg == 'Default version successfully updated for model "m" to "2.0"'
            answer = await client.inference.Predictions(predictions_request())
            assert json.loads(answer.prediction)["version"] == "2.0"
            await expect_error(
                set_default(management.SetDefaultRequest(model_name="m", model_version="9.9")),
                Code.NOT_FOUND,
            )
            await expect_error(
                set_default(management.SetDefaultRequest(model_name="nope", model_version="1.0")),
                Code.NOT_FOUND,
            )

    run(scenario())


def test_register_and_unregister(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(
            tmp_path, enable_model_api="true", default_workers_per_model="3"
        ) as client:
            register = client.management.RegisterModel
            unregister = client.management.UnregisterModel
            response = await register(
                management.RegisterModelRequest(
                    url="n-1.0.mar", batch_size=4, initial_workers=2, synchronous=True
                )
            )
            assert response.msg == 'Model "n" Version: 1.0 registered with 2 initial workers'
            assert client.tg.registry.get("n").settings.batch_size == 4
            await expect_error(
                register(management.RegisterModelRequest(url="n-1.0.mar")), Code.FAILED_PRECONDITION
            )
            await expect_error(
                register(management.RegisterModelRequest(url="missing.mar")), Code.NOT_FOUND
            )
            await expect_error(
                register(management.RegisterModelRequest(url="https://example.com/x.mar")),
                Code.INVALID_ARGUMENT,
            )
            await expect_error(register(management.RegisterModelRequest()), Code.INVALID_ARGUMENT)

            response = await unregister(management.UnregisterModelRequest(model_name="n"))
            assert response.msg == 'Model "n" unregistered'
            # initial_workers below 1 means default_workers_per_model, as TorchServe's gRPC
            # reads it (it started none).
            response = await register(
                management.RegisterModelRequest(
                    url="n-1.0.mar", initial_workers=-1, synchronous=True
                )
            )
            assert response.msg == 'Model "n" Version: 1.0 registered with 3 initial workers'
            response = await unregister(management.UnregisterModelRequest(model_name="n"))
            await expect_error(
                client.management.DescribeModel(management.DescribeModelRequest(model_name="n")),
                Code.NOT_FOUND,
            )
            # The default version of a model with other versions stays (as in TorchServe).
            await expect_error(
                unregister(management.UnregisterModelRequest(model_name="m")),
                Code.PERMISSION_DENIED,
            )
            response = await unregister(
                management.UnregisterModelRequest(model_name="m", model_version="2.0")
            )
            assert response.msg == 'Model "m" unregistered'
            await expect_error(
                unregister(management.UnregisterModelRequest(model_name="nope")), Code.NOT_FOUND
            )

    run(scenario())


def test_model_api_disabled_is_permission_denied(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:  # enable_model_api defaults to false
            details = await expect_error(
                client.management.RegisterModel(management.RegisterModelRequest(url="n-1.0.mar")),
                Code.PERMISSION_DENIED,
            )
            assert "enable_model_api" in details
            await expect_error(
                client.management.UnregisterModel(
                    management.UnregisterModelRequest(model_name="m", model_version="2.0")
                ),
                Code.PERMISSION_DENIED,
            )
            assert [v.version for v in client.tg.registry.versions("m")] == ["1.0", "2.0"]
            # REST answers 405 for the same refusal, as TorchServe's REST API does.
            assert (await client.rest_management.delete("/models/m/2.0")).status_code == 405

    run(scenario())


# -- transport limits ---------------------------------------------------------------------------


def test_token_authorization(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(
            tmp_path,
            disable_token_authorization="false",
            **{"torchgate.key_file": str(tmp_path / "key_file.json")},
        ) as client:
            assert client.tg.auth is not None
            keys = {kind: client.tg.auth.key(kind) for kind in (INFERENCE, MANAGEMENT)}

            def bearer(key: str) -> tuple[tuple[str, str], ...]:
                return (("authorization", f"Bearer {key}"),)

            predict, list_models = client.inference.Predictions, client.management.ListModels
            await client.inference.Ping(empty_pb2.Empty())  # open, as /ping on REST
            await expect_error(predict(predictions_request()), Code.UNAUTHENTICATED)
            await expect_error(
                predict(predictions_request(), metadata=bearer("wrong")), Code.UNAUTHENTICATED
            )
            await expect_error(
                predict(predictions_request(), metadata=bearer(keys[MANAGEMENT])),
                Code.UNAUTHENTICATED,
            )
            await predict(predictions_request(), metadata=bearer(keys[INFERENCE]))
            await expect_error(list_models(management.ListModelsRequest()), Code.UNAUTHENTICATED)
            await expect_error(
                list_models(management.ListModelsRequest(), metadata=bearer(keys[INFERENCE])),
                Code.UNAUTHENTICATED,
            )
            await list_models(management.ListModelsRequest(), metadata=bearer(keys[MANAGEMENT]))
            # A refusal names the call as every answer does: the client's id, else a new one.
            refused = predict(predictions_request(), metadata=(("x-request-id", "refused-1"),))
            await expect_error(refused, Code.UNAUTHENTICATED)
            assert ("x-request-id", "refused-1") in tuple(await refused.trailing_metadata())
            stream = client.inference.StreamPredictions2(iter([predictions_request()]))
            await expect_error(stream.read(), Code.UNAUTHENTICATED)
            assert "x-request-id" in dict(await stream.trailing_metadata())

    run(scenario())


def test_oversized_message_is_resource_exhausted(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path, max_request_size="4096") as client:
            await client.inference.Predictions(predictions_request(data=b"x" * 1024))
            await expect_error(
                client.inference.Predictions(predictions_request(data=b"x" * 8192)),
                Code.RESOURCE_EXHAUSTED,
            )

    run(scenario())


@pytest.mark.parametrize(
    ("port", "method"),
    [
        ("inference", "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions"),
        ("inference", "/org.pytorch.serve.grpc.inference.InferenceAPIsService/StreamPredictions"),
        ("management", "/org.pytorch.serve.grpc.management.ManagementAPIsService/ListModels"),
    ],
)
def test_malformed_message_bytes_are_invalid_argument(
    tmp_path: Path, port: str, method: str
) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            grpc_port = getattr(client.tg.config, f"grpc_{port}_port")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                call = channel.unary_unary(method)(
                    b"\x0a\x7fabc",  # a string field cut short
                    metadata=(("x-request-id", "malformed-1"),),
                )
                details = await expect_error(call, Code.INVALID_ARGUMENT)
                assert ("x-request-id", "malformed-1") in tuple(await call.trailing_metadata())
            assert details.startswith(
                f"malformed request: the message bytes do not parse as {method}"
            )
            assert "DecodeError" not in details and "<class" not in details
            # Nothing is broken for the next caller.
            answer = await client.inference.Predictions(predictions_request())
            assert json.loads(answer.prediction)["version"] == "1.0"

    run(scenario())
