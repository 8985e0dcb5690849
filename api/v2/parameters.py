"""The request parameters the v2 protocol reserves: checked as Triton checks them, and given
their meaning here (`RequestOptions`):

- `sequence_id` (unsigned integer or string; 0 or "" is none): the request's sequence, as
  TorchServe's `ts_request_sequence_id` header (sequence batching);
- `sequence_start`, `sequence_end` (booleans): TorchServe's `ts_request_sequence_start` and
  `ts_request_sequence_end` headers, which the handler sees;
- `priority` (unsigned integer): checked, then not used, as a version has one queue; a
  warning says so once per model;
- `timeout` (unsigned integer, microseconds; 0 is none): how long the request may wait in the
  queue, past which it is answered 504 without running; the model's `responseTimeout` bounds
  it too;
- `binary_data_output` (boolean, REST): outputs without their own `binary_data` go binary;
- `triton_enable_empty_final_response` (boolean, gRPC `ModelStreamInfer`): a streamed request
  ends with an empty response that carries the final flag.

Every other key that starts with `triton_` is refused, as Triton refuses it: REST takes none,
gRPC only the last one above. Other parameters are the handler's, passed on as sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from api.v2.tensors import CodecError, Parameters, ParamValue

# Set on every ModelStreamInfer response: whether it is the request's last.
FINAL_RESPONSE: Final = "triton_final_response"
EMPTY_FINAL_RESPONSE: Final = "triton_enable_empty_final_response"
_RESERVED_PREFIX: Final = "triton_"


@dataclass(frozen=True, slots=True)
class RequestOptions:
    """What a request's reserved parameters ask for (see the module docstring)."""

    sequence_id: str | None = None
    sequence_start: bool = False
    sequence_end: bool = False
    priority: int = 0
    timeout_us: int = 0
    binary_data_output: bool = False
    empty_final_response: bool = False


def request_options(parameters: Parameters, *, grpc: bool) -> RequestOptions:
    """The reserved parameters of a request, checked; CodecError (400) for a wrong type or a
    `triton_` key the transport does not take."""
    allowed = {EMPTY_FINAL_RESPONSE} if grpc else set()
    for key in parameters:
        if key.startswith(_RESERVED_PREFIX) and key not in allowed:
            only = f"; only {EMPTY_FINAL_RESPONSE} is allowed" if grpc else ""
            raise CodecError(
                f"parameter keys starting with '{_RESERVED_PREFIX}' are reserved for Triton "
                f"usage and should not be specified ({key!r}{only})"
            )
    return RequestOptions(
        sequence_id=sequence_named(parameters.get("sequence_id")),
        sequence_start=_bool(parameters, "sequence_start"),
        sequence_end=_bool(parameters, "sequence_end"),
        priority=_unsigned(parameters, "priority"),
        timeout_us=_unsigned(parameters, "timeout"),
        binary_data_output=_bool(parameters, "binary_data_output"),
        empty_final_response=_bool(parameters, EMPTY_FINAL_RESPONSE),
    )


def sequence_named(value: ParamValue | None) -> str | None:
    """The sequence a `sequence_id` value names: None for none (absent, 0 or ""); CodecError
    for a value of the wrong type."""
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value) if value else None
    raise CodecError(
        f"Unable to parse 'sequence_id': expected an unsigned integer or a string, got {value!r}"
    )


def _bool(parameters: Parameters, key: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise CodecError(f"Unable to parse '{key}': expected a boolean, got {value!r}")
    return value


def _unsigned(parameters: Parameters, key: str) -> int:
    value = parameters.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CodecError(f"Unable to parse '{key}': expected an unsigned integer, got {value!r}")
    return value
