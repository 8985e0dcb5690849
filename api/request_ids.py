"""Request ids, the same for every transport: the client's `X-Request-Id`, or a new one."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Mapping

# Generated ids: a random per-process uuid4's first 24 characters and a counter as the last 12
# hex digits, so each id reads as a uuid4, as TorchServe's do. Unique like a uuid4 for a
# process's life, at a fifth of the cost on the hot path.
_ID_PREFIX = str(uuid.uuid4())[:24]
_id_counter = itertools.count()


# A client's id is kept when it could be anyone's id: up to 128 visible ASCII characters. One
# past that (64 KiB fit in a header) would be copied into every log line and answer, and one
# with bytes past ASCII could not be sent on to a TorchServe backend (its request failed 500).
MAX_CLIENT_ID = 128


def request_id(headers: Mapping[str, str]) -> str:
    """The client's X-Request-Id (headers with lower-case names) when it is a plain one (see
    `MAX_CLIENT_ID`), or a new unique id; the answer's X-Request-Id says which."""
    client = headers.get("x-request-id")
    if client and len(client) <= MAX_CLIENT_ID and _visible_ascii(client):
        return client
    return new_request_id()


def _visible_ascii(text: str) -> bool:
    return text.isascii() and text.isprintable() and " " not in text


def new_request_id() -> str:
    """A new unique id: for each message of a gRPC stream, whose metadata (and so its
    `x-request-id`) is the whole call's, as TorchServe gives each message its own."""
    return f"{_ID_PREFIX}{next(_id_counter):012x}"
