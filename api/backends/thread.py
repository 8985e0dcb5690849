"""A dedicated thread that runs one call at a time for the event loop.

Each local worker owns one, so its handler is only ever called from that thread. It does what
`loop.run_in_executor(ThreadPoolExecutor(1), ...)` does with less machinery per call (no
concurrent.futures.Future, no work item, no future chaining): one queue put on the way in, one
`call_soon_threadsafe` on the way back. On a 2-core box that is ~15-25 µs per hop instead of
~25-35 µs, and the hop is most of a small model's per-batch overhead.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any, TypeVar

T = TypeVar("T")

_Call = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class WorkerThread:
    """`await thread.call(fn, *args)` runs `fn(*args)` in this thread, in submission order."""

    def __init__(self, name: str) -> None:
        self._queue: SimpleQueue[_Call | None] = SimpleQueue()
        # Daemon: a handler stuck in a call must not keep the process from exiting.
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    @property
    def name(self) -> str:
        return self._thread.name

    def call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((loop, future, fn, args))
        return future

    def stop(self) -> None:
        """Let calls already queued finish, then end the thread. Does not wait."""
        self._queue.put(None)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _main(self) -> None:
        while (item := self._queue.get()) is not None:
            _run_one(*item)
            del item  # do not keep the last batch alive while idle


def _run_one(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    fn: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    try:
        result = fn(*args)
    except Exception as exc:
        _reply(loop, _fail, future, exc)
    except BaseException as exc:  # SystemExit from a handler: fail the call, keep serving
        _reply(loop, _fail, future, RuntimeError(f"{fn.__name__} raised {exc!r}"))
    else:
        _reply(loop, _succeed, future, result)


def _reply(
    loop: asyncio.AbstractEventLoop,
    callback: Callable[[asyncio.Future[Any], Any], None],
    future: asyncio.Future[Any],
    value: Any,
) -> None:
    # RuntimeError: the loop is closed, so nobody is waiting for this answer any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, future, value)


def _succeed(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():  # the caller may have been cancelled meanwhile
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
