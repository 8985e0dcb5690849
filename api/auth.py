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
import secrets
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
        scheme, _, token = authorization.partition(" ")
        key = self._keys[kind]
        valid = scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), key.value)
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
        self._keys[kind] = self._new_key(expires=True)
        self._write()
        return self._keys[kind].value

    def _write(self) -> None:
        document = {
            kind: {"key": key.value, "expiration time": _iso(key.expires_at)}
            for kind, key in self._keys.items()
        }
        document[API].pop("expiration time")
        tmp = self.key_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(document, f, indent=2)
        os.replace(tmp, self.key_file)


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
