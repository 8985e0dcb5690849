"""Several requests of one gRPC stream in flight at once, their responses sent in request order.

Triton's `ModelStreamInfer` issues each request as soon as it is read and writes the responses
of a non-decoupled model in the order the requests came; a client that sends a burst on one
stream has them batched together. Awaiting each request before reading the next would run
them one at a time, each waiting for the previous one's round trip.

    async for response in in_order(requests, respond, window=32, key=sequence_of):
        yield response

`respond(request, earlier)` gives one request's responses (one, or several for a streaming
handler) and answers its own failures as responses: an exception out of it is a bug, and ends
the stream. `await earlier()` waits until every request read before this one has finished, and
says whether any was still running: a request refused for a reason its own stream's read-ahead
caused (a full queue) waits, then tries again, as it would have run one at a time.

Requests with the same `key(request)` (not None) run one after the other, in order: a
sequence's, whose handler state each request leaves for the next, and which a sequence model
queues only `maxSequenceJobQueueSize` deep. Requests of other keys, or none, run beside them.

At most `window` requests are read ahead of the one whose responses are being sent, and at
most `window_bytes` of them by `size(request)` (one request alone may be larger); one more is
read and waits for room. So a client that stops reading its responses stops the server from
reading, and buffering, more.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Hashable
from typing import TypeVar, cast

Request = TypeVar("Request")
Response = TypeVar("Response")

Earlier = Callable[[], Awaitable[bool]]
_DONE = object()  # ends one request's responses


class _Window:
    """Room for requests read ahead: a count, and bytes (a lone request always fits)."""

    def __init__(self, count: int, size: int | None) -> None:
        self._count_limit, self._size_limit = count, size
        self._count = self._size = 0
        self._changed = asyncio.Condition()

    def _fits(self, size: int) -> bool:
        if self._count >= self._count_limit:
            return False
        return self._size_limit is None or not self._count or self._size + size <= self._size_limit

    async def enter(self, size: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._fits(size))
            self._count += 1
            self._size += size

    async def leave(self, size: int) -> None:
        async with self._changed:
            self._count -= 1
            self._size -= size
            self._changed.notify_all()


async def in_order(
    requests: AsyncIterable[Request],
    respond: Callable[[Request, Earlier], AsyncIterator[Response]],
    *,
    window: int,
    window_bytes: int | None = None,
    size: Callable[[Request], int] | None = None,
    key: Callable[[Request], Hashable | None] | None = None,
) -> AsyncIterator[Response]:
    """`respond`'s responses for each request, requests run concurrently, responses in order;
    see the module docstring."""
    # One queue of responses per request, in request order, with the request's size; None
    # once the requests end.
    outboxes: asyncio.Queue[tuple[asyncio.Queue[object], asyncio.Task[None], int] | None] = (
        asyncio.Queue()
    )
    room = _Window(window, window_bytes)
    running: set[asyncio.Task[None]] = set()
    last_of_key: dict[Hashable, asyncio.Task[None]] = {}

    async def run(
        request: Request,
        outbox: asyncio.Queue[object],
        before: tuple[asyncio.Task[None], ...],
        same_key: asyncio.Task[None] | None,
    ) -> None:
        async def earlier() -> bool:
            still = [task for task in before if not task.done()]
            if still:
                await asyncio.wait(still)
            return bool(still)

        try:
            if same_key is not None:
                await asyncio.wait([same_key])
            async for response in respond(request, earlier):
                outbox.put_nowait(response)
        finally:
            outbox.put_nowait(_DONE)

    def start(request: Request, weight: int) -> asyncio.Task[None]:
        name = None if key is None else key(request)
        same_key = None if name is None else last_of_key.get(name)
        outbox: asyncio.Queue[object] = asyncio.Queue()
        task = asyncio.ensure_future(run(request, outbox, tuple(running), same_key))
        running.add(task)
        task.add_done_callback(running.discard)
        if name is not None:
            last_of_key[name] = task
            task.add_done_callback(lambda done: _forget(last_of_key, name, done))
        outboxes.put_nowait((outbox, task, weight))
        return task

    async def read() -> None:
        try:
            async for request in requests:
                weight = 0 if size is None else size(request)
                await room.enter(weight)
                start(request, weight)
        finally:
            outboxes.put_nowait(None)

    reader = asyncio.ensure_future(read())
    current: asyncio.Task[None] | None = None
    try:
        while (entry := await outboxes.get()) is not None:
            outbox, current, weight = entry
            while (response := await outbox.get()) is not _DONE:
                yield cast(Response, response)
            current.result()  # respond's own failure: a bug, raised here rather than lost
            current = None
            await room.leave(weight)
        reader.result()  # the client's stream broke off: raise what reading it raised
    finally:
        reader.cancel()
        if current is not None:
            current.cancel()
        while not outboxes.empty():  # read ahead and not reached: their requests are dropped
            entry = outboxes.get_nowait()
            if entry is not None:
                entry[1].cancel()


def _forget(
    last_of_key: dict[Hashable, asyncio.Task[None]], name: Hashable, task: asyncio.Task[None]
) -> None:
    """Drop a finished task from `last_of_key` unless a later one of its key took its place."""
    if last_of_key.get(name) is task:
        del last_of_key[name]
