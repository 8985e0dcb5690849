"""The v2 request parameters the protocol reserves (`api.v2.parameters`): types checked as
Triton checks them, `triton_` keys refused per transport."""

from __future__ import annotations

from typing import Any

import pytest

from api.v2.parameters import RequestOptions, request_options
from api.v2.tensors import CodecError


def test_no_reserved_parameter_means_the_defaults() -> None:
    assert request_options({"mode": "fast", "k": 2}, grpc=False) == RequestOptions()


def test_each_reserved_parameter_is_read() -> None:
    parameters: dict[str, Any] = {
        "sequence_id": 42,
        "sequence_start": True,
        "sequence_end": False,
        "priority": 3,
        "timeout": 5000,
        "binary_data_output": True,
        "triton_enable_empty_final_response": True,
    }
    assert request_options(parameters, grpc=True) == RequestOptions(
        sequence_id="42",
        sequence_start=True,
        priority=3,
        timeout_us=5000,
        binary_data_output=True,
        empty_final_response=True,
    )


@pytest.mark.parametrize(("value", "expected"), [("abc", "abc"), (7, "7"), (0, None), ("", None)])
def test_a_sequence_id_is_an_unsigned_integer_or_a_string(value: Any, expected: Any) -> None:
    # tritonclient sends none for 0 or "": Triton reads those as "no sequence".
    assert request_options({"sequence_id": value}, grpc=False).sequence_id == expected


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("sequence_id", -1, "Unable to parse 'sequence_id'"),
        ("sequence_id", 1.5, "Unable to parse 'sequence_id'"),
        ("sequence_id", True, "Unable to parse 'sequence_id'"),
        ("sequence_id", False, "Unable to parse 'sequence_id'"),
        ("sequence_id", 0.0, "Unable to parse 'sequence_id'"),
        ("sequence_start", "yes", "Unable to parse 'sequence_start'"),
        ("sequence_end", 1, "Unable to parse 'sequence_end'"),
        ("priority", -2, "Unable to parse 'priority'"),
        ("priority", "high", "Unable to parse 'priority'"),
        ("timeout", 0.5, "Unable to parse 'timeout'"),
        ("timeout", "soon", "Unable to parse 'timeout'"),
        ("binary_data_output", "yes", "Unable to parse 'binary_data_output'"),
    ],
)
def test_a_reserved_parameter_of_the_wrong_type_is_refused(
    key: str, value: Any, message: str
) -> None:
    for grpc in (False, True):
        with pytest.raises(CodecError, match=message):
            request_options({key: value}, grpc=grpc)


def test_triton_keys_are_reserved() -> None:
    with pytest.raises(CodecError, match="reserved for Triton usage"):
        request_options({"triton_enable_empty_final_response": True}, grpc=False)  # REST: none
    with pytest.raises(CodecError, match="only triton_enable_empty_final_response"):
        request_options({"triton_anything": 1}, grpc=True)
    with pytest.raises(CodecError, match="Unable to parse 'triton_enable_empty_final_response'"):
        request_options({"triton_enable_empty_final_response": "true"}, grpc=True)
