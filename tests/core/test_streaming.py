"""PredictionStream with a fake infer: the order of parts, failures, cancellation, no cost
without streaming."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest

from api.core.dataplane import Answer, discard_part
from api.core.streaming import MAX_WAITING_BYTES, MAX_WAITING_PARTS, PredictionStream, iterate
from api.core.types import InferenceRequest, Prediction
from api.errors import InferenceFailed
from tests.support import aio


def fake_infer(words: list[str], *, fail_after: int | None = None, gate: Any = None) -> Any:
    """Streams each word but the last as a part (yielding to the loop between them), then
    answers with the last; or raises after `fail_after` parts."""

    async def infer(request: InferenceRequest) -> Answer:
        for index, word in enumerate(words[:-1]):
            if index == fail_after:
                raise InferenceFailed("failed mid-stream")
            assert request.stream is not None
            request.stream(Prediction(word))
            await asyncio.sleep(0)
        if gate is not None:
            await gate.wait()
        return Answer(model_version=None, prediction=Prediction(words[-1]))  # type: ignore[arg-type]

    return infer


def test_parts_are_sent_in_order_before_the_answer_returns() -> None:
    async def scenario() -> None:
        sent: list[str] = []

        async def send_part(prediction: Prediction) -> None:
            await asyncio.sleep(0.001)  # a slow client: parts queue up behind it
            sent.append(prediction.body)

        stream = PredictionStream(InferenceRequest({}), send_part)
        answer = await stream.run(fake_infer(["a", "b", "c", "d"]))
        assert sent == ["a", "b", "c"]
        assert answer.prediction.body == "d"
        assert stream.streamed

    aio.run(scenario())


def test_a_part_after_the_request_ended_is_dropped_quietly() -> None:
    """A worker can still stream after its request ended (the request's 504, its client
    gone): the part is dropped, not taken for one sent to an API that cannot stream (whose
    warning would tell the operator to use another API)."""

    async def scenario() -> None:
        sent: list[str] = []

        async def send_part(prediction: Prediction) -> None:
            sent.append(prediction.body)

        request = InferenceRequest({})
        await PredictionStream(request, send_part).run(fake_infer(["a", "b"]))
        assert request.stream is discard_part
        request.stream(Prediction("late"))
        assert sent == ["a"]

    aio.run(scenario())


def test_a_part_for_a_copy_of_the_request_after_it_ended_is_dropped_too() -> None:
    """The batch may hold a copy of the request (a v2 request shaped for a version without a
    signature): once the stream ended, a part the copy still brings is dropped, not queued
    behind a sender that is gone, nor sent by a new one to nobody."""

    async def scenario() -> None:
        sent: list[str] = []

        async def send_part(prediction: Prediction) -> None:
            sent.append(prediction.body)

        copies: list[InferenceRequest] = []
        started = asyncio.Event()

        async def infer(request: InferenceRequest) -> Answer:
            copies.append(replace(request, inputs={"copied": True}))
            started.set()
            await asyncio.Event().wait()  # the client leaves before any part
            raise AssertionError("cancelled")

        stream = PredictionStream(InferenceRequest({}), send_part)
        run = asyncio.ensure_future(stream.run(infer))
        await started.wait()
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        tasks = len(asyncio.all_tasks())
        stream_of_copy = copies[0].stream
        assert stream_of_copy is not None
        stream_of_copy(Prediction("late"))
        assert len(asyncio.all_tasks()) == tasks and not stream.streamed
        assert not stream._parts and sent == []

    aio.run(scenario())


def test_without_parts_nothing_is_started() -> None:
    async def scenario() -> None:
        async def send_part(prediction: Prediction) -> None:
            raise AssertionError("no part expected")

        stream = PredictionStream(InferenceRequest({}), send_part)
        tasks = len(asyncio.all_tasks())
        answer = await stream.run(fake_infer(["only"]))
        assert answer.prediction.body == "only"
        assert not stream.streamed
        assert len(asyncio.all_tasks()) == tasks

    aio.run(scenario())


def test_a_failure_after_parts_raises_once_they_were_sent() -> None:
    async def scenario() -> None:
        sent: list[str] = []

        async def send_part(prediction: Prediction) -> None:
            sent.append(prediction.body)

        stream = PredictionStream(InferenceRequest({}), send_part)
        with pytest.raises(InferenceFailed):
            await stream.run(fake_infer(["a", "b", "c"], fail_after=1))
        assert sent == ["a"]
        assert stream.streamed

    aio.run(scenario())


def test_cancelling_stops_the_sending_too() -> None:
    async def scenario() -> None:
        blocked = asyncio.Event()

        async def send_part(prediction: Prediction) -> None:
            await blocked.wait()  # a client that stopped reading

        stream = PredictionStream(InferenceRequest({}), send_part)
        gate = asyncio.Event()
        run = asyncio.ensure_future(stream.run(fake_infer(["a", "b"], gate=gate)))
        await asyncio.sleep(0.01)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        await asyncio.sleep(0)
        assert stream._sender is not None and stream._sender.cancelled()

    aio.run(scenario())


def test_iterate_yields_parts_then_the_answer_and_raises_after_them() -> None:
    async def scenario() -> None:
        got = [
            (p.body, final)
            async for p, final in iterate(InferenceRequest({}), fake_infer(["a", "b", "c"]))
        ]
        assert got == [("a", False), ("b", False), ("c", True)]
        seen = []
        with pytest.raises(InferenceFailed):
            async for part, _ in iterate(
                InferenceRequest({}), fake_infer(["a", "b", "c"], fail_after=1)
            ):
                seen.append(part.body)
        assert seen == ["a"]

    aio.run(scenario())


def test_a_part_that_cannot_be_sent_ends_the_request_at_once() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()  # the handler would go on streaming until it is set: never

        async def send_part(prediction: Prediction) -> None:
            if prediction.body == "b":
                raise InferenceFailed("part over max_response_size")

        stream = PredictionStream(InferenceRequest({}), send_part)
        started = asyncio.get_running_loop().time()
        with pytest.raises(InferenceFailed, match="over max_response_size"):
            await stream.run(fake_infer(["a", "b", "c", "d"], gate=gate))
        # Not after the handler's whole stream: the request was cancelled when "b" failed.
        assert asyncio.get_running_loop().time() - started < 5
        current = asyncio.current_task()
        assert current is not None and current.cancelling() == 0

    aio.run(asyncio.wait_for(scenario(), 10))


def test_parts_waiting_for_a_slow_client_are_bounded_in_bytes() -> None:
    """The handler streams without waiting for the client (as in TorchServe): a client that
    falls behind would have the server hold all the stream made so far."""

    async def scenario() -> None:
        async def stuck(prediction: Prediction) -> None:
            await asyncio.Event().wait()  # a client that reads nothing more

        megabyte = bytes(1024 * 1024)
        words: list[Any] = [megabyte] * (MAX_WAITING_BYTES // len(megabyte) + 2) + [b"end"]
        stream = PredictionStream(InferenceRequest({}), stuck)
        with pytest.raises(InferenceFailed, match="slower than the handler writes it"):
            await asyncio.wait_for(stream.run(fake_infer(words)), 30)

    aio.run(scenario())


def test_parts_waiting_for_a_slow_client_are_bounded_in_number() -> None:
    async def scenario() -> None:
        async def stuck(prediction: Prediction) -> None:
            await asyncio.Event().wait()

        words = ["token"] * (MAX_WAITING_PARTS + 2) + ["end"]
        stream = PredictionStream(InferenceRequest({}), stuck)
        with pytest.raises(InferenceFailed, match=f"{MAX_WAITING_PARTS + 1} parts"):
            await asyncio.wait_for(stream.run(fake_infer(words)), 30)

    aio.run(scenario())


def test_iterate_holds_few_parts_ahead_of_a_slow_consumer() -> None:
    """gRPC writes each yielded message before taking the next: parts a slow client has not
    taken wait in the stream, under its bound, not in an unbounded queue in front of it."""

    async def scenario() -> None:
        megabyte = bytes(1024 * 1024)
        words: list[Any] = [megabyte] * (MAX_WAITING_BYTES // len(megabyte) + 20) + [b"end"]
        taken = 0
        with pytest.raises(InferenceFailed, match="slower than the handler writes it"):
            async for _response, _final in iterate(InferenceRequest({}), fake_infer(words)):
                taken += 1
                if taken == 1:
                    await asyncio.sleep(0.5)  # the client falls behind
        assert taken < 20

    aio.run(scenario())


def test_one_large_part_is_not_taken_for_a_slow_client() -> None:
    """A part over the bound with nothing queued before it: its size is max_response_size's
    to bound, not the slow-client rule's."""

    async def scenario() -> None:
        sent: list[int] = []

        async def send_part(prediction: Prediction) -> None:
            sent.append(len(prediction.body))

        huge = bytes(MAX_WAITING_BYTES + 1)
        words: list[Any] = [huge, b"end"]
        stream = PredictionStream(InferenceRequest({}), send_part)
        answer = await stream.run(fake_infer(words))
        assert sent == [len(huge)] and answer.prediction.body == b"end"

    aio.run(scenario())
