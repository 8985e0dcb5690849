"""KServe v2 `inference.GRPCInferenceService` on a real grpc.aio server on free ports.

torchgate is built by `api.app.build` with the fake archives and tensor-doubling backend of
`tests/rest/test_v2.py` (model "m" 1.0/2.0 with a signature: input "x" FP32 [-1, 2], outputs
"y" = 2x and "total"; model "plain" without one), so loader, registry, dataplane, bridge,
interceptor and servicer are the real ones. The client is the generated stub.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest

import api.core.registry as registry_module
import api.rpc.kserve as kserve_module
from api.app import Torchgate
from api.core.types import API_V2_GRPC, ModelSettings
from api.rpc.generated import grpc_predict_v2_pb2 as pb
from api.rpc.generated import grpc_predict_v2_pb2_grpc as pb_grpc
from api.v2.bridge import DECODE_IN_THREAD_BYTES
from api.v2.codec import decode_grpc
from tests.support.aio import expect_grpc_error as expect_error
from tests.support.aio import run
from tests.support.inprocess import started_torchgate
from tests.support.tensor_backend import (
    SIGNATURE,
    TensorBackend,
    load_tensor_backend,
    write_archive,
)

T = TypeVar("T")
Code = grpc.StatusCode
FINAL = "triton_final_response"
MAX_REQUEST_SIZE = 4096


@dataclass
class Client:
    tg: Torchgate
    stub: pb_grpc.GRPCInferenceServiceStub
    channel: grpc.aio.Channel

    def backend(self, model: str = "m", version: str = "1.0") -> TensorBackend:
        backend = self.tg.registry.get(model, version).backend
        assert isinstance(backend, TensorBackend)
        return backend


@asynccontextmanager
async def serving(tmp_path: Path, **config: str) -> AsyncIterator[Client]:
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
    async with started_torchgate(tmp_path, config, load_tensor_backend, grpc=True) as run:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{run.grpc_inference_port}")
        try:
            yield Client(run.tg, pb_grpc.GRPCInferenceServiceStub(channel), channel)
        finally:
            await channel.close()


def infer_request(
    rows: Any = ((1.0, 2.0),),
    *,
    model: str = "m",
    version: str = "",
    datatype: str = "FP32",
    name: str = "x",
    raw: bool = True,
    outputs: tuple[str, ...] = (),
    answer: str | None = None,
) -> pb.ModelInferRequest:
    """Rows as one input, in `raw_input_contents` or as typed contents."""
    array = np.asarray(rows, np.float32 if datatype == "FP32" else np.int32)
    request = pb.ModelInferRequest(model_name=model, model_version=version, id="req-7")
    tensor = request.inputs.add(name=name, datatype=datatype, shape=array.shape)
    if raw:
        request.raw_input_contents.append(array.tobytes())
    elif datatype == "FP32":
        tensor.contents.fp32_contents.extend(array.ravel().tolist())
    else:
        tensor.contents.int_contents.extend(int(value) for value in array.ravel())
    for output in outputs:
        request.outputs.add(name=output)
    if answer is not None:
        request.parameters["answer"].string_param = answer
    return request


def outputs_of(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    assert len(response.raw_output_contents) == len(response.outputs)
    arrays = {}
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if output.datatype == "BYTES":
            arrays[output.name] = np.array([raw[4:]], dtype=object)  # one element
        else:
            dtype = {"FP32": np.float32, "FP64": np.float64}[output.datatype]
            arrays[output.name] = np.frombuffer(raw, dtype).reshape(tuple(output.shape))
    return arrays


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `condition` until it holds; fail the test past `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


# -- health and metadata ---------------------------------------------------------------------


def test_health_and_server_metadata(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            stub = client.stub
            assert (await stub.ServerLive(pb.ServerLiveRequest())).live
            assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
            metadata = await stub.ServerMetadata(pb.ServerMetadataRequest())
            assert (metadata.name, metadata.version) == ("torchgate", "0.1.0")
            assert list(metadata.extensions) == ["binary_tensor_data"]
            client.tg.dataplane.accepting = False
            assert not (await stub.ServerReady(pb.ServerReadyRequest())).ready
            assert (await stub.ServerLive(pb.ServerLiveRequest())).live

    run(scenario())


def test_model_readiness_and_metadata(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            stub = client.stub
            assert (await stub.ModelReady(pb.ModelReadyRequest(name="m"))).ready
            assert (await stub.ModelReady(pb.ModelReadyRequest(name="m", version="2.0"))).ready
            details = await expect_error(
                stub.ModelReady(pb.ModelReadyRequest(name="nope")), Code.NOT_FOUND
            )
            assert details == "Model not found: nope"
            await expect_error(
                stub.ModelReady(pb.ModelReadyRequest(name="m", version="9")), Code.NOT_FOUND
            )
            metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name="m"))
            assert (metadata.name, list(metadata.versions)) == ("m", ["1.0", "2.0"])
            assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
                ("x", "FP32", [-1, 2])
            ]
            assert [t.name for t in metadata.outputs] == ["y", "total"]
            metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name="m", version="2.0"))
            assert list(metadata.versions) == ["2.0"]
            await expect_error(
                stub.ModelMetadata(pb.ModelMetadataRequest(name="nope")), Code.NOT_FOUND
            )

    run(scenario())


# -- inference -------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [True, False], ids=["raw_input_contents", "typed_contents"])
def test_infer(tmp_path: Path, raw: bool) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            request = infer_request([[1.0, 2.0], [3.0, 4.5]], raw=raw)
            call = client.stub.ModelInfer(request, metadata=(("x-request-id", "abc-123"),))
            response = await call
            # The call's id comes back as REST's X-Request-Id header does.
            assert ("x-request-id", "abc-123") in tuple(await call.trailing_metadata())
            assert (response.model_name, response.model_version, response.id) == (
                "m",
                "1.0",
                "req-7",
            )
            assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
                ("y", "FP32", [2, 2]),
                ("total", "FP32", [2]),
            ]
            arrays = outputs_of(response)
            np.testing.assert_array_equal(arrays["y"], [[2.0, 4.0], [6.0, 9.0]])
            np.testing.assert_array_equal(arrays["total"], [3.0, 7.5])
            [item] = client.backend().seen
            assert (item.api, item.request_id, item.kserve_v2) == (API_V2_GRPC, "abc-123", True)

    run(scenario())


def test_explicit_version_and_requested_outputs(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            request = infer_request(version="2.0", outputs=("total",))
            response = await client.stub.ModelInfer(request)
            assert response.model_version == "2.0"
            assert [o.name for o in response.outputs] == ["total"]
            assert outputs_of(response)["total"].tolist() == [3.0]
            assert client.backend(version="1.0").seen == []

    run(scenario())


def test_plain_answers_become_bytes_tensors(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            # A plain handler never sees v2 parameters: the fake reads its answer from metadata.
            response = await client.stub.ModelInfer(
                infer_request(model="plain"), metadata=(("x-answer", "label"),)
            )
            [output] = response.outputs
            assert (output.name, output.datatype, list(output.shape)) == ("output0", "BYTES", [1])
            assert outputs_of(response)["output0"].tolist() == [b'{"7":0.9,"1":0.1}']

    run(scenario())


def test_stream_infer_answers_each_request_and_reports_errors_in_the_stream(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            requests = [
                infer_request([[1.0, 1.0]]),
                infer_request(datatype="INT32"),
                infer_request(model="nope"),
                infer_request([[2.0, 2.0]], version="2.0"),
            ]
            answers = [answer async for answer in client.stub.ModelStreamInfer(iter(requests))]
            assert [a.error_message for a in answers] == [
                "",
                "input 'x': datatype INT32, the model takes FP32",
                "Model not found: nope",
                "",
            ]
            assert outputs_of(answers[0].infer_response)["total"].tolist() == [2.0]
            assert answers[3].infer_response.model_version == "2.0"
            # As Triton: every response says it is its request's last, which clients wait
            # for, and a failed one says which request failed.
            for answer in answers:
                assert answer.infer_response.parameters[FINAL].bool_param is True
                assert answer.infer_response.id == "req-7"
            assert answers[2].infer_response.model_name == "nope"

    run(scenario())


def test_stream_infer_runs_the_requests_it_has_read_together(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            backend = client.backend()
            backend.gate = asyncio.Event()  # holds every batch
            requests = [infer_request([[float(i), 0.0]]) for i in range(3)]
            for i, request in enumerate(requests):
                request.id = f"r{i}"
            call = client.stub.ModelStreamInfer(iter(requests))
            batcher = client.tg.registry.get("m", "1.0").batcher
            # All three are queued or running before the first is answered: Triton issues
            # each request as it reads it, rather than awaiting the one before.
            await wait_for(lambda: batcher.in_flight == 3)
            backend.gate.set()
            answers = [await call.read() for _ in requests]
            assert [a.infer_response.id for a in answers] == ["r0", "r1", "r2"]  # in order
            assert [outputs_of(a.infer_response)["total"].tolist() for a in answers] == [
                [0.0],
                [1.0],
                [2.0],
            ]

    run(scenario())


def test_a_handler_answer_that_is_no_tensor_is_internal_and_the_stream_goes_on(
    tmp_path: Path,
) -> None:
    """An answer the codec cannot turn into a tensor is the handler's fault: INTERNAL (as
    REST's 500), not gRPC's UNKNOWN, and on a stream it fails that request alone."""

    async def scenario() -> None:
        async with serving(tmp_path) as client:
            details = await expect_error(
                client.stub.ModelInfer(infer_request(answer="invalid")), Code.INTERNAL
            )
            assert details.startswith("Handler output is not a valid v2 tensor: KeyError")
            requests = [infer_request(), infer_request(answer="invalid"), infer_request()]
            answers = [answer async for answer in client.stub.ModelStreamInfer(iter(requests))]
            assert [bool(a.error_message) for a in answers] == [False, True, False]
            assert answers[1].error_message.startswith("Handler output is not a valid v2 tensor")
            assert outputs_of(answers[2].infer_response)["total"].tolist() == [3.0]

    run(scenario())


def test_a_stream_answer_over_max_response_size_fails_that_request_alone(
    tmp_path: Path,
) -> None:
    """gRPC's own send limit would end the whole stream (RESOURCE_EXHAUSTED): the answer is
    refused before it is sent, as on REST, and the stream goes on."""

    async def scenario() -> None:
        async with serving(tmp_path, max_response_size="400") as client:
            large = np.ones((64, 2), np.float32)  # 64 rows: 768 bytes of outputs
            requests = [infer_request(), infer_request(large), infer_request()]
            answers = [answer async for answer in client.stub.ModelStreamInfer(iter(requests))]
            assert [bool(a.error_message) for a in answers] == [False, True, False]
            assert "exceeds max_response_size of 400 bytes" in answers[1].error_message
            assert outputs_of(answers[2].infer_response)["total"].tolist() == [3.0]

    run(scenario())


def test_a_stream_request_whose_handler_answers_503_runs_once(tmp_path: Path) -> None:
    """A stream retries a request its own read-ahead got refused by a full queue; a handler's
    503 is no such refusal: the request ran, and running it again would repeat its effects."""

    async def scenario() -> None:
        async with serving(tmp_path) as client:
            slow = client.backend("m", "2.0")
            slow.gate = asyncio.Event()  # the first request is still running ...
            requests = [infer_request(version="2.0"), infer_request(answer="unavailable")]
            call = client.stub.ModelStreamInfer(iter(requests))
            handler = client.backend("m", "1.0")
            await wait_for(lambda: len(handler.seen) == 1)  # ... when the second answers 503
            await asyncio.sleep(0.2)
            slow.gate.set()
            answers = [await call.read() for _ in requests]
            assert answers[0].error_message == ""
            assert "warming up" in answers[1].error_message
            assert len(handler.seen) == 1

    run(scenario())


def test_each_request_of_a_stream_has_its_own_request_id(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            metadata = (("x-request-id", "the-call"),)
            call = client.stub.ModelStreamInfer(iter([infer_request()] * 2), metadata=metadata)
            assert len([answer async for answer in call]) == 2
            await client.stub.ModelInfer(infer_request(), metadata=metadata)
            ids = [request.request_id for request in client.backend().seen]
            assert ids[2] == "the-call" and len({*ids[:2], "the-call"}) == 3

    run(scenario())


@pytest.fixture
def sequence_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Model "m" with TorchServe's sequenceBatching on (a fake archive has no
    model-config.yaml to say so): a sequence queues maxSequenceJobQueueSize=1 request."""
    make = registry_module._make_batcher

    def make_sequence_batcher(name: str, version: str, settings: ModelSettings, *rest: Any) -> Any:
        if name == "m":
            settings = replace(settings, sequence_batching=True, sequence_max_idle_ms=60_000)
            settings.max_num_sequence = 4
        return make(name, version, settings, *rest)

    monkeypatch.setattr(registry_module, "_make_batcher", make_sequence_batcher)


