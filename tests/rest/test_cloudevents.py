"""`api.rest.cloudevents`: which requests are CloudEvents, and the events that answer them,
with KServe's environment variables (CE_TYPE, CE_SOURCE, CE_MERGE). The server side is tested
with the CloudEvents SDK in tests/kserve/test_runtime.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from api.errors import BadRequest
from api.rest.cloudevents import unwrap, wrap

REQUEST = {"instances": [1]}
BINARY = {
    "ce-specversion": "1.0",
    "ce-id": "req-1",
    "ce-source": "tests",
    "ce-type": "com.example.request",
    "ce-partition": "7",
    "content-type": "application/json",
}
STRUCTURED = {
    "specversion": "1.0",
    "id": "req-1",
    "source": "tests",
    "type": "com.example.request",
    "time": "2026-12-07T00:00:00+00:00",
    "partition": "7",
    "data": REQUEST,
}


def test_a_plain_request_is_no_event() -> None:
    assert unwrap({"content-type": "application/json"}, REQUEST) == (REQUEST, None)
    # Three of the four required headers do not make a binary event.
    partial = {k: v for k, v in BINARY.items() if k != "ce-id"}
    assert unwrap(partial, REQUEST) == (REQUEST, None)


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_an_unknown_specversion_is_refused_as_kserve_refuses_it(mode: str) -> None:
    headers: dict[str, str] = {}
    request: dict[str, Any] = {**STRUCTURED, "specversion": "9.9"}
    if mode == "binary":
        headers, request = {**BINARY, "ce-specversion": "9.9"}, dict(REQUEST)
    with pytest.raises(BadRequest) as refused:
        unwrap(headers, request)
    assert refused.value.message == "Cloud Event Exceptions: Found invalid specversion 9.9"


def test_a_structured_body_is_unwrapped_and_answered_as_one_only_when_sent_as_one() -> None:
    data, event = unwrap({"content-type": "application/cloudevents+json"}, dict(STRUCTURED))
    assert data == REQUEST and event is not None and not event.binary
    # Without that content type KServe still reads `data`, and answers plainly.
    assert unwrap({"content-type": "application/json"}, dict(STRUCTURED)) == (REQUEST, None)


def test_the_answer_takes_kserves_attributes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CE_MERGE", raising=False)
    _, event = unwrap(BINARY, REQUEST)
    assert event is not None
    body, headers = wrap(event, "digits", {"predictions": [2]})
    named = dict(headers)
    assert json.loads(body) == {"predictions": [2]}
    assert named["content-type"] == "application/json"
    assert named["ce-type"] == "io.kserve.inference.response"
    assert named["ce-source"] == "io.kserve.inference.digits"
    assert named["ce-specversion"] == "1.0" and named["ce-id"] != "req-1"
    assert "ce-partition" not in named  # carried over only with CE_MERGE


def test_ce_type_ce_source_and_ce_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CE_TYPE", "com.example.answer")
    monkeypatch.setenv("CE_SOURCE", "digits-service")
    monkeypatch.setenv("CE_MERGE", "true")
    _, event = unwrap({"content-type": "application/cloudevents+json"}, dict(STRUCTURED))
    assert event is not None
    body, headers = wrap(event, "digits", {"predictions": [2]})
    answer = json.loads(body)
    assert dict(headers) == {"content-type": "application/cloudevents+json"}
    assert answer["type"] == "com.example.answer" and answer["source"] == "digits-service"
    assert answer["partition"] == "7"  # merged from the request
    assert answer["id"] != "req-1" and answer["time"] != STRUCTURED["time"]
    assert answer["data"] == {"predictions": [2]}
