"""Request ids (api/request_ids.py): a client's plain X-Request-Id is kept, anything else is
replaced by a new id (which the answer's X-Request-Id then carries)."""

from __future__ import annotations

import re

import pytest

from api.request_ids import MAX_CLIENT_ID, new_request_id, request_id

UUID4_FORM = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


@pytest.mark.parametrize(
    "client",
    ["abc-123", "5f0e0c9e-8a1b-4d5e-9f00-0123456789ab", "trace/1:2=3", "x" * MAX_CLIENT_ID],
)
def test_a_plain_client_id_is_kept(client: str) -> None:
    assert request_id({"x-request-id": client}) == client


@pytest.mark.parametrize(
    "client",
    ["x" * (MAX_CLIENT_ID + 1), "x" * 60_000, "caf\u00e9", "a\x80b", "two words", "tab\there", ""],
    ids=["just too long", "64 KiB", "non-ASCII", "latin-1 byte", "space", "control", "empty"],
)
def test_any_other_client_id_is_replaced_by_a_new_one(client: str) -> None:
    chosen = request_id({"x-request-id": client})
    assert chosen != client
    assert UUID4_FORM.fullmatch(chosen)


def test_new_ids_are_unique_and_read_as_uuid4s() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(UUID4_FORM.fullmatch(one) for one in ids)