@pytest.mark.parametrize("named_by", ["parameter", "metadata"])
@pytest.mark.usefixtures("sequence_model")
def test_stream_infer_queues_a_sequences_requests_one_at_a_time(
    tmp_path: Path, named_by: str
) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            backend = client.backend()
            backend.gate = asyncio.Event()
            requests = [infer_request([[float(i), 0.0]]) for i in range(4)]
            other = infer_request([[9.0, 0.0]])
            metadata: tuple[tuple[str, str], ...] = ()
            if named_by == "parameter":
                for request in requests:
                    request.parameters["sequence_id"].string_param = "s1"
                other.parameters["sequence_id"].string_param = "s2"
            else:
                metadata = (("ts_request_sequence_id", "s1"),)
            call = client.stub.ModelStreamInfer(iter([*requests, other]), metadata=metadata)
            await asyncio.sleep(0.2)  # all five read by now
            backend.gate.set()
            answers = [await call.read() for _ in range(5)]
            # Read ahead into the sequence's queue (1 deep), the third would have been 503.
            assert [a.error_message for a in answers] == [""] * 5
            sequences = [r.headers["ts_request_sequence_id"] for r in backend.seen]
            if named_by == "parameter":  # another sequence's request ran beside s1's
                assert sequences.count("s1") == 4 and sequences.index("s2") < 4
            else:  # the stream's metadata names one sequence for all
                assert sequences == ["s1"] * 5

    run(scenario())


