"""Several requests of one gRPC stream in flight at once, their responses sent in request order.

Triton's `ModelStreamInfer` issues each request as soon as it is read and writes the responses
of a non-decoupled model in the order the requests came; a client that sends a burst on one
stream has them batched together. Awaiting each request before reading the next would run
them one at a time, each waiting for the previous one's round trip.

    async for response in in_order(requests, respond, window=64):
        yield response

A request that must not overlap the ones before it (a sequence's, whose handler state each
request leaves for the next) is marked by `alone`: it waits until they have finished.

`respond(request)` gives one request's responses (one, or several for a streaming handler) and
answers its own failures as responses: an exception out of it is a bug, and ends the stream.
At most `window` requests are read ahead of the one whose responses are being sent, so a client
that stops reading its responses stops the server from reading (and buffering) more requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import TypeVar, cast

Request = TypeVar("Request")
Response = TypeVar("Response")

_DONE = object()  # ends one request's responses


async def in_order(
    requests: AsyncIterable[Request],
    respond: Callable[[Request], AsyncIterator[Response]],
    *,
    window: int,
    alone: Callable[[Request], bool] | None = None,
) -> AsyncIterator[Response]:
    """`respond`'s responses for each request, requests run concurrently, responses in order.

    A request for which `alone(request)` is true starts only once every request before it has
    finished, as one at a time would run it."""
    # One queue of responses per request, in request order; None once the requests end.
    outboxes: asyncio.Queue[tuple[asyncio.Queue[object], asyncio.Task[None]] | None] = (
        asyncio.Queue()
    )
    slots = asyncio.Semaphore(window)

    async def run(request: Request, outbox: asyncio.Queue[object]) -> None:
        try:
            async for response in respond(request):
                outbox.put_nowait(response)
        finally:
            outbox.put_nowait(_DONE)

    running: set[asyncio.Task[None]] = set()

    async def read() -> None:
        try:
            async for request in requests:
                await slots.acquire()
                if alone is not None and alone(request) and running:
                    await asyncio.wait(running)
                outbox: asyncio.Queue[object] = asyncio.Queue()
                task = asyncio.ensure_future(run(request, outbox))
                running.add(task)
                task.add_done_callback(running.discard)
                outboxes.put_nowait((outbox, task))
        finally:
            outboxes.put_nowait(None)

    reader = asyncio.ensure_future(read())
    current: asyncio.Task[None] | None = None
    try:
        while (entry := await outboxes.get()) is not None:
            outbox, current = entry
            while (response := await outbox.get()) is not _DONE:
                yield cast(Response, response)
            current.result()  # respond's own failure: a bug, raised here rather than lost
            current = None
            slots.release()
        reader.result()  # the client's stream broke off: raise what reading it raised
    finally:
        reader.cancel()
        if current is not None:
            current.cancel()
        while not outboxes.empty():  # read ahead and not reached: their requests are dropped
            entry = outboxes.get_nowait()
            if entry is not None:
                entry[1].cancel()
