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


def request_id(headers: Mapping[str, str]) -> str:
    """The client's X-Request-Id (headers with lower-case names), or a new unique id."""
    return headers.get("x-request-id") or new_request_id()


def new_request_id() -> str:
    """A new unique id: for each message of a gRPC stream, whose metadata (and so its
    `x-request-id`) is the whole call's, as TorchServe gives each message its own."""
    return f"{_ID_PREFIX}{next(_id_counter):012x}"
