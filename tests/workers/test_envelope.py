"""`service_envelope`: the key, and the envelope wrapped around a handler in the worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from api.config import ConfigError, parse_config
from api.workers.main import wrap_in_envelope


class Context:
    def __init__(self, explain: str = "False") -> None:
        self.headers = {"explain": explain}

    def get_request_header(self, idx: int, key: str) -> str | None:
        return self.headers.get(key)


def test_kserve_unwraps_instances_and_wraps_predictions() -> None:
    seen: list[Any] = []

    def handle(data: Any, context: Any) -> list[Any]:
        seen.append(data)
        return [sum(row) for row in data]

    wrapped = wrap_in_envelope(handle, "kserve")
    answer = wrapped([{"body": b'{"instances": [[1, 2], [3, 4]]}'}], Context())
    assert seen == [[[1, 2], [3, 4]]]
    assert answer == [{"predictions": [3, 7]}]
    explained = wrapped([{"body": {"instances": [[1, 1]]}}], Context(explain="True"))
    assert explained == [{"explanations": [2]}]


def test_body_hands_the_bodies_over() -> None:
    wrapped = wrap_in_envelope(lambda data, context: data, "body")
    assert wrapped([{"body": b"a"}, {"data": b"b"}], Context()) == [b"a", b"b"]


@pytest.mark.parametrize("value", ["kserve", "kservev2", "body", "json"])
def test_the_key_takes_torchserve_envelope_names(value: str) -> None:
    assert parse_config({"service_envelope": value}, base_dir=Path(".")).service_envelope == value
    assert parse_config({}, base_dir=Path(".")).service_envelope is None


def test_an_unknown_envelope_is_refused() -> None:
    with pytest.raises(ConfigError, match="service_envelope"):
        parse_config({"service_envelope": "seldon"}, base_dir=Path("."))
