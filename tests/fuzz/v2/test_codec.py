"""Property tests of the KServe v2 codec (`api.v2.codec`): round trips, and malformed input.

Round trip: any tensor torchgate can answer (every datatype, any shape up to a few dimensions,
JSON or binary) is encoded by `encode_rest` / `encode_grpc` and read back by `decode_rest` /
`decode_grpc` (the response's outputs fed back as a request's inputs: the layouts are the same)
unchanged. Malformed input: whatever bytes, header length or JSON document a client sends,
decoding either succeeds or raises `BadRequest` once `bridge.codec_errors()` (what both
transports wrap the codec in) has translated it; never another exception, which would be a 500.

JSON round trips draw finite floats (NaN and infinity travel as Triton's tokens, tested in
tests/v2/test_codec.py); binary round trips draw every float.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from api.errors import BadRequest
from api.rpc.generated import grpc_predict_v2_pb2 as pb
from api.v2.bridge import codec_errors
from api.v2.codec import (
    HEADER_LENGTH,
    Tensor,
    V2Response,
    decode_grpc,
    decode_rest,
    encode_grpc,
    encode_rest,
)
from api.v2.tensors import DTYPES, object_array
from tests.support.fuzzing import fuzz_settings

FLOAT_WIDTHS: dict[str, Literal[16, 32, 64]] = {"FP16": 16, "FP32": 32, "FP64": 64}
NUMERIC = sorted(name for name in DTYPES if name != "BYTES")
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
NAMES = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=8)


@st.composite
def tensors(draw: st.DrawFn, *, finite: bool) -> Tensor:
    """A tensor of any datatype; BYTES elements are UTF-8 text when `finite` (JSON-safe)."""
    datatype = draw(st.sampled_from([*NUMERIC, "BYTES"]))
    shape = draw(SHAPES)
    name = draw(NAMES)
    if datatype == "BYTES":
        element = st.text(max_size=6).map(str.encode) if finite else st.binary(max_size=6)
        items = draw(st.lists(element, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
        return Tensor(name, datatype, shape, object_array(items).reshape(shape))
    width = FLOAT_WIDTHS.get(datatype)
    elements = None  # every value of the dtype, NaN and infinities included
    if finite and width is not None:
        elements = st.floats(width=width, allow_nan=False, allow_infinity=False)
    return Tensor(
        name, datatype, shape, draw(hnp.arrays(DTYPES[datatype], shape, elements=elements))
    )


def unique_names(items: list[Tensor]) -> list[Tensor]:
    return list({tensor.name: tensor for tensor in items}.values())


def assert_same(decoded: list[Tensor], sent: list[Tensor]) -> None:
    assert [t.name for t in decoded] == [t.name for t in sent]
    for got, want in zip(decoded, sent, strict=True):
        assert (got.datatype, got.shape) == (want.datatype, want.shape)
        if want.datatype == "BYTES":
            assert got.data.reshape(-1).tolist() == want.data.reshape(-1).tolist()
        else:
            assert got.data.dtype == want.data.dtype
            np.testing.assert_array_equal(got.data, want.data)


def as_request(body: bytes, headers: dict[str, str]) -> tuple[bytes, str | None]:
    """A response body re-read as a request: `outputs` renamed `inputs`, binary kept as is."""
    length = int(headers.get(HEADER_LENGTH, len(body)))
    doc = orjson.loads(body[:length])
    header = orjson.dumps({"inputs": doc["outputs"]})
    binary = body[length:]
    return header + binary, (str(len(header)) if binary else None)


@fuzz_settings(100)
@given(st.lists(tensors(finite=True), min_size=1, max_size=3).map(unique_names), st.booleans())
def test_rest_round_trip(sent: list[Tensor], binary: bool) -> None:
    response = V2Response("m", "1", None, {}, sent)
    body, headers = encode_rest(response, binary_default=binary)
    assert_same(decode_rest(*as_request(body, headers)).inputs, sent)


@fuzz_settings(60)
@given(st.lists(tensors(finite=False), min_size=1, max_size=3).map(unique_names))
def test_rest_binary_round_trip_of_any_value(sent: list[Tensor]) -> None:
    """Binary tensors carry every bit pattern: NaN, infinities, non-UTF-8 BYTES."""
    body, headers = encode_rest(V2Response("m", None, None, {}, sent), binary_default=True)
    assert_same(decode_rest(*as_request(body, headers)).inputs, sent)


@fuzz_settings(60)
@given(st.lists(tensors(finite=False), min_size=1, max_size=3).map(unique_names))
def test_grpc_round_trip(sent: list[Tensor]) -> None:
    message = encode_grpc(V2Response("m", "1", None, {}, sent))
    request = pb.ModelInferRequest(model_name="m")
    for output in message.outputs:
        request.inputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
    request.raw_input_contents.extend(message.raw_output_contents)
    wire = request.SerializeToString()  # through the wire format, as a client would send it
    assert_same(decode_grpc(pb.ModelInferRequest.FromString(wire)).inputs, sent)


def decodes_or_refuses(body: bytes, header_length: str | None) -> None:
    try:
        with codec_errors():
            decode_rest(body, header_length)
    except BadRequest:
        pass


@fuzz_settings(150)
@given(st.binary(max_size=256), st.none() | st.integers(-5, 300).map(str) | st.text(max_size=4))
def test_rest_arbitrary_bytes(body: bytes, header_length: str | None) -> None:
    decodes_or_refuses(body, header_length)


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5)
)
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)
WIRE_DATATYPES = st.sampled_from([*DTYPES, "BF16", "FP8", ""]) | JSON


@st.composite
def input_entries(draw: st.DrawFn) -> dict[str, Any]:
    """An `inputs` entry that is nearly right: each field is sometimes valid, sometimes not."""
    entry: dict[str, Any] = {}
    fields = {
        "name": NAMES | JSON,
        "datatype": WIRE_DATATYPES,
        "shape": st.lists(st.integers(-2, 5), max_size=3) | JSON,
        "data": st.lists(JSON_SCALARS, max_size=8)
        | st.lists(st.lists(st.integers(-300, 300), max_size=3), max_size=3)
        | JSON,
        "parameters": st.fixed_dictionaries(
            {}, optional={"binary_data_size": st.integers(-2, 64) | JSON}
        )
        | JSON,
    }
    for key, strategy in fields.items():
        if draw(st.integers(0, 4)):  # mostly present
            entry[key] = draw(strategy)
    return entry


@fuzz_settings(100)
@given(
    st.fixed_dictionaries(
        {"inputs": st.lists(input_entries(), max_size=3) | JSON},
        optional={
            "outputs": st.lists(
                st.fixed_dictionaries({"name": NAMES}, optional={"parameters": JSON}), max_size=2
            )
            | JSON,
            "parameters": JSON,
            "id": JSON,
        },
    ),
    st.binary(max_size=64),
)
def test_rest_malformed_documents(doc: dict[str, Any], binary: bytes) -> None:
    header = json.dumps(doc).encode()  # not orjson: it refuses integers past 64 bits
    decodes_or_refuses(header + binary, str(len(header)) if binary else None)
    decodes_or_refuses(header, None)


@fuzz_settings(100)
@given(
    st.lists(tensors(finite=False), min_size=1, max_size=2).map(unique_names),
    st.data(),
)
def test_rest_binary_mutations(sent: list[Tensor], data: st.DataObject) -> None:
    """A valid binary request with its body cut, extended or bytes changed, or a wrong length."""
    body, headers = encode_rest(V2Response("m", None, None, {}, sent), binary_default=True)
    request, header_length = as_request(body, headers)
    mutation = data.draw(st.sampled_from(["cut", "extend", "flip", "length"]))
    if mutation == "cut":
        request = request[: data.draw(st.integers(0, max(len(request) - 1, 0)))]
    elif mutation == "extend":
        request += data.draw(st.binary(min_size=1, max_size=16))
    elif mutation == "flip" and request:
        index = data.draw(st.integers(0, len(request) - 1))
        request = request[:index] + bytes([request[index] ^ 0xFF]) + request[index + 1 :]
    else:
        header_length = data.draw(st.integers(-1, len(request) + 2).map(str))
    decodes_or_refuses(request, header_length)


@fuzz_settings(100)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "name": NAMES,
                "datatype": st.sampled_from([*DTYPES, "BF16", "X"]),
                "shape": st.lists(st.integers(-2, 5), max_size=3),
            }
        ),
        max_size=3,
    ),
    st.lists(st.binary(max_size=24), max_size=4),
    st.lists(st.integers(-(2**40), 2**40), max_size=8),
    st.lists(st.floats(width=32), max_size=8),
)
def test_grpc_malformed_requests(
    inputs: list[dict[str, Any]], raw: list[bytes], ints: list[int], floats: list[float]
) -> None:
    """Shapes, datatypes, raw and typed contents that may disagree with each other."""
    request = pb.ModelInferRequest(model_name="m")
    for index, item in enumerate(inputs):
        tensor = request.inputs.add(name=item["name"], datatype=item["datatype"])
        tensor.shape.extend(item["shape"])
        if not raw and index % 2 == 0:
            tensor.contents.int64_contents.extend(ints)
            tensor.contents.fp32_contents.extend(floats)
            tensor.contents.int_contents.extend(i for i in ints if -(2**31) <= i < 2**31)
            tensor.contents.bytes_contents.extend(raw)
    request.raw_input_contents.extend(raw)
    try:
        with codec_errors():
            decode_grpc(request)
    except BadRequest:
        pass


@pytest.mark.parametrize("datatype", [*DTYPES])
def test_shape_far_larger_than_the_data_is_refused_at_once(datatype: str) -> None:
    """A huge declared shape with little data: refused from the lengths, nothing allocated."""
    shape = [2**20, 2**20, 2**20]
    doc = {"inputs": [{"name": "x", "datatype": datatype, "shape": shape, "data": [1]}]}
    with pytest.raises(BadRequest), codec_errors():
        decode_rest(orjson.dumps(doc))
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": datatype,
                    "shape": shape,
                    "parameters": {"binary_data_size": 4},
                }
            ]
        }
    )
    with pytest.raises(BadRequest), codec_errors():
        decode_rest(header + b"\x01\x00\x00\x00", str(len(header)))
