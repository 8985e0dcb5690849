"""KServe v2 (Open Inference Protocol) wire formats: decode requests, encode responses.

One codec for both transports, so REST and gRPC agree on every rule:

- REST JSON: ``data`` is a flat or nested row-major list; BYTES elements are UTF-8 strings;
  non-finite floats are the tokens ``NaN``, ``Infinity`` and ``-Infinity``, both ways, as Triton.
- REST with Triton's binary tensor extension: the body is N bytes of JSON (N from the
  ``Inference-Header-Content-Length`` header) followed by the raw bytes of each input that has
  ``"parameters": {"binary_data_size": k}``, in input order. Outputs go binary when asked per
  output (``"binary_data": true``) or for the whole request (``"binary_data_output": true``).
- gRPC ``ModelInfer``: typed ``contents`` per input, or ``raw_input_contents`` for all inputs;
  responses always use ``raw_output_contents`` (what ``tritonclient.grpc`` reads first).

A request the client got wrong raises :class:`CodecError`. This module imports neither web nor
gRPC frameworks: it reads protobuf messages, and loads the generated message classes only when
it first builds a gRPC response.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any, Final, cast

import numpy as np
import orjson

from api.v2.tensors import (
    DTYPES,
    CodecError,
    Parameters,
    ParamValue,
    RequestedOutput,
    Tensor,
    V2Request,
    V2Response,
    as_bytes,
    checked_data,
    datatype_of,
    from_raw,
    narrow,
    numpy_dtype,
    object_array,
    to_raw,
)

if TYPE_CHECKING:
    from api.rpc.generated import grpc_predict_v2_pb2 as pb

__all__ = [
    "HEADER_LENGTH",
    "CodecError",
    "ParamValue",
    "Parameters",
    "RequestedOutput",
    "Tensor",
    "V2Request",
    "V2Response",
    "datatype_of",
    "decode_grpc",
    "decode_rest",
    "encode_grpc",
    "encode_rest",
    "grpc_parameter",
    "numpy_dtype",
]

HEADER_LENGTH: Final = "Inference-Header-Content-Length"

# Which numpy kinds a JSON list may parse to for each target kind: ints widen to floats, but
# floats never truncate to ints and strings never parse as numbers.
_JSON_KINDS: Final = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
_END: Final = object()  # marks an exhausted iterator in `_collect_strings`

# The tokens tritonclient (python-rapidjson) writes for non-finite floats and Triton reads and
# writes (rapidjson's kParseNanAndInfFlag, kWriteNanAndInfFlag); orjson reads none of them.
_NON_FINITE: Final = ("NaN", "Infinity")  # "-Infinity": orjson stops past the sign

# gRPC typed contents: the field that carries each datatype, and that field's element type.
# FP16 (and BF16) have no field: they travel only as raw contents.
_CONTENTS: Final = {
    "BOOL": ("bool_contents", np.dtype("?")),
    "INT8": ("int_contents", np.dtype("i4")),
    "INT16": ("int_contents", np.dtype("i4")),
    "INT32": ("int_contents", np.dtype("i4")),
    "INT64": ("int64_contents", np.dtype("i8")),
    "UINT8": ("uint_contents", np.dtype("u4")),
    "UINT16": ("uint_contents", np.dtype("u4")),
    "UINT32": ("uint_contents", np.dtype("u4")),
    "UINT64": ("uint64_contents", np.dtype("u8")),
    "FP32": ("fp32_contents", np.dtype("f4")),
    "FP64": ("fp64_contents", np.dtype("f8")),
    "BYTES": ("bytes_contents", np.dtype("O")),
}


# --- REST -----------------------------------------------------------------------------------


def decode_rest(body: bytes, header_length: int | str | None = None) -> V2Request:
    """Decode a v2 REST inference body.

    ``header_length`` is the ``Inference-Header-Content-Length`` header, as int or as sent
    (absent: the whole body is JSON). The body must already be decompressed.
    """
    view = memoryview(body)
    if header_length is None:
        header, binary = view, view[:0]
    else:
        length = _header_length(header_length, len(view))
        header, binary = view[:length], view[length:]
    doc = _json_document(header)
    if not isinstance(doc, dict):
        raise CodecError("request body must be a JSON object")

    inputs: list[Tensor] = []
    offset = 0
    for item in _list(doc.get("inputs"), "inputs", required=True):
        tensor, offset = _rest_input(item, binary, offset)
        inputs.append(tensor)
    if offset != len(binary):
        raise CodecError(
            f"{len(binary) - offset} bytes of binary data follow the JSON header "
            "but no input's binary_data_size claims them"
        )
    return V2Request(
        id=_optional_str(doc.get("id"), "id"),
        parameters=_parameters(doc.get("parameters"), "request"),
        inputs=_checked_inputs(inputs),
        outputs=[_rest_output(item) for item in _list(doc.get("outputs"), "outputs")],
    )


def encode_rest(
    response: V2Response,
    requested: Sequence[RequestedOutput] = (),
    binary_default: bool = False,
) -> tuple[bytes, dict[str, str]]:
    """Encode a v2 REST response body, and the headers that must go with it.

    Only ``requested`` outputs are returned, in their order, when any are named; otherwise all.
    An output is binary when its request says ``binary_data``, else when ``binary_default`` (the
    request's ``binary_data_output``). With any binary output the body is the JSON header
    followed by raw bytes, ``Content-Type`` is ``application/octet-stream`` and
    ``Inference-Header-Content-Length`` gives the header's size; otherwise plain JSON.
    """
    flags: dict[str, bool | None] = {}
    for output in requested:
        flags.setdefault(output.name, output.binary_data)  # a name asked twice: the first says
    entries: list[dict[str, Any]] = []
    chunks: list[bytes | memoryview] = []
    for tensor in _select(response.outputs, requested):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": tensor.shape,
        }
        parameters = tensor.parameters
        binary = flags.get(tensor.name)
        if binary_default if binary is None else binary:
            raw = to_raw(tensor)
            chunks.append(raw)
            parameters = {**parameters, "binary_data_size": len(raw)}
        else:
            entry["data"] = _json_data(tensor)
        if parameters:
            entry["parameters"] = parameters
        entries.append(entry)

    doc: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version is not None:
        doc["model_version"] = response.model_version
    if response.id is not None:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = response.parameters
    doc["outputs"] = entries
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, {"Content-Type": "application/json"}
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
    return b"".join([header, *chunks]), headers


def _json_document(header: memoryview) -> Any:
    """The parsed JSON header. orjson reads every well-formed request; only a document it
    refuses at a NaN or Infinity token is read again, by the json module, which takes those."""
    try:
        return orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        if not exc.doc[exc.pos : exc.pos + 8].startswith(_NON_FINITE):
            raise CodecError(f"request body is not valid JSON: {exc}") from None
        return _json_with_non_finite(exc.doc)


def _json_with_non_finite(text: str) -> Any:
    """`text` parsed with NaN and (-)Infinity taken, and numbers and strings held to orjson's
    rules: a number too large for a float (1e400) is refused, not read as infinity."""
    try:
        doc = json.loads(text, parse_float=_finite_float)
        if "\\u" in text:
            # An escape may make a lone surrogate, which json takes and orjson does not (it
            # could not write it back either): encoding to UTF-8 refuses those.
            json.dumps(doc, ensure_ascii=False).encode()
    except (ValueError, RecursionError) as exc:
        raise CodecError(f"request body is not valid JSON: {exc}") from None
    return doc


def _finite_float(literal: str) -> float:
    number = float(literal)
    if math.isinf(number):  # the tokens come through parse_constant: this was a literal
        raise ValueError(f"number out of range: {literal}")
    return number


def _header_length(value: int | str, body_length: int) -> int:
    # Digits only, as a Content-Length: int() would also take signs, spaces, underscores and
    # non-ASCII digits (Arabic-Indic ones, say).
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise CodecError(f"{HEADER_LENGTH} must be an integer, got {value!r}")
    length = int(value)
    if not 0 < length <= body_length:
        raise CodecError(f"{HEADER_LENGTH} {length} is outside the {body_length}-byte body")
    return length


def _rest_input(item: object, binary: memoryview, offset: int) -> tuple[Tensor, int]:
    """Decode one ``inputs`` entry; returns the tensor and the offset past its binary data."""
    if not isinstance(item, dict):
        raise CodecError("each input must be a JSON object")
    name = _str(item.get("name"), "input name")
    datatype = _str(item.get("datatype"), f"input {name!r} datatype")
    shape = _shape(item.get("shape"), name)
    parameters = _parameters(item.get("parameters"), f"input {name!r}")
    _reject_shared_memory(parameters, name)
    size = parameters.pop("binary_data_size", None)
    if size is None:
        if "data" not in item:
            raise CodecError(f"input {name!r} has neither data nor binary_data_size")
        data = _from_json(name, datatype, shape, item["data"])
        return Tensor(name, datatype, shape, data, parameters), offset
    if "data" in item:
        raise CodecError(f"input {name!r} has both data and binary_data_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise CodecError(f"input {name!r}: binary_data_size must be a non-negative integer")
    end = offset + size
    if end > len(binary):
        raise CodecError(f"input {name!r}: binary_data_size {size} runs past the request body")
    data = from_raw(name, datatype, shape, binary[offset:end])
    return Tensor(name, datatype, shape, data, parameters), end


def _rest_output(item: object) -> RequestedOutput:
    if not isinstance(item, dict):
        raise CodecError("each requested output must be a JSON object")
    name = _str(item.get("name"), "output name")
    parameters = _parameters(item.get("parameters"), f"output {name!r}")
    _reject_shared_memory(parameters, name)
    binary = parameters.pop("binary_data", None)
    if binary is not None and not isinstance(binary, bool):
        raise CodecError(f"output {name!r}: binary_data must be a boolean")
    return RequestedOutput(name, binary, parameters)


def _from_json(name: str, datatype: str, shape: tuple[int, ...], data: object) -> np.ndarray:
    count = math.prod(shape)
    if not isinstance(data, list):
        raise CodecError(f"input {name!r}: data must be a JSON array")
    if datatype == "BYTES":
        items: list[bytes] = []
        _collect_strings(data, items, name)
        _check_count(name, len(items), count, shape)
        return object_array(items).reshape(shape)

    dtype = numpy_dtype(datatype)
    try:
        parsed = np.asarray(data)
    except (ValueError, OverflowError):
        raise CodecError(f"input {name!r}: data is not a regular array of numbers") from None
    _check_count(name, parsed.size, count, shape)
    if count == 0:
        return np.empty(shape, dtype)
    if dtype.kind != "b" and _holds_booleans(data, parsed):
        raise CodecError(f"input {name!r}: data does not hold {datatype} values (a boolean)")
    if dtype.kind in "iu" and parsed.dtype.kind in "fO":
        # numpy reads Python ints past int64 (UINT64 above 2**63) as floats or objects: reread
        # them exactly if they all are ints. Rare, so a Python-level check is fine here.
        values = np.asarray(data, dtype=object).reshape(-1).tolist()
        if not all(type(value) is int for value in values):
            raise CodecError(f"input {name!r}: data does not hold {datatype} values")
        try:
            parsed = np.asarray(values, dtype=dtype)
        except OverflowError:
            raise CodecError(f"input {name!r}: value out of range for {datatype}") from None
    if parsed.dtype.kind not in _JSON_KINDS[dtype.kind]:
        raise CodecError(f"input {name!r}: data does not hold {datatype} values")
    return narrow(name, parsed, dtype).reshape(shape)


def _holds_booleans(data: list[Any], parsed: np.ndarray) -> bool:
    """Whether numeric JSON `data` (read by numpy as `parsed`) holds a true or false, which
    numpy silently reads as 1 or 0 among numbers."""
    # A boolean can only hide as a 0 or 1, so data without either (most float data) is never
    # walked; other data is walked in C (map, set), ~20 ms a million elements.
    if parsed.dtype.kind not in "iuf" or not ((parsed == 0) | (parsed == 1)).any():
        return False
    leaves: Iterable[Any] = data
    for _ in range(parsed.ndim - 1):  # numpy took `data` as regular: ndim levels of lists
        leaves = chain.from_iterable(leaves)
    return bool in set(map(type, leaves))


def _collect_strings(data: list[Any], out: list[bytes], name: str) -> None:
    # A loop, not recursion: orjson parses nesting up to 1,024 deep, past Python's stack limit.
    stack = [iter(data)]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, str):
            out.append(item.encode())
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            raise CodecError(f"input {name!r}: BYTES data must be JSON strings")


def _json_data(tensor: Tensor) -> np.ndarray | list[str] | orjson.Fragment:
    """Flat row-major data; numeric arrays stay arrays for orjson's numpy serializer."""
    data = checked_data(tensor)
    if tensor.datatype != "BYTES":
        dtype = numpy_dtype(tensor.datatype)
        flat = np.ascontiguousarray(data, dtype=dtype).reshape(-1)
        if dtype.kind == "f" and not np.isfinite(flat).all():
            return _with_non_finite_tokens(flat)
        return flat
    try:
        return [
            item if isinstance(item, str) else as_bytes(item).decode()
            for item in data.reshape(-1).tolist()
        ]
    except UnicodeDecodeError:
        raise CodecError(
            f"output {tensor.name!r} is not UTF-8 text; request it with binary_data"
        ) from None


def _with_non_finite_tokens(flat: np.ndarray) -> orjson.Fragment:
    """Float data as JSON with NaN, Infinity and -Infinity written as such, as Triton writes
    them, where orjson writes null (which a client reads back as NaN, whatever the value)."""
    # In a float array's JSON every null is a non-finite value, in order: replace each with
    # its token, and keep orjson's shortest float forms for the rest.
    dumped = orjson.dumps(flat, option=orjson.OPT_SERIALIZE_NUMPY)
    non_finite = flat[~np.isfinite(flat)]
    kinds = np.where(np.isnan(non_finite), 0, np.where(non_finite > 0, 1, 2))
    if (kinds == kinds[0]).all():  # one kind (a mask of -inf, say): one pass in C
        return orjson.Fragment(dumped.replace(b"null", _TOKENS[kinds[0]]))
    pieces = dumped.split(b"null")
    tokens = [_TOKENS[kind] for kind in kinds.tolist()]
    return orjson.Fragment(
        pieces[0] + b"".join(chain.from_iterable(zip(tokens, pieces[1:], strict=True)))
    )


_TOKENS: Final = (b"NaN", b"Infinity", b"-Infinity")


# --- gRPC -----------------------------------------------------------------------------------


def decode_grpc(request: pb.ModelInferRequest) -> V2Request:
    """Decode a ``ModelInferRequest``: typed ``contents``, or ``raw_input_contents`` for all."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise CodecError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs"
        )
    inputs: list[Tensor] = []
    for index, item in enumerate(request.inputs):
        name, datatype = item.name, item.datatype
        shape = _shape(list(item.shape), name)
        parameters = _from_grpc_parameters(item.parameters)
        _reject_shared_memory(parameters, name)
        if raw:
            if item.HasField("contents"):
                raise CodecError(f"input {name!r}: contents and raw_input_contents both given")
            data = from_raw(name, datatype, shape, raw[index])
        else:
            data = _from_contents(name, datatype, shape, item.contents)
        inputs.append(Tensor(name, datatype, shape, data, parameters))
    return V2Request(
        id=request.id or None,
        parameters=_from_grpc_parameters(request.parameters),
        inputs=_checked_inputs(inputs),
        outputs=[_grpc_output(output) for output in request.outputs],
    )


def _grpc_output(output: pb.ModelInferRequest.InferRequestedOutputTensor) -> RequestedOutput:
    parameters = _from_grpc_parameters(output.parameters)
    _reject_shared_memory(parameters, output.name)
    return RequestedOutput(output.name, None, parameters)


def encode_grpc(
    response: V2Response, requested: Sequence[RequestedOutput] = ()
) -> pb.ModelInferResponse:
    """Encode a ``ModelInferResponse`` with every output in ``raw_output_contents``.

    Only ``requested`` outputs are returned, in their order, when any are named; otherwise all.
    """
    # Imported here so that the REST path works without generated stubs.
    from api.rpc.generated import grpc_predict_v2_pb2 as pb

    message = pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version or "",
        id=response.id or "",
    )
    _to_grpc_parameters(response.parameters, message.parameters)
    raw: list[bytes] = []
    for tensor in _select(response.outputs, requested):
        output = message.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        _to_grpc_parameters(tensor.parameters, output.parameters)
        raw.append(bytes(to_raw(tensor)))
    message.raw_output_contents.extend(raw)
    return message


def _from_contents(
    name: str, datatype: str, shape: tuple[int, ...], contents: pb.InferTensorContents
) -> np.ndarray:
    try:
        field_name, wire_dtype = _CONTENTS[datatype]
    except KeyError:
        numpy_dtype(datatype)  # unknown or BF16: raises the precise error
        raise CodecError(f"input {name!r}: {datatype} data must use raw_input_contents") from None
    values = getattr(contents, field_name)
    count = math.prod(shape)
    if len(values) != count:
        raise CodecError(
            f"input {name!r}: {len(values)} values in {field_name}, "
            f"shape {list(shape)} needs {count}"
        )
    if datatype == "BYTES":
        return object_array(list(values)).reshape(shape)
    wide = np.fromiter(values, wire_dtype, count)
    return narrow(name, wide, DTYPES[datatype]).reshape(shape)


def _from_grpc_parameters(parameters: Mapping[str, pb.InferParameter]) -> Parameters:
    decoded: Parameters = {}
    for key, parameter in parameters.items():
        value = grpc_parameter(parameter)
        if value is None:
            raise CodecError(
                f"parameter {key!r} has no value: expected bool_param, int64_param, "
                "string_param, double_param or uint64_param"
            )
        decoded[key] = value
    return decoded


def grpc_parameter(parameter: pb.InferParameter) -> ParamValue | None:
    """An `InferParameter`'s value; None when unset (or a choice newer than this proto)."""
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else cast(ParamValue, getattr(parameter, choice))


def _to_grpc_parameters(
    parameters: Parameters, target: MutableMapping[str, pb.InferParameter]
) -> None:
    for key, value in parameters.items():
        slot = target[key]
        if isinstance(value, bool):  # before int: a bool is an int
            slot.bool_param = value
        elif isinstance(value, int):
            if value >= 1 << 63:
                slot.uint64_param = value
            else:
                slot.int64_param = value
        elif isinstance(value, float):
            slot.double_param = value
        elif isinstance(value, str):
            slot.string_param = value
        else:
            raise TypeError(f"parameter {key!r}: {type(value).__name__} is not a v2 parameter")


# --- shared -----------------------------------------------------------------------------------


def _select(outputs: list[Tensor], requested: Sequence[RequestedOutput]) -> list[Tensor]:
    """The requested outputs in request order; a name asked for twice is sent once, as Triton
    merges it."""
    if not requested:
        return outputs
    by_name = {tensor.name: tensor for tensor in outputs}
    names = dict.fromkeys(output.name for output in requested)  # ordered, without repeats
    try:
        return [by_name[name] for name in names]
    except KeyError as exc:
        raise CodecError(f"unknown output {exc.args[0]!r} requested") from None


def _check_count(name: str, actual: int, expected: int, shape: tuple[int, ...]) -> None:
    if actual != expected:
        raise CodecError(
            f"input {name!r}: {actual} elements in data, shape {list(shape)} needs {expected}"
        )


# numpy's bounds on an array, which a shape is checked against before any array is made:
# dimensions (32 in numpy 1.x, which the project allows; 64 in 2.x), and elements (those of
# the non-zero dimensions, of up to 8 bytes each, must count fewer bytes than an int64 holds,
# even where a zero dimension leaves none).
_MAX_DIMENSIONS = 32
_MAX_ELEMENTS = 2**59


def _shape(value: object, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in value
    ):
        raise CodecError(f"input {name!r}: shape must be a list of non-negative integers")
    if len(value) > _MAX_DIMENSIONS:
        raise CodecError(
            f"input {name!r}: shape has {len(value)} dimensions, at most {_MAX_DIMENSIONS}"
        )
    if math.prod(dim for dim in value if dim) > _MAX_ELEMENTS:
        raise CodecError(f"input {name!r}: shape {value} is larger than any tensor can be")
    return tuple(value)


def _checked_inputs(inputs: list[Tensor]) -> list[Tensor]:
    """`inputs`, refused when there are none (a handler without a signature would get an item
    with nothing in it) or when two share a name (the later would silently replace the earlier
    where inputs are looked up by name), as Triton refuses both."""
    if not inputs:
        raise CodecError("the request has no inputs: at least one is needed")
    names: set[str] = set()
    for tensor in inputs:
        if tensor.name in names:
            raise CodecError(f"input {tensor.name!r} appears more than once in the request")
        names.add(tensor.name)
    return inputs


def _parameters(value: object, where: str) -> Parameters:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(v, bool | int | float | str) for v in value.values()
    ):
        raise CodecError(f"{where} parameters must map names to strings, numbers or booleans")
    return value


def _reject_shared_memory(parameters: Parameters, name: str) -> None:
    if "shared_memory_region" in parameters:
        raise CodecError(f"tensor {name!r}: shared memory is not supported")


def _list(value: object, what: str, *, required: bool = False) -> Iterable[object]:
    if value is None and not required:
        return ()
    if not isinstance(value, list):
        raise CodecError(f"{what} must be a JSON array")
    return value


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise CodecError(f"{what} must be a string")
    return value


def _optional_str(value: object, what: str) -> str | None:
    return None if value is None else _str(value, what)
