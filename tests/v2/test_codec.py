"""The v2 codec against tritonclient's own request builders and response parsers.

tritonclient builds request bodies (REST JSON, REST binary, gRPC) and parses our responses, so
these tests prove wire compatibility without a server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.grpc._utils import _get_inference_request as triton_grpc_request
from tritonclient.http._utils import _get_inference_request as triton_http_request

from api.rpc.generated import grpc_predict_v2_pb2 as pb
from api.v2.codec import (
    HEADER_LENGTH,
    CodecError,
    Parameters,
    RequestedOutput,
    Tensor,
    V2Response,
    datatype_of,
    decode_grpc,
    decode_rest,
    encode_grpc,
    encode_rest,
    numpy_dtype,
)

SAMPLES: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.array([[0, 7, 255]], np.uint8),
    "UINT16": np.array([[0, 7, 65535]], np.uint16),
    "UINT32": np.array([[0, 7, 2**32 - 1]], np.uint32),
    "UINT64": np.array([[0, 7, 2**64 - 1]], np.uint64),
    "INT8": np.array([[-128, 0, 127]], np.int8),
    "INT16": np.array([[-(2**15), 0, 2**15 - 1]], np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1]], np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1]], np.int64),
    "FP16": np.array([[-1.5, 0.1, 65504]], np.float16),
    "FP32": np.array([[-1.5, 0.1, 3.4e38]], np.float32),
    "FP64": np.array([[-1.5, 0.1, 1e308]], np.float64),
    "BYTES": np.array([[b"", b"ascii", "h\u00e9".encode()]], dtype=object),
}
DATATYPES = sorted(SAMPLES)


def http_request(
    arrays: dict[str, np.ndarray],
    *,
    binary: bool,
    outputs: list[thttp.InferRequestedOutput] | None = None,
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """A v2 REST body and header length exactly as tritonclient.http sends them."""
    inputs = [
        thttp.InferInput(name, list(array.shape), datatype_of(array.dtype)).set_data_from_numpy(
            array, binary_data=binary
        )
        for name, array in arrays.items()
    ]
    body, header_length = triton_http_request(
        inputs, "req-1", outputs, 0, False, False, 0, None, parameters
    )
    return body, header_length


def triton_http_result(body: bytes, headers: dict[str, str]) -> thttp.InferResult:
    length = headers.get(HEADER_LENGTH)
    return thttp.InferResult.from_response_body(
        body, header_length=None if length is None else int(length)
    )


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    if expected.dtype == object:
        assert actual.dtype == object
        assert actual.tolist() == expected.tolist()
    else:
        assert actual.dtype == expected.dtype
        np.testing.assert_array_equal(actual, expected)


def response_of(arrays: dict[str, np.ndarray]) -> V2Response:
    tensors = [Tensor.from_numpy(name, array) for name, array in arrays.items()]
    return V2Response("model", "1", "req-1", {}, tensors)


# --- datatypes --------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", DATATYPES)
def test_datatype_table_round_trips(datatype: str) -> None:
    assert datatype_of(numpy_dtype(datatype)) == datatype


def test_bf16_and_unknown_datatypes_are_rejected() -> None:
    with pytest.raises(CodecError, match="BF16 is not supported"):
        numpy_dtype("BF16")
    with pytest.raises(CodecError, match="unknown datatype 'FP8'"):
        numpy_dtype("FP8")


def test_datatype_of_accepts_big_endian_and_text_and_refuses_complex() -> None:
    assert datatype_of(np.dtype(">f4")) == "FP32"
    assert datatype_of(np.dtype("S4")) == "BYTES"
    assert datatype_of(np.dtype("U4")) == "BYTES"
    with pytest.raises(TypeError):
        datatype_of(np.dtype(np.complex64))


# --- REST: requests built by tritonclient.http -------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", DATATYPES)
def test_rest_request_from_tritonclient(datatype: str, binary: bool) -> None:
    body, header_length = http_request({"x": SAMPLES[datatype]}, binary=binary)
    assert (header_length is not None) == binary

    request = decode_rest(body, header_length)

    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("x", datatype, (1, 3))
    assert tensor.parameters == {}  # binary_data_size is transport, not a model parameter
    assert_same(tensor.data, SAMPLES[datatype])
    assert request.id == "req-1"


def test_rest_request_mixes_binary_and_json_inputs_in_order() -> None:
    inputs = [
        thttp.InferInput("a", [1, 3], "FP32").set_data_from_numpy(SAMPLES["FP32"]),
        thttp.InferInput("b", [1, 3], "INT8").set_data_from_numpy(SAMPLES["INT8"], False),
        thttp.InferInput("c", [1, 3], "BYTES").set_data_from_numpy(SAMPLES["BYTES"]),
    ]
    outputs = [thttp.InferRequestedOutput("y"), thttp.InferRequestedOutput("z", False)]
    body, length = triton_http_request(
        inputs, "", outputs, 0, False, False, 0, None, {"mode": "fast", "k": 2, "t": 0.5}
    )

    request = decode_rest(body, str(length))  # the header as it arrives: a string

    assert [t.name for t in request.inputs] == ["a", "b", "c"]
    for tensor, datatype in zip(request.inputs, ["FP32", "INT8", "BYTES"], strict=True):
        assert_same(tensor.data, SAMPLES[datatype])
    assert request.id is None
    assert request.parameters == {"mode": "fast", "k": 2, "t": 0.5}
    assert request.outputs == [RequestedOutput("y", True), RequestedOutput("z", False)]
    assert "binary_data_output" not in request.parameters


def test_rest_request_without_outputs_asks_for_binary_output() -> None:
    body, length = http_request({"x": SAMPLES["FP32"]}, binary=True)
    assert decode_rest(body, length).parameters["binary_data_output"] is True


def test_binary_inputs_are_read_only_views_of_the_body() -> None:
    body, length = http_request({"x": SAMPLES["FP32"]}, binary=True)
    data = decode_rest(body, length).inputs[0].data
    assert not data.flags.writeable


def test_rest_json_accepts_nested_and_flat_data() -> None:
    flat = {"name": "x", "datatype": "INT32", "shape": [2, 2], "data": [1, 2, 3, 4]}
    nested = {**flat, "name": "y", "data": [[1, 2], [3, 4]]}
    strings = {"name": "s", "datatype": "BYTES", "shape": [2, 1], "data": [["a"], ["b"]]}
    request = decode_rest(orjson.dumps({"inputs": [flat, nested, strings]}))
    expected = np.array([[1, 2], [3, 4]], np.int32)
    assert_same(request.inputs[0].data, expected)
    assert_same(request.inputs[1].data, expected)
    assert_same(request.inputs[2].data, np.array([[b"a"], [b"b"]], dtype=object))


def test_rest_json_zeros_and_ones_are_numbers_and_booleans_are_bool_data() -> None:
    """Only booleans among numbers are refused (numpy would read them as 1 and 0)."""
    numbers = {"name": "x", "datatype": "INT32", "shape": [2, 2], "data": [[0, 1], [1, 7]]}
    flags = {"name": "b", "datatype": "BOOL", "shape": [2], "data": [True, False]}
    request = decode_rest(orjson.dumps({"inputs": [numbers, flags]}))
    assert_same(request.inputs[0].data, np.array([[0, 1], [1, 7]], np.int32))
    assert_same(request.inputs[1].data, np.array([True, False]))


def test_rest_json_widens_integers_to_floats() -> None:
    body = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}]}
    )
    assert_same(decode_rest(body).inputs[0].data, np.array([1.0, 2.0], np.float32))


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_empty_tensor(binary: bool) -> None:
    empty = np.zeros((0, 4), np.float32)
    body, length = http_request({"x": empty}, binary=binary)
    assert_same(decode_rest(body, length).inputs[0].data, empty)

    out, headers = encode_rest(response_of({"y": empty}), binary_default=binary)
    assert_same(triton_http_result(out, headers).as_numpy("y"), empty)


NON_FINITE = [np.nan, np.inf, -np.inf, 0.1, 1.5]


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_rest_json_keeps_nan_and_infinities_both_ways_with_tritonclient(datatype: str) -> None:
    """tritonclient (python-rapidjson) writes NaN, Infinity and -Infinity tokens; Triton reads
    and writes them. orjson reads none of them, and writes each as null (read back as NaN)."""
    sent = np.array([NON_FINITE], numpy_dtype(datatype))
    body, length = http_request({"x": sent}, binary=False)
    assert b"NaN" in body and b"-Infinity" in body

    (tensor,) = decode_rest(body, length).inputs

    assert_same(tensor.data, sent)  # NaN where NaN was sent: assert_array_equal says so
    out, headers = encode_rest(response_of({"y": tensor.data}))
    assert b"null" not in out
    finite = orjson.dumps(sent[0, 3:], option=orjson.OPT_SERIALIZE_NUMPY)[1:]
    assert b'"data":[NaN,Infinity,-Infinity,' + finite in out  # orjson's forms for the rest
    assert_same(triton_http_result(out, headers).as_numpy("y"), sent)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        # Only a document orjson stops at a NaN or Infinity is read again; anything else that
        # is wrong in it is still refused, with the json module's own words.
        (b'{"inputs": [NaN', "Expecting ',' delimiter|Expecting value"),
        (b'{"inputs": [NaN], "id": "\\ud800"}', "surrogates not allowed"),
        (b'{"inputs": [nan]}', "not valid JSON"),
        (b'{"inputs": [-NaN]}', "not valid JSON"),
        (b'{"inputs": [Inf]}', "not valid JSON"),
        # A literal too large for a float is refused, as orjson refuses it, not infinity.
        (b'{"inputs": [NaN, 1e400]}', "number out of range: 1e400"),
    ],
)
def test_rest_json_non_finite_tokens_do_not_open_other_doors(body: bytes, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        decode_rest(body)


# --- REST: responses parsed by tritonclient.http ------------------------------------------------


@pytest.mark.parametrize("datatype", DATATYPES)
def test_rest_binary_response_parsed_by_tritonclient(datatype: str) -> None:
    body, headers = encode_rest(response_of({"y": SAMPLES[datatype]}), binary_default=True)

    assert headers["Content-Type"] == "application/octet-stream"
    header = orjson.loads(body[: int(headers[HEADER_LENGTH])])
    assert "data" not in header["outputs"][0]
    assert header["outputs"][0]["parameters"]["binary_data_size"] > 0
    assert_same(triton_http_result(body, headers).as_numpy("y"), SAMPLES[datatype])


@pytest.mark.parametrize("datatype", DATATYPES)
def test_rest_json_response_parsed_by_tritonclient(datatype: str) -> None:
    body, headers = encode_rest(response_of({"y": SAMPLES[datatype]}))

    assert headers == {"Content-Type": "application/json"}
    doc = orjson.loads(body)
    assert doc["model_name"] == "model"
    assert doc["model_version"] == "1"
    assert doc["id"] == "req-1"
    assert doc["outputs"][0]["shape"] == [1, 3]
    assert len(doc["outputs"][0]["data"]) == 3  # flat, row-major
    result = triton_http_result(body, headers).as_numpy("y")
    if datatype == "BYTES":  # JSON carries text; tritonclient returns it as str
        result = np.vectorize(str.encode, otypes=[object])(result)
    assert_same(result, SAMPLES[datatype])


def test_rest_response_per_output_flag_beats_request_default() -> None:
    arrays = {"a": SAMPLES["FP32"], "b": SAMPLES["INT64"], "c": SAMPLES["BYTES"]}
    requested = [RequestedOutput("c", True), RequestedOutput("a", False), RequestedOutput("b")]

    body, headers = encode_rest(response_of(arrays), requested, binary_default=True)

    header = orjson.loads(body[: int(headers[HEADER_LENGTH])])
    assert [o["name"] for o in header["outputs"]] == ["c", "a", "b"]  # the requested order
    assert "data" in header["outputs"][1]
    assert "data" not in header["outputs"][2]
    result = triton_http_result(body, headers)
    for name in arrays:
        assert_same(result.as_numpy(name), arrays[name])


def test_rest_response_returns_only_requested_outputs() -> None:
    arrays = {"a": SAMPLES["FP32"], "b": SAMPLES["INT64"]}
    body, _ = encode_rest(response_of(arrays), [RequestedOutput("b")])
    assert [o["name"] for o in orjson.loads(body)["outputs"]] == ["b"]
    with pytest.raises(CodecError, match="unknown output 'zz'"):
        encode_rest(response_of(arrays), [RequestedOutput("zz")])


def test_rest_response_keeps_parameters_and_omits_absent_fields() -> None:
    tensor = Tensor.from_numpy("y", SAMPLES["INT8"], {"unit": "m"})
    response = V2Response("model", None, None, {"cached": True}, [tensor])
    body, headers = encode_rest(response, binary_default=True)
    header = orjson.loads(body[: int(headers[HEADER_LENGTH])])
    assert "model_version" not in header
    assert "id" not in header
    assert header["parameters"] == {"cached": True}
    assert header["outputs"][0]["parameters"] == {"unit": "m", "binary_data_size": 3}


def test_rest_json_response_of_non_contiguous_array() -> None:
    array = np.arange(6, dtype=np.float32).reshape(2, 3).T
    body, _ = encode_rest(response_of({"y": array}))
    assert orjson.loads(body)["outputs"][0]["data"] == array.reshape(-1).tolist()


def test_rest_json_refuses_non_utf8_bytes_output() -> None:
    response = response_of({"y": np.array([b"\xff"], dtype=object)})
    with pytest.raises(CodecError, match="binary_data"):
        encode_rest(response)
    body, headers = encode_rest(response, binary_default=True)
    assert triton_http_result(body, headers).as_numpy("y").tolist() == [b"\xff"]


def test_response_tensor_whose_shape_lies_is_a_server_error() -> None:
    tensor = Tensor("y", "FP32", (2, 2), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="3 elements for shape") as info:
        encode_rest(V2Response("m", None, None, {}, [tensor]))
    assert not isinstance(info.value, CodecError)


# --- REST: malformed requests -----------------------------------------------------------------


def body_of(*inputs: dict[str, Any], **extra: Any) -> bytes:
    return orjson.dumps({"inputs": list(inputs), **extra})


def fp32(**overrides: Any) -> dict[str, Any]:
    return {"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0], **overrides}


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b"{}", "inputs must be a JSON array"),
        (b'{"inputs": []}', "the request has no inputs"),
        (body_of(fp32(datatype="FP8")), "unknown datatype 'FP8'"),
        (body_of(fp32(datatype="BF16")), "BF16 is not supported"),
        (body_of(fp32(shape=[3])), "2 elements in data, shape \\[3\\] needs 3"),
        (body_of(fp32(shape=[-1, -2])), "non-negative integers"),
        (body_of(fp32(shape=[True, 2])), "non-negative integers"),
        (body_of(fp32(shape="2")), "non-negative integers"),
        (body_of(fp32(data=["1", "2"])), "does not hold FP32 values"),
        (body_of(fp32(data=[1.0, None])), "does not hold FP32 values"),
        (body_of(fp32(data=[[1.0], [2.0, 3.0]])), "not a regular array"),
        (body_of(fp32(data=1.0)), "data must be a JSON array"),
        (body_of(fp32(datatype="INT32", data=[1.5, 2])), "does not hold INT32 values"),
        (body_of(fp32(datatype="BOOL", data=[1, 0])), "does not hold BOOL values"),
        (body_of(fp32(data=[True, 2.5])), "does not hold FP32 values"),
        (body_of(fp32(shape=[1, 2], data=[[True, 2]])), "does not hold FP32 values"),
        (body_of(fp32(datatype="FP64", shape=[2, 1], data=[[1.5], [False]])), "FP64 values"),
        (body_of(fp32(datatype="INT64", data=[1, False])), "does not hold INT64 values"),
        (body_of(fp32(datatype="UINT8", data=[True, 0])), "does not hold UINT8 values"),
        (body_of(fp32(data=[True, False])), "does not hold FP32 values"),
        (body_of(fp32(datatype="UINT8", data=[1, 256])), "out of range for UINT8"),
        (body_of(fp32(datatype="UINT64", data=[-1, 2])), "out of range for UINT64"),
        (body_of(fp32(datatype="UINT64", data=[-1, 2**64 - 1])), "out of range for UINT64"),
        (body_of(fp32(datatype="INT64", data=[1, 2**63])), "out of range for INT64"),
        # A finite number a float type cannot hold would silently become infinity.
        (body_of(fp32(datatype="FP16", data=[70000.0, 1.0])), "out of range for FP16"),
        (body_of(fp32(data=[1e39, 1.0])), "out of range for FP32"),
        (body_of(fp32(datatype="UINT64", data=[0.5, 2**64 - 1])), "does not hold UINT64"),
        (body_of(fp32(datatype="BYTES", data=["a", 2])), "BYTES data must be JSON strings"),
        (body_of(fp32(name=3)), "input name must be a string"),
        (body_of({"name": "x", "datatype": "FP32", "shape": [1]}), "neither data nor"),
        (body_of(fp32(parameters={"binary_data_size": 8})), "both data and binary_data_size"),
        (body_of(fp32(parameters={"shared_memory_region": "r"})), "shared memory"),
        (body_of(fp32(), fp32()), "input 'x' appears more than once"),
        (body_of(fp32(shape=[1] * 33)), "33 dimensions, at most 32"),
        (body_of(fp32(shape=[0, 2**62])), "larger than any tensor can be"),
        (body_of(fp32(parameters={"p": [1]})), "parameters must map names"),
        (body_of(fp32(), id=5), "id must be a string"),
        (body_of(fp32(), outputs=[{"name": "y", "parameters": {"binary_data": 1}}]), "boolean"),
        (body_of(fp32(), outputs={"name": "y"}), "outputs must be a JSON array"),
    ],
)
def test_rest_rejects_malformed_json(body: bytes, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        decode_rest(body)


def binary_body(raw: bytes, size: int, datatype: str = "FP32") -> tuple[bytes, int]:
    header = body_of(
        {
            "name": "x",
            "datatype": datatype,
            "shape": [2],
            "parameters": {"binary_data_size": size},
        }
    )
    return header + raw, len(header)


@pytest.mark.parametrize(
    ("raw", "size", "datatype", "match"),
    [
        (b"\0" * 4, 4, "FP32", "4 bytes of FP32 data, shape \\[2\\] needs 8"),
        (b"\0" * 8, 16, "FP32", "runs past the request body"),
        (b"\0" * 12, 8, "FP32", "4 bytes of binary data follow"),
        (b"\0" * 8, -8, "FP32", "non-negative integer"),
        (b"\1\0\0", 3, "BYTES", "truncated BYTES length prefix"),
        (b"\5\0\0\0ab", 6, "BYTES", "runs past its data"),
        (b"\1\0\0\0a", 5, "BYTES", "1 BYTES elements, shape needs 2"),
    ],
)
def test_rest_rejects_malformed_binary(raw: bytes, size: int, datatype: str, match: str) -> None:
    body, length = binary_body(raw, size, datatype)
    with pytest.raises(CodecError, match=match):
        decode_rest(body, length)


@pytest.mark.parametrize("length", [0, -1, 10_000, "abc"])
def test_rest_rejects_bad_header_length(length: int | str) -> None:
    body, _ = binary_body(b"\0" * 8, 8)
    with pytest.raises(CodecError, match=HEADER_LENGTH):
        decode_rest(body, length)


ARABIC_INDIC_DIGITS = str.maketrans(
    "0123456789", "\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669"
)


@pytest.mark.parametrize(
    "spelling",
    [
        lambda n: f"{n[0]}_{n[1:]}",
        lambda n: f" +{n} ",
        lambda n: f"+{n}",
        lambda n: n.translate(ARABIC_INDIC_DIGITS),
    ],
    ids=["underscore", "spaces and sign", "sign", "arabic-indic digits"],
)
def test_rest_header_length_is_ascii_digits_only(spelling: Callable[[str], str]) -> None:
    """As a Content-Length: int() would take all of these."""
    body, length = binary_body(b"\0" * 8, 8)
    assert length >= 10  # two digits at least, for the underscore
    decode_rest(body, str(length))  # the right length, written plainly: taken
    with pytest.raises(CodecError, match=f"{HEADER_LENGTH} must be an integer"):
        decode_rest(body, spelling(str(length)))


def test_binary_input_without_header_length_is_rejected() -> None:
    header, _ = binary_body(b"", 8)
    with pytest.raises(CodecError, match="runs past the request body"):
        decode_rest(header)


def test_bool_bytes_are_normalised() -> None:
    body, length = binary_body(b"\0\2", 2, "BOOL")
    assert decode_rest(body, length).inputs[0].data.tolist() == [False, True]


# --- gRPC: requests built by tritonclient.grpc --------------------------------------------------


def grpc_request(arrays: dict[str, np.ndarray], **kwargs: Any) -> pb.ModelInferRequest:
    """A ModelInferRequest built by tritonclient.grpc, re-parsed with our stubs."""
    inputs = [
        tgrpc.InferInput(name, list(array.shape), datatype_of(array.dtype)).set_data_from_numpy(
            array
        )
        for name, array in arrays.items()
    ]
    message = triton_grpc_request(
        model_name="model",
        inputs=inputs,
        model_version="",
        request_id=kwargs.get("request_id", ""),
        outputs=kwargs.get("outputs"),
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=kwargs.get("priority", 0),
        timeout=kwargs.get("timeout"),
        parameters=kwargs.get("parameters"),
    )
    return pb.ModelInferRequest.FromString(message.SerializeToString())


@pytest.mark.parametrize("datatype", DATATYPES)
def test_grpc_raw_request_from_tritonclient(datatype: str) -> None:
    request = decode_grpc(grpc_request({"x": SAMPLES[datatype]}))

    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("x", datatype, (1, 3))
    assert_same(tensor.data, SAMPLES[datatype])
    assert request.id is None


def test_grpc_parameters_and_outputs_from_tritonclient() -> None:
    message = grpc_request(
        {"a": SAMPLES["INT32"], "b": SAMPLES["BYTES"]},
        request_id="r7",
        outputs=[tgrpc.InferRequestedOutput("y"), tgrpc.InferRequestedOutput("z", class_count=3)],
        priority=5,
        timeout=100,
        parameters={"s": "v", "flag": True, "n": -3, "f": 0.25},
    )

    request = decode_grpc(message)

    assert request.id == "r7"
    assert request.parameters == {
        "priority": 5,  # tritonclient sends it as uint64_param
        "timeout": 100,
        "s": "v",
        "flag": True,
        "n": -3,
        "f": 0.25,
    }
    assert request.outputs == [
        RequestedOutput("y", None, {}),
        RequestedOutput("z", None, {"classification": 3}),
    ]
    assert [t.name for t in request.inputs] == ["a", "b"]


TYPED: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def typed_request(datatype: str, values: list[Any], shape: list[int]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="model")
    item = request.inputs.add(name="x", datatype=datatype, shape=shape)
    getattr(item.contents, TYPED.get(datatype, "fp32_contents")).extend(values)
    return request


@pytest.mark.parametrize("datatype", sorted(TYPED))
def test_grpc_typed_contents(datatype: str) -> None:
    expected = SAMPLES[datatype]
    request = typed_request(datatype, expected.reshape(-1).tolist(), [1, 3])
    assert_same(decode_grpc(request).inputs[0].data, expected)


@pytest.mark.parametrize(
    ("datatype", "values", "shape", "match"),
    [
        ("FP16", [1.0], [1], "FP16 data must use raw_input_contents"),
        ("BF16", [1.0], [1], "BF16 is not supported"),
        ("FP32", [1.0, 2.0], [3], "2 values in fp32_contents, shape \\[3\\] needs 3"),
        ("INT8", [1000], [1], "out of range for INT8"),
        ("UINT16", [70000], [1], "out of range for UINT16"),
        ("FP32", [1.0], [-1], "non-negative integers"),
    ],
)
def test_grpc_rejects_bad_typed_contents(
    datatype: str, values: list[Any], shape: list[int], match: str
) -> None:
    with pytest.raises(CodecError, match=match):
        decode_grpc(typed_request(datatype, values, shape))


def test_grpc_raw_contents_must_cover_every_input_alone() -> None:
    request = grpc_request({"a": SAMPLES["FP32"], "b": SAMPLES["FP32"]})
    del request.raw_input_contents[1]
    with pytest.raises(CodecError, match="1 entries for 2 inputs"):
        decode_grpc(request)

    request = grpc_request({"a": SAMPLES["FP32"]})
    request.inputs[0].contents.fp32_contents.extend([1.0, 2.0, 3.0])
    with pytest.raises(CodecError, match="both given"):
        decode_grpc(request)

    request = grpc_request({"a": SAMPLES["FP32"]})
    request.raw_input_contents[0] = b"\0" * 5
    with pytest.raises(CodecError, match="5 bytes of FP32 data"):
        decode_grpc(request)


def test_grpc_rejects_what_numpy_or_a_lookup_by_name_cannot_take() -> None:
    """Refused as the client's mistake (INVALID_ARGUMENT), not met later as a server error
    (numpy's limits, a handler handed no input) or a silent loss (a second input of the same
    name)."""
    with pytest.raises(CodecError, match="the request has no inputs"):
        decode_grpc(pb.ModelInferRequest(model_name="m"))
    request = grpc_request({"a": SAMPLES["FP32"], "b": SAMPLES["FP32"]})
    request.inputs[1].name = "a"
    with pytest.raises(CodecError, match="input 'a' appears more than once"):
        decode_grpc(request)
    for shape, match in (([0, 2**62], "larger than any tensor"), ([1] * 33, "33 dimensions")):
        request = grpc_request({"a": SAMPLES["FP32"]})
        del request.inputs[0].shape[:]
        request.inputs[0].shape.extend(shape)
        request.raw_input_contents[0] = b""
        with pytest.raises(CodecError, match=match):
            decode_grpc(request)
    request = grpc_request({"a": SAMPLES["FP32"]})
    request.outputs.add(name="y").parameters["shared_memory_region"].string_param = "r"
    with pytest.raises(CodecError, match="tensor 'y': shared memory is not supported"):
        decode_grpc(request)


# --- gRPC: responses read by tritonclient.grpc --------------------------------------------------


def triton_grpc_result(message: pb.ModelInferResponse) -> tgrpc.InferResult:
    return tgrpc.InferResult(triton_pb.ModelInferResponse.FromString(message.SerializeToString()))


@pytest.mark.parametrize("datatype", DATATYPES)
def test_grpc_response_read_by_tritonclient(datatype: str) -> None:
    arrays = {"first": SAMPLES["INT8"], "y": SAMPLES[datatype]}
    result = triton_grpc_result(encode_grpc(response_of(arrays)))
    for name, array in arrays.items():
        assert_same(result.as_numpy(name), array)


def test_grpc_response_fields_parameters_and_selection() -> None:
    tensors = [
        Tensor.from_numpy("a", SAMPLES["FP32"], {"unit": "m"}),
        Tensor.from_numpy("b", SAMPLES["BYTES"]),
    ]
    parameters: Parameters = {"b": True, "i": -2, "u": 2**64 - 1, "f": 0.5, "s": "x"}
    response = V2Response("model", None, None, parameters, tensors)

    message = encode_grpc(response, [RequestedOutput("b"), RequestedOutput("a")])

    reply = triton_pb.ModelInferResponse.FromString(message.SerializeToString())
    assert (reply.model_name, reply.model_version, reply.id) == ("model", "", "")
    assert [o.name for o in reply.outputs] == ["b", "a"]
    assert reply.outputs[1].parameters["unit"].string_param == "m"
    assert reply.parameters["u"].uint64_param == 2**64 - 1
    assert reply.parameters["i"].int64_param == -2
    assert reply.parameters["f"].double_param == 0.5
    assert reply.parameters["b"].bool_param is True
    assert_same(tgrpc.InferResult(reply).as_numpy("a"), SAMPLES["FP32"])
    with pytest.raises(CodecError, match="unknown output"):
        encode_grpc(response, [RequestedOutput("nope")])


def test_grpc_round_trip_through_our_own_decoder() -> None:
    arrays = {name: SAMPLES[name] for name in DATATYPES}
    message = encode_grpc(response_of(arrays))
    request = pb.ModelInferRequest(inputs=[], raw_input_contents=message.raw_output_contents)
    for output in message.outputs:
        request.inputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
    for tensor in decode_grpc(request).inputs:
        assert_same(tensor.data, arrays[tensor.name])
