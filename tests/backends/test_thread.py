"""WorkerThread: one thread, calls in order, errors and cancellations delivered safely."""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest

from api.backends.thread import WorkerThread
from tests.backends.conftest import run


def test_calls_run_in_order_on_one_named_thread() -> None:
    async def scenario() -> list[tuple[int, str]]:
        thread = WorkerThread("tg-test")
        try:
            calls = [
                thread.call(lambda i=i: (i, threading.current_thread().name)) for i in range(5)
            ]
            return list(await asyncio.gather(*calls))
        finally:
            thread.stop()
            thread.join(5)

    assert run(scenario()) == [(i, "tg-test") for i in range(5)]


def test_errors_reach_the_caller_and_the_thread_keeps_serving() -> None:
    def boom() -> None:
        raise ValueError("boom")

    async def scenario() -> int:
        thread = WorkerThread("tg-test")
        with pytest.raises(ValueError, match="boom"):
            await thread.call(boom)
        with pytest.raises(RuntimeError, match="SystemExit"):
            await thread.call(sys.exit, 3)
        result = await thread.call(int, "7")
        thread.stop()
        return result

    assert run(scenario()) == 7


def test_a_cancelled_caller_does_not_break_the_thread() -> None:
    gate = threading.Event()

    async def scenario() -> str:
        thread = WorkerThread("tg-test")
        slow = thread.call(gate.wait, 5)
        slow.cancel()
        gate.set()
        result = await thread.call(str, "still here")
        thread.stop()
        return result

    assert run(scenario()) == "still here"
