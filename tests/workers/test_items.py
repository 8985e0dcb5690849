"""What a handler receives for one request (`api.workers.items`), as TorchServe's worker builds
it: values decoded by content type or else bytearrays, and the headers with each input's content
type. Compared with real TorchServe in tests/integration/test_worker_contract.py."""

from __future__ import annotations

import math
from typing import Any

import pytest

from api.workers.items import DECODE_VARIABLE, RequestHeaders, handler_headers, handler_row


@pytest.mark.parametrize(
    ("value", "content_type", "expected"),
    [
        (b'{"a": [1, 2]}', "application/json", {"a": [1, 2]}),
        (b"h\xc3\xa9llo", "text/plain", "héllo"),
        (b"a,b", "text/csv", "a,b"),
        (b"\x89PNG", "image/png", bytearray(b"\x89PNG")),
        (b"\x00\x01", "", bytearray(b"\x00\x01")),
        # Compared as written, as TorchServe's worker compares it.
        (b"a,b", "TEXT/CSV", bytearray(b"a,b")),
        # What does not decode is passed as it came.
        (b"{", "application/json", bytearray(b"{")),
        (b"\xff\xfe", "text/plain", bytearray(b"\xff\xfe")),
        (b"[18446744073709551616]", "application/json", [2**64]),  # past orjson's 64 bits
        (
            b"[" * 100_000 + b"]" * 100_000,
            "application/json",
            bytearray(b"[" * 100_000 + b"]" * 100_000),
        ),
    ],
)
def test_values_decode_as_torchserve_s_worker(
    value: bytes, content_type: str, expected: Any
) -> None:
    row = handler_row({"body": value}, {"body": content_type})
    assert row == {"body": expected} and type(row["body"]) is type(expected)


def test_nan_is_read_as_python_s_json_reads_it() -> None:
    [value] = handler_row({"body": b"[NaN]"}, {"body": "application/json"})["body"]
    assert math.isnan(value)


def test_values_already_decoded_pass_as_they_are() -> None:
    inputs = {"body": {"instances": [1]}}
    assert handler_row(inputs, {}) is inputs


def test_the_decode_variable_is_read_at_every_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    inputs, types = {"body": b"[1]"}, {"body": "application/json"}
    assert handler_row(inputs, types) == {"body": [1]}
    # What a handler module does at import to decode bodies itself.
    monkeypatch.setenv(DECODE_VARIABLE, "false")
    assert handler_row(inputs, types) == {"body": bytearray(b"[1]")}
    monkeypatch.setenv(DECODE_VARIABLE, "true")
    assert handler_row(inputs, types) == {"body": [1]}


def test_headers_carry_each_inputs_content_type() -> None:
    headers = handler_headers(
        {"x-tenant": "acme"}, {"body": b"x", "f": b"field"}, {"body": "text/plain"}
    )
    assert headers == {
        "body": {"content-type": "text/plain"},
        "f": {"content-type": ""},
        "x-tenant": "acme",
    }
    # The inputs first, then the headers, as TorchServe's worker fills its map.
    assert list(headers) == ["body", "f", "x-tenant"]


def test_a_header_wins_over_an_input_of_the_same_name() -> None:
    # A form field named `explain` must not replace the frontend's header: on /explanations
    # BaseHandler would run inference instead (TorchServe's worker writes headers last).
    headers = handler_headers(
        {"explain": "True", "url_path": ""},
        {"data": b"x", "explain": b"1", "url_path": b"v1/x"},
        {"data": "image/png"},
    )
    assert headers == {"data": {"content-type": "image/png"}, "explain": "True", "url_path": ""}


def test_header_names_match_in_any_case() -> None:
    headers = RequestHeaders({"content-type": "text/plain", "x-tenant": "acme"})
    assert headers["Content-Type"] == headers.get("CONTENT-TYPE") == "text/plain"
    assert "X-Tenant" in headers and "x-tenant" in headers
    assert headers.get("X-Missing") is None and "X-Missing" not in headers
    with pytest.raises(KeyError):
        headers["X-Missing"]
    assert list(headers) == ["content-type", "x-tenant"]  # iterated as they are kept
