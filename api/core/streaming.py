"""One request's responses as they come: a streaming handler's intermediate responses, then its
final one. Transport-neutral: REST sends them as HTTP chunks, gRPC as stream messages.

A handler streams with TorchServe's `send_intermediate_predict_response`; the worker backend hands
each intermediate response to the request's `stream` callback (`InferenceRequest.stream`) before
the request's future resolves with the final `Prediction`. `PredictionStream` turns that callback
and that future into one ordered async iterator:

    stream = PredictionStream(dataplane, model, version, request)
    async for part in stream:          # part.prediction, part.last
        ...                            # a TorchgateError here: the request failed
    stream.answer.model_version        # once the last part was yielded

A handler that does not stream yields one part, the last. The run is cancelled when the consumer
stops early (a client that left), so a queued request is never run for nobody.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from api.core.dataplane import Answer, DataPlane
from api.core.types import InferenceRequest, Prediction

# What a stream infers with: the dataplane's `infer`, or another caller's (a sequence's).
Infer = Callable[[InferenceRequest], Awaitable[Answer]]

_DONE: Final = None


@dataclass(frozen=True, slots=True)
class StreamPart:
    prediction: Prediction
    last: bool  # the handler's final response: nothing follows it


class PredictionStream:
    """Runs one request and yields each of its responses in order; see the module docstring."""

    def __init__(
        self,
        dataplane: DataPlane | None,
        model: str,
        version: str | None,
        request: InferenceRequest,
        *,
        infer: Infer | None = None,
    ) -> None:
        """`infer` replaces `dataplane.infer(model, version, request)` (StreamPredictions2's
        per-sequence path may run the request its own way)."""
        if infer is None:
            if dataplane is None:
                raise ValueError("PredictionStream needs a dataplane or an infer function")
            plane = dataplane

            async def infer_with_dataplane(item: InferenceRequest) -> Answer:
                return await plane.infer(model, version, item)

            infer = infer_with_dataplane
        self._infer = infer
        self._request = request
        self._parts: asyncio.Queue[Prediction | None] = asyncio.Queue()
        self.answer: Answer | None = None

    def __aiter__(self) -> AsyncIterator[StreamPart]:
        return self._run()

    async def _run(self) -> AsyncIterator[StreamPart]:
        parts = self._parts
        self._request.stream = parts.put_nowait
        task = asyncio.ensure_future(self._infer(self._request))
        # The worker backend calls `stream` synchronously as each chunk frame arrives, before
        # the result frame resolves the request: every intermediate part is queued before this
        # marker, so the final response is always yielded last.
        task.add_done_callback(lambda _: parts.put_nowait(_DONE))
        try:
            while (prediction := await parts.get()) is not _DONE:
                yield StreamPart(prediction, last=False)
            self.answer = task.result()  # raises the request's TorchgateError
            yield StreamPart(self.answer.prediction, last=True)
        finally:
            if not task.done():
                task.cancel()
