"""KServe v2 tensors: datatypes, the decoded request and response, and the raw byte layout.

Raw layout (Triton's binary extension over REST, ``raw_*_contents`` over gRPC): little-endian,
row-major, no padding; BOOL is one byte; each BYTES element is a 4-byte little-endian length
followed by its bytes. Wire formats live in :mod:`api.v2.codec`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

import numpy as np

ParamValue: TypeAlias = bool | int | float | str
Parameters: TypeAlias = dict[str, ParamValue]


class CodecError(ValueError):
    """The request is malformed: unknown datatype, bad shape, data that does not fit the shape.

    Always the client's fault (HTTP 400 / gRPC INVALID_ARGUMENT). A response tensor that cannot
    be encoded is a server bug and raises ``TypeError`` or plain ``ValueError`` instead.
    """


# Wire datatypes and their numpy dtypes, little-endian as the wire is. BYTES elements are
# Python `bytes` in an object array.
DTYPES: Final[dict[str, np.dtype[Any]]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype("O"),
}
_DATATYPES: Final = {dtype: name for name, dtype in DTYPES.items()}
_LENGTH = struct.Struct("<I")


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of a wire datatype; :class:`CodecError` for BF16 and unknown names."""
    try:
        return DTYPES[datatype]
    except KeyError:
        if datatype == "BF16":
            raise CodecError("datatype BF16 is not supported (numpy has no bfloat16)") from None
        raise CodecError(f"unknown datatype {datatype!r}") from None


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The wire datatype of a numpy dtype; object, bytes and str arrays are BYTES."""
    if dtype.kind in "OSU":
        return "BYTES"
    try:
        return _DATATYPES[dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype]
    except KeyError:
        raise TypeError(f"numpy dtype {dtype} has no KServe v2 datatype") from None


@dataclass(slots=True)
class Tensor:
    """A named tensor; ``data.shape == shape`` and ``data.dtype`` matches ``datatype``.

    Arrays decoded from binary or raw contents are read-only views of the request body (no
    copy): copy before writing to them, and before ``torch.from_numpy``, which warns on them.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    parameters: Parameters = field(default_factory=dict)

    @classmethod
    def from_numpy(
        cls, name: str, data: np.ndarray, parameters: Parameters | None = None
    ) -> Tensor:
        """A tensor whose datatype and shape are those of ``data``."""
        return cls(name, datatype_of(data.dtype), data.shape, data, parameters or {})


@dataclass(slots=True)
class RequestedOutput:
    """An output the client asked for; ``binary_data`` None means "as the request default"."""

    name: str
    binary_data: bool | None = None
    parameters: Parameters = field(default_factory=dict)


@dataclass(slots=True)
class V2Request:
    """A decoded inference request.

    Per-tensor transport parameters (``binary_data_size``, ``binary_data``) are removed while
    decoding; request parameters are kept as sent, the reserved ones included
    (:mod:`api.v2.parameters` reads those).
    """

    id: str | None
    parameters: Parameters
    inputs: list[Tensor]
    outputs: list[RequestedOutput]


@dataclass(slots=True)
class V2Response:
    model_name: str
    model_version: str | None
    id: str | None
    parameters: Parameters
    outputs: list[Tensor]


def from_raw(
    name: str, datatype: str, shape: tuple[int, ...], raw: bytes | memoryview
) -> np.ndarray:
    """Decode one tensor's raw bytes; the byte length must match the shape exactly."""
    count = math.prod(shape)
    if datatype == "BYTES":
        return _unpack_bytes(name, raw, count).reshape(shape)
    dtype = numpy_dtype(datatype)
    if len(raw) != count * dtype.itemsize:
        raise CodecError(
            f"input {name!r}: {len(raw)} bytes of {datatype} data, "
            f"shape {list(shape)} needs {count * dtype.itemsize}"
        )
    if datatype == "BOOL":
        # Normalise: a byte other than 0/1 would make a bool array that compares oddly.
        return np.frombuffer(raw, np.uint8).astype(bool).reshape(shape)
    return np.frombuffer(raw, dtype).reshape(shape)


def to_raw(tensor: Tensor) -> bytes | memoryview:
    """One tensor's raw bytes; numeric data is a view of a contiguous array, not a copy."""
    data = checked_data(tensor)
    if tensor.datatype == "BYTES":
        return _pack_bytes(data)
    if data.size == 0:
        return b""  # memoryview refuses to cast a view with a zero in its shape
    return np.ascontiguousarray(data, dtype=numpy_dtype(tensor.datatype)).data.cast("B")


def checked_data(tensor: Tensor) -> np.ndarray:
    """``tensor.data`` after checking it holds as many elements as ``tensor.shape`` says."""
    if tensor.data.size != math.prod(tensor.shape):
        raise ValueError(
            f"output {tensor.name!r}: {tensor.data.size} elements for shape {list(tensor.shape)}"
        )
    return tensor.data


def narrow(name: str, values: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """Cast to ``dtype``, refusing values that do not fit: an integer cast would wrap silently,
    and a float one turn a finite number into infinity (70000 as FP16, 1e39 as FP32)."""
    if values.dtype == dtype:
        return values
    if dtype.kind in "iu" and values.size:
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise CodecError(f"input {name!r}: value out of range for {_DATATYPES[dtype]}")
    if dtype.kind == "f" and values.size:
        with np.errstate(over="ignore"):
            narrowed = values.astype(dtype)
        infinite = np.isinf(narrowed)
        if infinite.any() and (infinite & ~np.isinf(values)).any():
            raise CodecError(f"input {name!r}: value out of range for {_DATATYPES[dtype]}")
        return narrowed
    return values.astype(dtype)


def object_array(items: Sequence[bytes]) -> np.ndarray:
    """A 1-D object array of ``items``."""
    # Filled by assignment: np.array(list_of_bytes) would make a fixed-width 'S' array.
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def as_bytes(item: object) -> bytes:
    """A BYTES element as ``bytes``; ``str`` is encoded as UTF-8."""
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode()
    if isinstance(item, bytearray | memoryview):
        return bytes(item)
    raise TypeError(f"a BYTES element must be bytes or str, not {type(item).__name__}")


def _unpack_bytes(name: str, raw: bytes | memoryview, count: int) -> np.ndarray:
    items: list[bytes] = []
    offset, end = 0, len(raw)
    # Bounded by the buffer, not by `count`: a huge shape cannot make us loop or allocate.
    while offset < end:
        if offset + 4 > end:
            raise CodecError(f"input {name!r}: truncated BYTES length prefix")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > end:
            raise CodecError(f"input {name!r}: BYTES element runs past its data")
        items.append(bytes(raw[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise CodecError(f"input {name!r}: {len(items)} BYTES elements, shape needs {count}")
    return object_array(items)


def _pack_bytes(data: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for item in data.reshape(-1).tolist():
        element = as_bytes(item)
        parts.append(_LENGTH.pack(len(element)))
        parts.append(element)
    return b"".join(parts)
