"""`LoopSpinner`: the event loop polls instead of sleeping while one worker call is about to
complete, and sleeps again once the window has passed or more calls are in flight."""

from __future__ import annotations

import asyncio
import selectors
from typing import Any

from api.workers.spin import LoopSpinner


class CountingSelector(selectors.EpollSelector):  # the loop's selector on Linux
    """Counts the loop's polls (zero timeout) and sleeps (any other timeout)."""

    polls = sleeps = 0

    def select(self, timeout: float | None = None) -> Any:
        if timeout == 0:
            self.polls += 1
        else:
            self.sleeps += 1
        return super().select(timeout)


def run_with_counts(scenario: Any) -> Any:
    selector = CountingSelector()
    loop = asyncio.SelectorEventLoop(selector)
    try:
        return loop.run_until_complete(scenario(loop, selector))
    finally:
        loop.close()


def test_one_call_in_flight_keeps_the_loop_polling_for_the_window() -> None:
    async def scenario(loop: asyncio.AbstractEventLoop, selector: CountingSelector) -> None:
        spinner = LoopSpinner(loop, 0.05)
        spinner.call_started()
        before = selector.sleeps
        await asyncio.sleep(0.02)  # the timer would normally put the loop to sleep
        assert selector.sleeps == before, "no sleep inside the window"
        assert selector.polls > 10
        spinner.call_ended()  # the answer: polling goes on for the next request
        await asyncio.sleep(0.02)
        assert selector.sleeps == before
        await asyncio.sleep(0.1)  # past the window: the loop sleeps again
        polls = selector.polls
        await asyncio.sleep(0.02)
        assert selector.sleeps > before and selector.polls - polls < 3

    run_with_counts(scenario)


def test_with_two_calls_in_flight_or_no_window_the_loop_sleeps() -> None:
    async def scenario(loop: asyncio.AbstractEventLoop, selector: CountingSelector) -> None:
        busy = LoopSpinner(loop, 0.05)
        busy.call_started()
        busy.call_started()
        off = LoopSpinner(loop, 0.0)
        off.call_started()
        await asyncio.sleep(0)
        polls = selector.polls
        await asyncio.sleep(0.02)
        assert selector.polls - polls < 3

    run_with_counts(scenario)
