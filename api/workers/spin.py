"""Polling instead of sleeping while a worker round trip is about to complete.

On a lightly loaded host every request pays for wake-ups: the worker sleeps in `recv` until
its batch comes, the event loop sleeps in `epoll_wait` until the answer comes, and each
sleeping CPU may go idle (in a VM, an exit to the hypervisor) and lose its caches. On the
2-core VM that was half of a 1-connection request's 0.63 ms. Both sides therefore poll for a
short while (`torchgate.spin_us`, 250 us by default) before they sleep: the worker in
`wire.FrameReader`, the event loop with `LoopSpinner`. Both yield the CPU between polls, so
whatever else is runnable on that CPU goes first; 0 turns polling off.
"""

from __future__ import annotations

import asyncio
import os
import time

DEFAULT_SPIN_US = 250


class LoopSpinner:
    """Keeps an event loop polling for `spin` seconds after a worker call starts or ends.

    A callback that reschedules itself with `call_soon` keeps uvloop (and asyncio) from
    sleeping: with a callback ready, the loop polls its sockets with a zero timeout. It polls
    only while at most one call is in flight: with more, answers come anyway and the CPU is
    worth more to the workers (at 8 connections, polling regardless cost 8 % of throughput).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, spin: float) -> None:
        self._loop = loop
        self._spin = spin
        self._calls = 0
        self._until = 0.0
        self._polling = False

    def call_started(self) -> None:
        self._calls += 1
        self._extend()

    def call_ended(self) -> None:
        self._calls -= 1
        self._extend()

    def _extend(self) -> None:
        if not self._spin or self._calls > 1:
            return
        self._until = time.perf_counter() + self._spin
        if not self._polling:
            self._polling = True
            self._loop.call_soon(self._poll)

    def _poll(self) -> None:
        if self._calls <= 1 and time.perf_counter() < self._until:
            os.sched_yield()
            self._loop.call_soon(self._poll)
        else:
            self._polling = False
