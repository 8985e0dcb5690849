"""Our generated stubs are wire-compatible with the clients users already have.

References: tritonclient's own stubs for KServe v2, and the .proto files shipped inside
torchserve 0.12.0's model-server.jar for TorchServe, compiled here with grpcio-tools.
"""

from __future__ import annotations

import importlib.util
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FileDescriptor
from grpc_tools import protoc
from tritonclient.grpc import service_pb2 as triton_pb

from api.rpc.generated import POOL
from api.rpc.generated import grpc_predict_v2_pb2 as v2
from api.rpc.generated import grpc_predict_v2_pb2_grpc as v2_grpc
from api.rpc.generated import inference_pb2 as ts_inference
from api.rpc.generated import inference_pb2_grpc as ts_inference_grpc
from api.rpc.generated import management_pb2 as ts_management
from api.rpc.generated import management_pb2_grpc as ts_management_grpc
from api.rpc.generated.google.rpc import status_pb2

# (method, client streaming, server streaming) per service full name.
SERVICES = {
    (v2, "inference.GRPCInferenceService"): [
        ("ServerLive", False, False),
        ("ServerReady", False, False),
        ("ModelReady", False, False),
        ("ServerMetadata", False, False),
        ("ModelMetadata", False, False),
        ("ModelInfer", False, False),
        ("ModelStreamInfer", True, True),
    ],
    (ts_inference, "org.pytorch.serve.grpc.inference.InferenceAPIsService"): [
        ("Ping", False, False),
        ("Predictions", False, False),
        ("StreamPredictions", False, True),
        ("StreamPredictions2", True, True),
    ],
    (ts_management, "org.pytorch.serve.grpc.management.ManagementAPIsService"): [
        ("DescribeModel", False, False),
        ("ListModels", False, False),
        ("RegisterModel", False, False),
        ("ScaleWorker", False, False),
        ("SetDefault", False, False),
        ("UnregisterModel", False, False),
    ],
}


def file_proto(file: FileDescriptor) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    return proto


@pytest.mark.parametrize(("key", "methods"), SERVICES.items(), ids=[k[1] for k in SERVICES])
def test_service_names_and_methods(key: tuple[object, str], methods: list[tuple]) -> None:
    module, full_name = key
    service = POOL.FindServiceByName(full_name)
    assert service.file is module.DESCRIPTOR  # type: ignore[attr-defined]
    actual = [(m.name, m.client_streaming, m.server_streaming) for m in service.methods]
    assert actual == methods


def test_grpc_stubs_route_to_the_wire_paths() -> None:
    base = v2_grpc.GRPCInferenceServiceServicer
    assert {"ModelInfer", "ModelStreamInfer", "ServerLive"} <= set(vars(base))
    assert hasattr(ts_inference_grpc, "add_InferenceAPIsServiceServicer_to_server")
    assert hasattr(ts_management_grpc, "add_ManagementAPIsServiceServicer_to_server")


def test_stubs_live_in_a_private_pool_beside_tritonclient() -> None:
    # Both define `inference.ModelInferRequest`; the default pool holds only tritonclient's.
    default = descriptor_pool.Default()
    assert default.FindMessageTypeByName("inference.ModelInferRequest").file.name == (
        "grpc_service.proto"
    )
    with pytest.raises(KeyError):
        default.FindFileByName("grpc_predict_v2.proto")
    assert v2.ModelInferRequest.DESCRIPTOR.full_name == "inference.ModelInferRequest"


# --- KServe v2 against tritonclient -------------------------------------------------------------


def test_v2_messages_match_tritonclient_field_for_field() -> None:
    ours = file_proto(v2.DESCRIPTOR)
    theirs = {m.name: m for m in file_proto(triton_pb.DESCRIPTOR).message_type}
    assert ours.package == "inference"
    for message in ours.message_type:
        assert message == theirs[message.name], message.name


def test_v2_methods_match_tritonclient() -> None:
    (ours,) = file_proto(v2.DESCRIPTOR).service
    (theirs,) = file_proto(triton_pb.DESCRIPTOR).service
    assert ours.name == theirs.name == "GRPCInferenceService"
    by_name = {m.name: m for m in theirs.method}
    for method in ours.method:
        assert method == by_name[method.name], method.name


def full_infer_request(module: object) -> object:
    request = module.ModelInferRequest(model_name="m", model_version="2", id="r")  # type: ignore[attr-defined]
    request.parameters["priority"].uint64_param = 2**64 - 1
    request.parameters["ratio"].double_param = 0.5
    request.parameters["tag"].string_param = "t"
    tensor = request.inputs.add(name="x", datatype="INT32", shape=[1, 2])
    tensor.parameters["flag"].bool_param = True
    tensor.contents.int_contents.extend([-1, 2])
    request.outputs.add(name="y").parameters["classification"].int64_param = 3
    request.raw_input_contents.append(b"\x00\x01")
    return request


def test_model_infer_request_round_trips_with_tritonclient() -> None:
    ours = full_infer_request(v2)
    theirs = triton_pb.ModelInferRequest.FromString(ours.SerializeToString())  # type: ignore[attr-defined]
    assert theirs == full_infer_request(triton_pb)
    back = v2.ModelInferRequest.FromString(theirs.SerializeToString())
    assert back == ours


