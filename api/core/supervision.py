"""Keeping a model version's workers alive: serve, notice a death, restart with backoff.

Each worker slot of a version runs `supervise` as one task. It feeds the worker batches
(`Batcher.serve`) until the worker's process exits, then starts a replacement in the same slot,
as TorchServe restarts a dead worker:

- the batch the dead worker held has already failed (500, or 504 when the worker was killed at
  its deadline); queued requests stay queued for the version's other workers or the replacement;
- restarts back off (`RESTART_BACKOFF_S`) while starting keeps failing, and after
  `FAILED_AFTER` failed starts in a row the slot reports the handler's error; once no slot of a
  version has a live worker, the version is not ready and refuses requests with that reason;
- a start that succeeds resets the backoff, so a handler that crashes on one bad request serves
  again at once, without an operator.

A worker without `exited` (a remote TorchServe's proxy, a test fake) never dies: `supervise`
just serves it until the slot is stopped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from api.core.batching import Batcher
from api.core.types import Worker

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (0.0, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
FAILED_AFTER = 3  # failed starts in a row before a slot reports its error as a failure

StartWorker = Callable[[int], Awaitable[Worker]]


@dataclass(eq=False)
class WorkerSlot:
    """One of a version's `min_workers` places; its worker is None while being replaced."""

    index: int
    worker: Worker | None
    task: asyncio.Task[None] | None = None
    started_at: float = field(default_factory=time.time)
    restarts: int = 0
    failed_starts: int = 0  # in a row; reset by a start that succeeds
    last_error: str | None = None
    # Began without a worker (started in the background, or its first start failed) and has
    # not served yet: its first start is a start, not a restart.
    starting: bool = False
    # When (time.monotonic) its worker last stopped or failed to start, while no start has
    # succeeded since (TorchServe's recoveryStartTS); None while it serves or starts afresh.
    failing_since: float | None = None
    # Describe's worker id: unique in the server and never reused, as TorchServe's (9000, 9001,
    # ... across every model); kept across restarts of the slot's worker.
    id: int = 0
    # Seconds its worker's latest successful start took (TorchServe's WorkerLoadTime).
    load_s: float | None = None

    @property
    def live(self) -> bool:
        return self.worker is not None and getattr(self.worker, "alive", True)

    @property
    def failed(self) -> bool:
        return self.worker is None and self.failed_starts >= FAILED_AFTER

    def given_up(self, window_s: float) -> bool:
        """Failing for `window_s` or longer (TorchServe's maxRetryTimeoutInSec): such a
        worker no longer counts toward the server's health."""
        since = self.failing_since
        return self.worker is None and since is not None and time.monotonic() - since >= window_s

    @property
    def status(self) -> str:
        if self.live:
            return "READY"
        if self.failed:
            return "FAILED"
        return "STARTING" if self.starting else "RESTARTING"


async def supervise(
    slot: WorkerSlot,
    batcher: Batcher,
    start: StartWorker,
    on_change: Callable[[], None],
    label: str,
) -> None:
    """Serve and replace the slot's worker until cancelled (see the module docstring).

    A slot may begin without a worker (`starting`: an asynchronous register or scale, or its
    first start failed at server start-up): it is then started with backoff first, as a
    replacement would be.
    """
    while True:
        if slot.worker is None:
            await _start_with_backoff(slot, start, on_change, label)
        worker = slot.worker
        assert worker is not None
        reason = await _serve_until_exit(batcher, worker)
        slot.worker = None
        slot.failing_since = time.monotonic()
        slot.last_error = f"worker {slot.index} {reason}"
        log.warning("%s worker %d exited (%s); restarting it", label, slot.index, reason)
        on_change()


def start_error(exc: Exception) -> str:
    """A failed start's error as a slot reports it (`WorkerSlot.last_error`)."""
    return getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"


async def _start_with_backoff(
    slot: WorkerSlot, start: StartWorker, on_change: Callable[[], None], label: str
) -> None:
    while slot.worker is None:
        await asyncio.sleep(RESTART_BACKOFF_S[min(slot.failed_starts, len(RESTART_BACKOFF_S) - 1)])
        began = time.monotonic()
        try:
            replacement = await start(slot.index)
        except Exception as exc:
            slot.failed_starts += 1
            if slot.failing_since is None:
                slot.failing_since = time.monotonic()
            slot.last_error = start_error(exc)
            log.error(
                "%s worker %d failed to start (%d in a row): %s",
                label,
                slot.index,
                slot.failed_starts,
                slot.last_error,
            )
            on_change()
            continue
        slot.worker = replacement
        slot.load_s = time.monotonic() - began
        slot.failed_starts = 0
        slot.failing_since = None
        slot.started_at = time.time()
        if slot.starting:
            slot.starting = False
            log.info("%s worker %d started", label, slot.index)
        else:
            slot.restarts += 1
            log.info("%s worker %d restarted (%d restarts)", label, slot.index, slot.restarts)
        on_change()


async def _serve_until_exit(batcher: Batcher, worker: Worker) -> str:
    """Run `batcher.serve(worker)` until the worker's process has exited; how it exited.

    Cancelled (the slot is stopping), it cancels the serving task, which finishes the batch in
    hand first.
    """
    exited: asyncio.Future[str] | None = getattr(worker, "exited", None)
    serving = asyncio.ensure_future(batcher.serve(worker))
    try:
        if exited is None:
            await serving
            raise RuntimeError("Batcher.serve returned for a worker that cannot exit")
        either: list[asyncio.Future[Any]] = [serving, exited]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if serving.done():
            serving.result()  # a bug in serving: raise it here, not swallow it
        return await exited
    finally:
        if not serving.done():
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
