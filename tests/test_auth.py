"""Token authorization (`api.auth`), in process: the key file TorchServe writes, the checks REST
and gRPC share, and `POST /token`'s regeneration."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

import api.auth as auth_module
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


def test_an_authorization_outside_ascii_is_refused_as_any_wrong_key(tmp_path: Path) -> None:
    """compare_digest refuses str outside ASCII: a byte 0xE9 (latin-1, as headers are decoded)
    raised TypeError, a 500 with a traceback per request of a client with no key."""
    auth = TokenAuth(tmp_path / "key_file.json")
    for header in ("Bearer \xe9", "Bearer \udcff", f"Bearer {auth.key(INFERENCE)}\xe9"):
        with pytest.raises(Unauthenticated):
            auth.check(INFERENCE, header)
    auth.check(INFERENCE, f"Bearer\t{auth.key(INFERENCE)}")  # TorchServe's Bearer\s+KEY


def test_the_key_file_is_written_through_no_file_or_link_laid_in_wait(tmp_path: Path) -> None:
    """The temporary file had a fixed name, opened without O_EXCL: a file there kept its
    looser mode, and a link there had its target overwritten with the keys."""
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    (tmp_path / "key_file.tmp").symlink_to(victim)
    loose = tmp_path / ".key_file.tmp"
    loose.write_text("")
    loose.chmod(0o666)
    auth = TokenAuth(tmp_path / "key_file.json")
    assert victim.read_text() == "mine"
    assert stat.S_IMODE((tmp_path / "key_file.json").stat().st_mode) == 0o600
    assert not (tmp_path / "key_file.json").is_symlink()
    auth.regenerate(INFERENCE, f"Bearer {auth.key(API)}")
    assert victim.read_text() == "mine"


def test_a_key_that_cannot_be_written_is_not_handed_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new key replaced the old one before the file was written: a write that failed
    (a full disk) left clients with neither."""
    auth = TokenAuth(tmp_path / "key_file.json")
    old = auth.key(INFERENCE)

    def full_disk(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(auth_module.tempfile, "mkstemp", full_disk)
    with pytest.raises(OSError):
        auth.regenerate(INFERENCE, f"Bearer {auth.key(API)}")
    auth.check(INFERENCE, f"Bearer {old}")
