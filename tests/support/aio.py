"""Running coroutines from plain pytest tests (pytest-asyncio is not used), and gRPC failures."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

import grpc
import pytest

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float | None = 30.0) -> T:
    """`asyncio.run` with a time limit, so a hung scenario fails instead of hanging the run."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def expect_grpc_error(call: Awaitable[Any], code: grpc.StatusCode) -> str:
    """Await a call that must fail with `code`; its details."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return info.value.details() or ""