def test_model_infer_response_round_trips_with_tritonclient() -> None:
    theirs = triton_pb.ModelInferResponse(model_name="m", model_version="1", id="r")
    out = theirs.outputs.add(name="y", datatype="FP16", shape=[2])
    out.parameters["binary_data_size"].int64_param = 4
    theirs.raw_output_contents.append(b"\x00<\x00@")
    stream = triton_pb.ModelStreamInferResponse(error_message="", infer_response=theirs)

    ours = v2.ModelStreamInferResponse.FromString(stream.SerializeToString())

    assert ours.infer_response.outputs[0].parameters["binary_data_size"].int64_param == 4
    assert ours.SerializeToString() == stream.SerializeToString()


# --- TorchServe against the protos inside its 0.12 jar ------------------------------------------


@dataclass
class Reference:
    """TorchServe's own inference/management/status protos, compiled by grpcio-tools."""

    pool: Any
    files: dict[str, descriptor_pb2.FileDescriptorProto]


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    spec = importlib.util.find_spec("ts")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchserve is not installed")
    jar = Path(next(iter(spec.submodule_search_locations))) / "frontend" / "model-server.jar"
    names = ["inference.proto", "management.proto", "google/rpc/status.proto"]
    out = tmp_path_factory.mktemp("torchserve-protos")
    with zipfile.ZipFile(jar) as archive:
        archive.extractall(out, members=names)
    descriptor_set = out / "set.pb"
    well_known = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{out}", f"-I{well_known}", "--include_imports"]
    assert protoc.main([*args, f"--descriptor_set_out={descriptor_set}", *names]) == 0
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file
    pool = descriptor_pool.DescriptorPool()
    for file in files:
        pool.Add(file)
        for message in file.message_type:
            _clear_json_names(message)  # protoc adds them here, not in generated code
    return Reference(pool, {file.name: file for file in files})


def _clear_json_names(message: descriptor_pb2.DescriptorProto) -> None:
    for field in message.field:
        field.ClearField("json_name")
    for nested in message.nested_type:
        _clear_json_names(nested)


@pytest.mark.parametrize(
    ("ours", "name"),
    [
        (ts_inference.DESCRIPTOR, "inference.proto"),
        (ts_management.DESCRIPTOR, "management.proto"),
        (status_pb2.DESCRIPTOR, "google/rpc/status.proto"),
    ],
)
def test_torchserve_protos_match_the_jar(
    torchserve: Reference, ours: FileDescriptor, name: str
) -> None:
    reference = torchserve.files[name]
    mine = file_proto(ours)
    assert (mine.name, mine.package, mine.dependency) == (
        reference.name,
        reference.package,
        reference.dependency,
    )
    assert mine.message_type == reference.message_type
    assert mine.service == reference.service
    assert mine.options == reference.options


def test_predictions_round_trip_with_torchserve_messages(torchserve: Reference) -> None:
    reference = message_factory.GetMessageClass(
        torchserve.pool.FindMessageTypeByName("org.pytorch.serve.grpc.inference.PredictionResponse")
    )
    ours = ts_inference.PredictionResponse(prediction=b"{}", sequence_id="s1")
    ours.status.code = 3
    ours.status.message = "bad input"

    theirs: Any = reference.FromString(ours.SerializeToString())

    assert (theirs.prediction, theirs.sequence_id) == (b"{}", "s1")
    assert (theirs.status.code, theirs.status.message) == (3, "bad input")
    assert ts_inference.PredictionResponse.FromString(theirs.SerializeToString()) == ours


# Field (name, number) pairs of TorchServe 0.12's messages: pinned even where the jar is absent.
TORCHSERVE_FIELDS = {
    ts_inference.PredictionsRequest: [
        ("model_name", 1),
        ("model_version", 2),
        ("input", 3),
        ("sequence_id", 4),
    ],
    ts_inference.PredictionResponse: [("prediction", 1), ("sequence_id", 2), ("status", 3)],
    ts_inference.TorchServeHealthResponse: [("health", 1)],
    ts_management.ManagementResponse: [("msg", 1)],
    ts_management.DescribeModelRequest: [
        ("model_name", 1),
        ("model_version", 2),
        ("customized", 3),
    ],
    ts_management.ListModelsRequest: [("limit", 1), ("next_page_token", 2)],
    ts_management.RegisterModelRequest: [
        ("batch_size", 1),
        ("handler", 2),
        ("initial_workers", 3),
        ("max_batch_delay", 4),
        ("model_name", 5),
        ("response_timeout", 6),
        ("runtime", 7),
        ("synchronous", 8),
        ("url", 9),
        ("s3_sse_kms", 10),
        ("startup_timeout", 11),
    ],
    ts_management.ScaleWorkerRequest: [
        ("model_name", 1),
        ("model_version", 2),
        ("max_worker", 3),
        ("min_worker", 4),
        ("number_gpu", 5),
        ("synchronous", 6),
        ("timeout", 7),
    ],
    ts_management.SetDefaultRequest: [("model_name", 1), ("model_version", 2)],
    ts_management.UnregisterModelRequest: [("model_name", 1), ("model_version", 2)],
}


@pytest.mark.parametrize("message", TORCHSERVE_FIELDS, ids=lambda m: m.DESCRIPTOR.name)
def test_torchserve_field_numbers(message: type) -> None:
    fields = [(f.name, f.number) for f in message.DESCRIPTOR.fields]  # type: ignore[attr-defined]
    assert fields == TORCHSERVE_FIELDS[message]
