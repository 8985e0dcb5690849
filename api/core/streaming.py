"""One request's responses as they come: a streaming handler's intermediate responses, then its
final one. Transport-neutral: REST sends them as HTTP chunks, gRPC as stream messages.

A handler streams with TorchServe's `send_intermediate_predict_response`; the worker backend hands
each intermediate response to the request's `stream` callback (`InferenceRequest.stream`), on the
event loop, before the request's future resolves with the final `Prediction`. `PredictionStream`
passes those responses to the transport's `send_part`, in order, and returns the final answer
once every part before it was sent:

    stream = PredictionStream(request, send_part)      # send_part: async (Prediction) -> None
    answer = await stream.run(infer)                   # infer: async (request) -> Answer
    stream.streamed                                    # True once a part was handed over

`iterate(request, infer)` gives the same responses as an async iterator, each with whether it is
the final one, for transports that yield their messages (gRPC).

A request whose handler does not stream costs nothing more than a plain `infer` (no task, no
queue): the sending task starts with the first intermediate response. When the request fails
after parts were sent, `run` raises the request's error after those parts: the transport decides
what a failure mid-stream looks like on its wire.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

from api.core.dataplane import Answer, discard_part
from api.core.types import InferenceRequest, Prediction
from api.errors import InferenceFailed

# What a stream runs: the dataplane's `infer` for a model, or another path's (a sequence's).
Infer = Callable[[InferenceRequest], Awaitable[Answer]]
SendPart = Callable[[Prediction], Awaitable[None]]

# What may wait for a client slower than its handler: a handler streams without waiting (as in
# TorchServe), so a client that reads, but slowly, would have the server hold all the stream
# has made so far (an endless one, without end). Past this the request fails, as one whose
# part could not go out does.
MAX_WAITING_BYTES = 64 * 1024 * 1024
MAX_WAITING_PARTS = 10_000
_OBJECT_PART_BYTES = 1024  # a part that is not bytes or text (JSON to be), counted at a guess
# A gRPC stream's messages taken ahead of the call's writes (`iterate`): few, so that a slow
# client holds parts back in the stream, where they are bounded.
_ITERATE_AHEAD = 8


class PredictionStream:
    """Runs one request, handing its intermediate responses to `send_part`; see the module
    docstring."""

    def __init__(self, request: InferenceRequest, send_part: SendPart) -> None:
        self._request = request
        self._send_part = send_part
        self._parts: deque[Prediction] = deque()
        self._waiting_bytes = 0  # the bodies' sizes in `_parts`
        self._sender: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None  # made with the first part, as the sender
        self._finished = False
        self._owner: asyncio.Task[object] | None = None  # the task running `run`
        self._failure: Exception | None = None  # what `send_part` raised
        self._ended = False  # `run` returned or raised

    @property
    def streamed(self) -> bool:
        """Whether the handler sent an intermediate response (the transport began a stream)."""
        return self._sender is not None

    async def run(self, infer: Infer) -> Answer:
        """The final answer, after every intermediate part was sent; raises what `infer` (or
        `send_part`) raised. Cancelling it cancels the request and the sending."""
        self._request.stream = self._on_part
        self._owner = asyncio.current_task()
        try:
            answer = await infer(self._request)
        except asyncio.CancelledError:
            if self._sender is not None:
                self._sender.cancel()
            if self._failure is not None and self._owner is not None:
                self._owner.uncancel()  # the sender's cancel: a part could not go out
                raise self._failure from None
            raise
        except BaseException:
            await self._finish()  # the parts before the failure still go out
            raise
        finally:
            # The request and this stream refer to each other; unlinked, both are freed by
            # reference counting when the request ends instead of by the cycle collector.
            self._request.stream = discard_part
            self._ended = True  # for a copy of the request the batch may hold, still linked
        await self._finish()
        return answer

    def _on_part(self, prediction: Prediction) -> None:
        # Called by the backend on the event loop, synchronously: queue, never block it.
        if self._ended or self._failure is not None:
            return  # as `discard_part`: nobody is left to send it to
        self._parts.append(prediction)
        self._waiting_bytes += _part_bytes(prediction)
        # Parts behind another one: a single part, however large, waits for nobody (its size
        # is max_response_size's to bound).
        waiting_behind = len(self._parts) > 1
        if waiting_behind and (
            self._waiting_bytes > MAX_WAITING_BYTES or len(self._parts) > MAX_WAITING_PARTS
        ):
            self._fail_now(
                InferenceFailed(
                    f"The client reads this stream slower than the handler writes it: "
                    f"{len(self._parts)} parts ({self._waiting_bytes} bytes) were waiting"
                )
            )
            return
        if self._wake is None:
            self._wake = asyncio.Event()
            self._sender = asyncio.ensure_future(self._send_parts(self._wake))
        self._wake.set()

    async def _send_parts(self, wake: asyncio.Event) -> None:
        try:
            while True:
                while self._parts:
                    part = self._parts.popleft()
                    self._waiting_bytes -= _part_bytes(part)
                    await self._send_part(part)
                if self._finished:
                    return
                wake.clear()
                await wake.wait()
        except Exception as exc:
            # A part that cannot go out (over max_response_size, the client gone) ends the
            # request now, not when the handler has produced the rest of its stream.
            self._fail_now(exc)

    def _fail_now(self, failure: Exception) -> None:
        self._failure = failure
        self._parts.clear()
        self._waiting_bytes = 0
        if not self._finished and self._owner is not None:
            self._owner.cancel()

    async def _finish(self) -> None:
        self._finished = True
        if self._wake is not None:
            self._wake.set()
        if self._sender is not None:
            await self._sender
        if self._failure is not None:
            raise self._failure


def _part_bytes(prediction: Prediction) -> int:
    body = prediction.body
    if isinstance(body, bytes | bytearray | memoryview | str):
        return len(body)
    return _OBJECT_PART_BYTES


async def iterate(
    request: InferenceRequest, infer: Infer
) -> AsyncIterator[tuple[Prediction, bool]]:
    """The request's responses as an async iterator of (response, final): intermediate ones,
    then the final one, for transports that yield their messages (gRPC's response streams).
    Raises the request's error after the parts that came before it; closing the iterator
    early cancels the request."""
    queue: asyncio.Queue[tuple[Prediction, bool] | None] = asyncio.Queue()
    room = asyncio.Event()  # set while the consumer keeps up (`_ITERATE_AHEAD`)
    room.set()

    async def send_part(prediction: Prediction) -> None:
        queue.put_nowait((prediction, False))
        if queue.qsize() >= _ITERATE_AHEAD:
            room.clear()
            await room.wait()  # parts wait in the stream, bounded there, not here

    async def run() -> None:
        try:
            answer = await PredictionStream(request, send_part).run(infer)
            queue.put_nowait((answer.prediction, True))
        finally:
            queue.put_nowait(None)

    task = asyncio.ensure_future(run())
    try:
        while (response := await queue.get()) is not None:
            if queue.qsize() < _ITERATE_AHEAD:
                room.set()
            yield response
        task.result()  # the request's error, if it failed
    finally:
        if not task.done():
            task.cancel()
