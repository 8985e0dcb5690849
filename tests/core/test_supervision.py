"""`supervise`: a slot's worker is served, replaced when it exits, and restarted with backoff
while starting fails, as TorchServe restarts its workers. Fake workers stand in for processes
here; tests/integration/test_worker_faults.py does the same with real ones."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from types import SimpleNamespace

import pytest

from api.core import supervision
from api.core.batching import Batcher
from api.core.supervision import FAILED_AFTER, WorkerSlot, supervise
from api.core.types import InferenceRequest, Prediction
from api.errors import HandlerLoadError
from tests.support import aio

run = functools.partial(aio.run, timeout=10)


class MortalWorker:
    """Answers every request with its own number until `die()`."""

    device = "cpu"

    def __init__(self, number: int) -> None:
        self.number = number
        self.exited: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    async def predict(self, batch: Sequence[InferenceRequest]) -> list[Prediction]:
        return [Prediction(self.number) for _ in batch]

    def die(self) -> None:
        self.exited.set_result("exit code 3")

    async def close(self) -> None:
        pass


def make_batcher() -> Batcher:
    return Batcher(
        model="m",
        version="1.0",
        max_batch_size=1,
        max_batch_delay_s=0.0,
        queue_size=10,
        response_timeout_s=5.0,
    )


@pytest.fixture
def delays(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The backoff waits `supervise` asked for, each shortened to nothing."""
    asked: list[float] = []
    sleep = asyncio.sleep

    async def recorded(seconds: float) -> None:
        asked.append(seconds)
        await sleep(0)

    # Only supervision's view of asyncio: the test's own sleeps stay real and unrecorded.
    patched = SimpleNamespace(**{**vars(asyncio), "sleep": recorded})
    monkeypatch.setattr(supervision, "asyncio", patched)
    return asked


def test_a_worker_that_exits_is_replaced_at_once(delays: list[float]) -> None:
    """A worker that had started fine is replaced without waiting, each time, as TorchServe
    does (its backoff resets when a worker loads): a request that crashed it costs itself."""

    async def scenario() -> None:
        batcher = make_batcher()
        workers: list[MortalWorker] = []

        async def start(index: int) -> MortalWorker:
            workers.append(MortalWorker(len(workers)))
            return workers[-1]

        slot = WorkerSlot(0, await start(0))
        changes: list[str] = []
        task = asyncio.ensure_future(
            supervise(slot, batcher, start, lambda: changes.append(slot.status), "m/1.0")
        )
        assert (await batcher.submit(InferenceRequest({"body": 1}))).body == 0
        workers[0].die()
        while slot.restarts == 0:
            await asyncio.sleep(0)
        assert (await batcher.submit(InferenceRequest({"body": 2}))).body == 1
        assert slot.status == "READY"
        assert slot.last_error == "worker 0 exit code 3"
        assert changes == ["RESTARTING", "READY"]
        assert delays == [supervision.RESTART_BACKOFF_S[0]]  # no wait: the first one is 0
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(scenario())


def test_failing_starts_back_off_then_fail_the_slot_until_one_succeeds(
    delays: list[float],
) -> None:
    async def scenario() -> None:
        attempts = 0

        async def start(index: int) -> MortalWorker:
            nonlocal attempts
            attempts += 1
            if attempts <= FAILED_AFTER + 1:
                raise HandlerLoadError("weights are missing")
            assert slot.last_error == "weights are missing"  # what describe shows meanwhile
            return MortalWorker(attempts)

        # As the registry leaves a slot whose first start failed at server start-up.
        slot = WorkerSlot(0, None, failed_starts=1, starting=True)
        seen: list[tuple[str, int]] = []
        task = asyncio.ensure_future(
            supervise(
                slot,
                make_batcher(),
                start,
                lambda: seen.append((slot.status, slot.failed_starts)),
                "m/1.0",
            )
        )
        while slot.worker is None:
            await asyncio.sleep(0)
        # STARTING until FAILED_AFTER failures in a row, then FAILED with the handler's
        # message, then READY once a start succeeds; each failure waits longer than the last.
        assert seen == [
            ("STARTING", 2),
            ("FAILED", 3),
            ("FAILED", 4),
            ("FAILED", 5),
            ("READY", 0),
        ]
        assert slot.status == "READY" and slot.failed_starts == 0
        assert slot.restarts == 0  # it never served before: a start, not a restart
        assert delays == list(supervision.RESTART_BACKOFF_S[1:6])
        assert delays == sorted(delays) and len(set(delays)) == len(delays)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(scenario())