def test_stream_read_ahead_waits_rather_than_overflow_a_small_queue(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path, job_queue_size="4") as client:
            backend = client.backend()
            backend.gate = asyncio.Event()
            requests = [infer_request([[float(i), 0.0]]) for i in range(10)]
            call = client.stub.ModelStreamInfer(iter(requests))
            await asyncio.sleep(0.2)  # read ahead: more than 4 tried the queue
            backend.gate.set()
            answers = [await call.read() for _ in requests]
            # One at a time, none would have met a full queue: none does now either.
            assert [a.error_message for a in answers] == [""] * 10
            totals = [outputs_of(a.infer_response)["total"].tolist() for a in answers]
            assert totals == [[float(i)] for i in range(10)]

    run(scenario())


@pytest.mark.parametrize("empty_final", [False, True])
def test_stream_infer_sends_a_streaming_handlers_parts(tmp_path: Path, empty_final: bool) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            streamed = infer_request(answer="stream")
            plain = infer_request()
            for request in (streamed, plain):
                if empty_final:
                    request.parameters["triton_enable_empty_final_response"].bool_param = True
            answers = [a async for a in client.stub.ModelStreamInfer(iter([streamed, plain]))]
            finals = [a.infer_response.parameters[FINAL].bool_param for a in answers]
            parts = [outputs_of(a.infer_response)["y"].tolist() for a in answers[:2]]
            assert parts == [[b"part 0"], [b"part 1"]]
            if empty_final:  # decoupled Triton's way: an empty response ends a streamed request
                assert finals == [False, False, False, True, True]
                assert not answers[3].infer_response.outputs
                assert answers[3].infer_response.id == "req-7"
            else:
                assert finals == [False, False, True, True]
            assert all(a.error_message == "" for a in answers)
            # The plain request, after the streamed one, answers once, with the final flag.
            assert outputs_of(answers[-1].infer_response)["total"].tolist() == [3.0]

    run(scenario())


