"""Token authorization as TorchServe 0.11+ does it, for REST and gRPC alike.

TorchServe writes `key_file.json` at start with three keys: `inference` (for the inference
API), `management` (for the management API) and `API` (to ask for new keys at `POST /token`).
Clients send `Authorization: Bearer <key>`. Keys expire after `token_expiration_min` minutes
(TorchServe's default is 60); the metrics API and `/ping` need no key.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from api.errors import BadRequest, Unauthenticated

INFERENCE = "inference"
MANAGEMENT = "management"
API = "API"


@dataclass(slots=True)
class _Key:
    value: str
    expires_at: float | None


class TokenAuth:
    """Holds the three keys and checks `Authorization` headers against them."""

    def __init__(self, key_file: Path, *, expiration_min: float = 60.0) -> None:
        self.key_file = key_file
        # Whole seconds, as TorchServe counts them ((long) minutes * 60).
        self.expiration_s = float(int(expiration_min * 60.0))
        self._keys: dict[str, _Key] = {}
        for kind in (INFERENCE, MANAGEMENT):
            self._keys[kind] = self._new_key(expires=True)
        self._keys[API] = self._new_key(expires=False)
        self._write()

    def _new_key(self, *, expires: bool) -> _Key:
        # TorchServe's keys are 8 URL-safe characters; longer here, same alphabet.
        return _Key(secrets.token_urlsafe(24), time.time() + self.expiration_s if expires else None)

    def key(self, kind: str) -> str:
        return self._keys[kind].value

    def check(self, kind: str, authorization: str | None) -> None:
        """Raise Unauthenticated unless `authorization` carries the valid key for `kind`."""
        if not authorization:
            raise Unauthenticated(
                "Token Authorization failed. Token either incorrect, expired, or not provided "
                "correctly"
            )
        bearer = _BEARER.fullmatch(authorization.strip())
        key = self._keys[kind]
        # As bytes: compare_digest refuses str with characters outside ASCII, and a client's
        # byte 0xE9 made a 500 and a traceback.
        given = bearer.group(1).encode("utf-8", "surrogateescape") if bearer else b""
        valid = bearer is not None and hmac.compare_digest(given, key.value.encode())
        if not valid or (key.expires_at is not None and time.time() > key.expires_at):
            raise Unauthenticated(
                "Token Authorization failed. Token either incorrect, expired, or not provided "
                "correctly"
            )

    def regenerate(self, kind: str, authorization: str | None) -> str:
        """`POST /token?type=inference|management`, authorized by the API key."""
        self.check(API, authorization)
        if kind not in (INFERENCE, MANAGEMENT):
            raise BadRequest(f"type must be inference or management, got {kind!r}")
        keys = {**self._keys, kind: self._new_key(expires=True)}
        self._write(keys)  # first: a key that could not be written is never handed out
        self._keys = keys
        return keys[kind].value

    def _write(self, keys: dict[str, _Key] | None = None) -> None:
        document = {
            kind: {"key": key.value, "expiration time": _iso(key.expires_at)}
            for kind, key in (keys or self._keys).items()
        }
        document[API].pop("expiration time")
        # A new file of a name nobody could have made ready (mkstemp: O_EXCL, mode 0600), so
        # no planted file or link takes the keys or keeps a looser mode; then renamed.
        fd, tmp = tempfile.mkstemp(dir=self.key_file.parent, prefix=".key_file.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(document, f, indent=2)
            os.replace(tmp, self.key_file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# TorchServe's `Bearer\s+(\S+)` (a tab after the scheme too), the scheme in any case.
_BEARER = re.compile(r"bearer\s+(\S+)", re.IGNORECASE)


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
