"""`api.rpc.ordered.in_order`: requests run together, responses in request order, reading
bounded by the window, a key's requests one after the other, failures neither lost nor
leaked."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from api.rpc.ordered import Earlier, in_order
from tests.support.aio import run


async def numbers(count: int, *, fail_at: int | None = None) -> AsyncIterator[int]:
    for number in range(count):
        if number == fail_at:
            raise ConnectionError("the client's stream broke off")
        yield number


def test_responses_follow_the_requests_order_whatever_finishes_first() -> None:
    async def scenario() -> None:
        async def respond(number: int, earlier: Earlier) -> AsyncIterator[str]:
            await asyncio.sleep(0.01 * (3 - number))  # the last request finishes first
            yield f"{number}a"
            yield f"{number}b"

        got = [r async for r in in_order(numbers(4), respond, window=8)]
        assert got == ["0a", "0b", "1a", "1b", "2a", "2b", "3a", "3b"]

    run(scenario())


@pytest.mark.parametrize(
    ("window", "window_bytes", "started"),
    [
        (3, None, [0, 1, 2]),  # three read ahead and started; a fourth read waits for a slot
        (8, 100, [0, 1]),  # 40 bytes each: a third would pass 100 bytes
    ],
)
def test_requests_run_together_up_to_the_window(
    window: int, window_bytes: int | None, started: list[int]
) -> None:
    async def scenario() -> None:
        running: list[int] = []
        release = asyncio.Event()

        async def respond(number: int, earlier: Earlier) -> AsyncIterator[int]:
            running.append(number)
            await release.wait()
            yield number

        sizes = [40] * 9 + [500]  # the last alone is over the bytes window: it still runs
        responses = in_order(
            numbers(10), respond, window=window, window_bytes=window_bytes, size=sizes.__getitem__
        )
        first = asyncio.ensure_future(anext(responses))
        await asyncio.sleep(0.05)
        assert running == started
        release.set()
        assert await first == 0
        assert [r async for r in responses] == list(range(1, 10))

    run(scenario())


def test_requests_of_one_key_run_one_after_the_other() -> None:
    async def scenario() -> None:
        events: list[str] = []

        async def respond(number: int, earlier: Earlier) -> AsyncIterator[int]:
            events.append(f"start {number}")
            await asyncio.sleep(0.01)
            events.append(f"end {number}")
            yield number

        def key(number: int) -> str | None:
            return None if number == 4 else "odd" if number % 2 else "even"

        got = [r async for r in in_order(numbers(5), respond, window=8, key=key)]
        assert got == [0, 1, 2, 3, 4]
        for before, after in ((0, 2), (1, 3)):  # one key: the next starts once the last ended
            assert events.index(f"start {after}") > events.index(f"end {before}")
        for first, second in ((0, 1), (2, 3), (0, 4)):  # other keys, or none: side by side
            assert events.index(f"start {second}") < events.index(f"end {first}")

    run(scenario())


def test_earlier_waits_for_the_requests_read_before() -> None:
    async def scenario() -> None:
        waited: dict[int, bool] = {}
        release = asyncio.Event()

        async def respond(number: int, earlier: Earlier) -> AsyncIterator[int]:
            if number == 0:
                await release.wait()
            else:
                asyncio.get_running_loop().call_later(0.02, release.set)
                waited[number] = await earlier()
                assert release.is_set()  # it returned only once request 0 had finished
            yield number

        got = [r async for r in in_order(numbers(2), respond, window=8)]
        assert got == [0, 1] and waited == {1: True}

        async def alone(number: int, earlier: Earlier) -> AsyncIterator[bool]:
            yield await earlier()

        assert [r async for r in in_order(numbers(1), alone, window=8)] == [False]

    run(scenario())


def test_a_broken_request_stream_ends_after_the_responses_before_it() -> None:
    async def scenario() -> None:
        async def respond(number: int, earlier: Earlier) -> AsyncIterator[int]:
            await asyncio.sleep(0.01)
            yield number

        got = []
        with pytest.raises(ConnectionError):
            async for response in in_order(numbers(5, fail_at=3), respond, window=8):
                got.append(response)
        assert got == [0, 1, 2]

    run(scenario())


def test_a_failing_respond_is_raised_not_lost() -> None:
    async def scenario() -> None:
        async def respond(number: int, earlier: Earlier) -> AsyncIterator[int]:
            if number == 1:
                raise RuntimeError("a bug")
            yield number

        got = []
        with pytest.raises(RuntimeError, match="a bug"):
            async for response in in_order(numbers(3), respond, window=8):
                got.append(response)
        assert got == [0]

    run(scenario())


def test_closing_early_cancels_what_is_still_running() -> None:
    async def scenario() -> None:
        cancelled: list[int] = []

        async def respond(number: int, earlier: Earlier) -> AsyncIterator[int]:
            try:
                if number > 0:
                    await asyncio.Event().wait()  # never answers
                yield number
            except asyncio.CancelledError:
                cancelled.append(number)
                raise

        responses = in_order(numbers(4), respond, window=8)
        assert await anext(responses) == 0
        await asyncio.sleep(0.01)  # 1..3 read and running
        await responses.aclose()  # type: ignore[attr-defined]
        await asyncio.sleep(0.01)
        assert sorted(cancelled) == [1, 2, 3]

    run(scenario())