def test_reserved_parameters(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            request = infer_request()
            request.parameters["sequence_id"].string_param = "s-1"
            request.parameters["sequence_start"].bool_param = True
            request.parameters["priority"].uint64_param = 1
            await client.stub.ModelInfer(request)
            headers = client.backend().seen[-1].headers
            assert headers["ts_request_sequence_id"] == "s-1"
            assert headers["ts_request_sequence_start"] == "true"

            for key, set_value, message in [
                ("triton_x", lambda p: setattr(p, "bool_param", True), "reserved for Triton"),
                ("sequence_end", lambda p: setattr(p, "string_param", "y"), "sequence_end"),
                ("priority", lambda p: setattr(p, "int64_param", -1), "priority"),
                ("timeout", lambda p: setattr(p, "double_param", 1.5), "timeout"),
                ("unset", lambda p: None, "'unset' has no value"),
            ]:
                request = infer_request()
                request.parameters[key].CopyFrom(pb.InferParameter())
                set_value(request.parameters[key])
                details = await expect_error(client.stub.ModelInfer(request), Code.INVALID_ARGUMENT)
                assert message in details

    run(scenario())


def test_a_request_timeout_bounds_its_wait_in_the_queue(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            backend = client.backend()
            backend.gate = asyncio.Event()
            first = asyncio.ensure_future(client.stub.ModelInfer(infer_request()))
            await wait_for(lambda: len(backend.seen) == 1)  # the only worker is busy
            waiting = infer_request()
            waiting.parameters["timeout"].int64_param = 50_000  # µs
            details = await expect_error(client.stub.ModelInfer(waiting), Code.DEADLINE_EXCEEDED)
            assert "past the request's timeout of 50000 µs" in details
            backend.gate.set()
            assert outputs_of(await first)["total"].tolist() == [3.0]
            assert len(backend.seen) == 1  # the timed-out request never ran

    run(scenario())


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_args", "code", "details"),
    [
        ({"model": "nope"}, Code.NOT_FOUND, "Model not found: nope"),
        ({"version": "9"}, Code.NOT_FOUND, "Model version: 9 does not exist for model: m"),
        (
            {"datatype": "INT32"},
            Code.INVALID_ARGUMENT,
            "input 'x': datatype INT32, the model takes FP32",
        ),
        (
            {"datatype": "INT32", "raw": False},
            Code.INVALID_ARGUMENT,
            "input 'x': datatype INT32, the model takes FP32",
        ),
        (
            {"rows": [[1.0, 2.0, 3.0]]},
            Code.INVALID_ARGUMENT,
            "input 'x': shape [1, 3] does not fit the model's [-1, 2]",
        ),
        ({"name": "z"}, Code.INVALID_ARGUMENT, "unexpected input 'z': the model takes 'x'"),
        (
            {"outputs": ("nope",)},
            Code.INVALID_ARGUMENT,
            "unexpected inference output 'nope' for model 'm'",
        ),
        ({"answer": "fail"}, Code.INVALID_ARGUMENT, "x must be positive"),
        ({"answer": "raise"}, Code.INTERNAL, "Worker died: RuntimeError: the handler raised"),
    ],
)
def test_errors_map_through_the_error_table(
    tmp_path: Path, request_args: dict[str, Any], code: grpc.StatusCode, details: str
) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            message = await expect_error(
                client.stub.ModelInfer(infer_request(**request_args)), code
            )
            assert message.startswith(details), message

    run(scenario())


def test_an_unknown_model_is_not_found_whatever_its_tensors_hold(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            request = infer_request(model="nope")
            request.raw_input_contents[0] = b"\x00" * 4  # 1 float for shape [1, 2]
            details = await expect_error(client.stub.ModelInfer(request), Code.NOT_FOUND)
            assert details == "Model not found: nope"
            request = infer_request(version="9.9")
            request.parameters["triton_x"].bool_param = True  # a reserved name: refused ...
            details = await expect_error(client.stub.ModelInfer(request), Code.NOT_FOUND)
            assert details == "Model version: 9.9 does not exist for model: m"  # ... after this

    run(scenario())


def test_a_large_request_decodes_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A million short BYTES elements take over a second to decode: a request over
    DECODE_IN_THREAD_BYTES decodes in a thread, a small one on the loop."""
    decoded_in: list[bool] = []

    def decode(request: pb.ModelInferRequest) -> Any:
        decoded_in.append(threading.current_thread() is threading.main_thread())
        return decode_grpc(request)

    monkeypatch.setattr(kserve_module, "decode_grpc", decode)

    async def scenario() -> None:
        async with serving(tmp_path, max_request_size=str(4 << 20)) as client:
            count = DECODE_IN_THREAD_BYTES // 4 + 1  # empty elements: a length prefix each
            request = pb.ModelInferRequest(model_name="plain")
            request.inputs.add(name="t", datatype="BYTES", shape=[1, count])
            request.raw_input_contents.append(b"\x00\x00\x00\x00" * count)
            answer = await client.stub.ModelInfer(request)
            assert answer.outputs[0].datatype == "BYTES"
            await client.stub.ModelInfer(infer_request())
            assert decoded_in == [False, True]

    run(scenario())


def test_malformed_tensors_are_invalid_argument(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            request = infer_request()
            request.raw_input_contents[0] = b"\x00" * 4  # 1 float for shape [1, 2]
            details = await expect_error(client.stub.ModelInfer(request), Code.INVALID_ARGUMENT)
            assert details == "input 'x': 4 bytes of FP32 data, shape [1, 2] needs 8"

    run(scenario())


# Not a protobuf message: field 1 (a string) claims 0x7f bytes and 3 follow.
GARBAGE = b"\x0a\x7fabc"


def test_malformed_message_bytes_are_invalid_argument_without_internals(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            infer = client.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            details = await expect_error(infer(GARBAGE), Code.INVALID_ARGUMENT)
            assert details == (
                "malformed request: the message bytes do not parse as "
                "/inference.GRPCInferenceService/ModelInfer's request message"
            )
            assert "class" not in details and "Error" not in details
            stream = client.channel.stream_stream(
                "/inference.GRPCInferenceService/ModelStreamInfer"
            )
            good = infer_request().SerializeToString()
            call = stream(iter([good, GARBAGE]))
            first = pb.ModelStreamInferResponse.FromString(await call.read())
            assert first.error_message == ""  # the good message before the bad one is answered
            await expect_error(call.read(), Code.INVALID_ARGUMENT)
            # The server goes on serving everyone else.
            assert outputs_of(await client.stub.ModelInfer(infer_request()))["total"].tolist() == [
                3.0
            ]
            assert (await client.stub.ServerLive(pb.ServerLiveRequest())).live

    run(scenario())


def test_oversized_messages_are_resource_exhausted(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            rows = np.zeros((MAX_REQUEST_SIZE, 2), np.float32)
            await expect_error(client.stub.ModelInfer(infer_request(rows)), Code.RESOURCE_EXHAUSTED)
            assert client.backend().seen == []

    run(scenario())


def test_methods_outside_the_proto_are_unimplemented(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            model_config = client.channel.unary_unary("/inference.GRPCInferenceService/ModelConfig")
            await expect_error(model_config(b""), Code.UNIMPLEMENTED)

    run(scenario())


def test_token_authorization(tmp_path: Path) -> None:
    async def scenario() -> None:
        key_file = tmp_path / "keys" / "key_file.json"
        key_file.parent.mkdir()
        config = {"disable_token_authorization": "false", "torchgate.key_file": str(key_file)}
        async with serving(tmp_path, **config) as client:
            key = json.loads(key_file.read_text())["inference"]["key"]
            stub = client.stub
            details = await expect_error(stub.ModelInfer(infer_request()), Code.UNAUTHENTICATED)
            assert details.startswith("Token Authorization failed")
            wrong = (("authorization", "Bearer wrong"),)
            await expect_error(
                stub.ModelInfer(infer_request(), metadata=wrong), Code.UNAUTHENTICATED
            )
            stream = stub.ModelStreamInfer(iter([infer_request()]))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                _ = [answer async for answer in stream]
            assert info.value.code() == Code.UNAUTHENTICATED
            assert client.backend().seen == []
            # A stream is refused at once, not after the client's first message.
            silent = asyncio.Event()

            async def nothing_yet() -> AsyncIterator[pb.ModelInferRequest]:
                await silent.wait()
                yield infer_request()

            stream = stub.ModelStreamInfer(nothing_yet())
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(stream.read(), 5)
            assert info.value.code() == Code.UNAUTHENTICATED
            silent.set()

            good = (("authorization", f"Bearer {key}"),)
            response = await stub.ModelInfer(infer_request(), metadata=good)
            assert outputs_of(response)["total"].tolist() == [3.0]
            stream = stub.ModelStreamInfer(iter([infer_request()]), metadata=good)
            assert [a.error_message async for a in stream] == [""]
            # Health and metadata need no key, on gRPC as on REST.
            assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
            assert (await stub.ModelReady(pb.ModelReadyRequest(name="m"))).ready
            await stub.ServerMetadata(pb.ServerMetadataRequest())
            await stub.ModelMetadata(pb.ModelMetadataRequest(name="m"))

    run(scenario())
