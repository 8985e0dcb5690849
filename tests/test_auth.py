"""Token authorization (`api.auth`), in process: the key file TorchServe writes, the checks REST
and gRPC share, and `POST /token`'s regeneration."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from api.auth import API, INFERENCE, MANAGEMENT, TokenAuth
from api.errors import BadRequest, Unauthenticated


def test_the_key_file_holds_three_keys_readable_by_the_owner_only(tmp_path: Path) -> None:
    auth = TokenAuth(tmp_path / "key_file.json")
    document = json.loads((tmp_path / "key_file.json").read_text())
    assert set(document) == {INFERENCE, MANAGEMENT, API}
    assert document[INFERENCE]["key"] == auth.key(INFERENCE)
    assert "expiration time" in document[MANAGEMENT] and "expiration time" not in document[API]
    assert stat.S_IMODE((tmp_path / "key_file.json").stat().st_mode) == 0o600


def test_each_api_takes_its_own_bearer_key_only(tmp_path: Path) -> None:
    auth = TokenAuth(tmp_path / "key_file.json")
    auth.check(INFERENCE, f"Bearer {auth.key(INFERENCE)}")
    auth.check(MANAGEMENT, f"bearer {auth.key(MANAGEMENT)}")  # the scheme in any case
    for kind, header in [
        (INFERENCE, None),
        (INFERENCE, ""),
        (INFERENCE, auth.key(INFERENCE)),  # no scheme
        (INFERENCE, f"Basic {auth.key(INFERENCE)}"),
        (INFERENCE, f"Bearer {auth.key(MANAGEMENT)}"),  # another API's key
        (MANAGEMENT, f"Bearer {auth.key(INFERENCE)}"),
    ]:
        with pytest.raises(Unauthenticated, match="Token Authorization failed"):
            auth.check(kind, header)


def test_keys_expire_but_the_api_key_does_not(tmp_path: Path) -> None:
    auth = TokenAuth(tmp_path / "key_file.json", expiration_min=-1)
    with pytest.raises(Unauthenticated):
        auth.check(INFERENCE, f"Bearer {auth.key(INFERENCE)}")
    auth.check(API, f"Bearer {auth.key(API)}")


def test_regenerating_a_key_needs_the_api_key_and_replaces_it_in_the_file(tmp_path: Path) -> None:
    auth = TokenAuth(tmp_path / "key_file.json")
    old = auth.key(INFERENCE)
    with pytest.raises(Unauthenticated):
        auth.regenerate(INFERENCE, f"Bearer {auth.key(MANAGEMENT)}")
    with pytest.raises(BadRequest, match="inference or management"):
        auth.regenerate(API, f"Bearer {auth.key(API)}")
    new = auth.regenerate(INFERENCE, f"Bearer {auth.key(API)}")
    assert new != old and auth.key(INFERENCE) == new
    assert json.loads((tmp_path / "key_file.json").read_text())[INFERENCE]["key"] == new
    with pytest.raises(Unauthenticated):
        auth.check(INFERENCE, f"Bearer {old}")
