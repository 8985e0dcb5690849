"""The batcher, with fake workers and an injected clock: no test here waits on a timer."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence

import pytest

from api.core.batching import Batcher
from api.core.types import InferenceRequest, NotRun, Prediction
from api.errors import DeadlineExceeded, InferenceFailed, Overloaded
from tests.support import aio


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class GatedWorker:
    """Records batches; each batch waits for the gate, so tests decide when work finishes."""

    device = "cpu"

    def __init__(self, *, gate: asyncio.Event | None = None) -> None:
        self.batches: list[list[str]] = []
        self.gate = gate
        self.started = asyncio.Event()

    async def predict(self, batch: Sequence[InferenceRequest]) -> list[Prediction]:
        self.batches.append([r.request_id for r in batch])
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        return [
            Prediction(r.request_id, status=400 if r.request_id == "bad" else 200) for r in batch
        ]

    async def close(self) -> None:
        pass


def request(rid: str) -> InferenceRequest:
    return InferenceRequest({"body": rid}, {}, rid)


def make_batcher(clock: FakeClock | None = None, **overrides: float) -> Batcher:
    settings = {
        "max_batch_size": 4,
        "max_batch_delay_s": 1000.0,  # a wait would hang the test: it must never happen here
        "queue_size": 100,
        "response_timeout_s": 60.0,
    }
    settings.update(overrides)
    return Batcher(
        model="m",
        version="1.0",
        max_batch_size=int(settings["max_batch_size"]),
        max_batch_delay_s=settings["max_batch_delay_s"],
        queue_size=int(settings["queue_size"]),
        response_timeout_s=settings["response_timeout_s"],
        clock=clock or FakeClock(),
    )


run = functools.partial(aio.run, timeout=10)


def test_lone_request_at_idle_worker_is_not_held() -> None:
    async def scenario() -> None:
        batcher = make_batcher()
        worker = GatedWorker()
        task = asyncio.create_task(batcher.serve(worker))
        prediction = await batcher.submit(request("a"))
        assert prediction.body == "a"
        assert prediction.batch_size == 1
        assert worker.batches == [["a"]]
        task.cancel()

    run(scenario())


def test_burst_is_served_in_full_batches_in_order() -> None:
    async def scenario() -> None:
        batcher = make_batcher()
        worker = GatedWorker()
        futures = [batcher.submit(request(str(i))) for i in range(10)]
        task = asyncio.create_task(batcher.serve(worker))
        results = await asyncio.gather(*futures)
        assert [p.body for p in results] == [str(i) for i in range(10)]
        assert worker.batches == [["0", "1", "2", "3"], ["4", "5", "6", "7"], ["8", "9"]]
        task.cancel()

    run(scenario())


def test_idle_model_never_holds_a_partial_batch() -> None:
    async def scenario() -> None:
        batcher = make_batcher()  # max_batch_delay 1000 s: a hold would hang the test
        futures = [batcher.submit(request(x)) for x in ("a", "b")]
        worker = GatedWorker()
        task = asyncio.create_task(batcher.serve(worker))
        await asyncio.gather(*futures)
        assert worker.batches == [["a", "b"]]
        task.cancel()

    run(scenario())


def test_saturated_model_holds_a_partial_batch_until_full() -> None:
    async def scenario() -> None:
        batcher = make_batcher()
        gate = asyncio.Event()
        busy, second = GatedWorker(gate=gate), GatedWorker()
        tasks = [asyncio.create_task(batcher.serve(busy))]
        first = batcher.submit(request("first"))
        await busy.started.wait()  # one worker is busy: the model is saturated
        tasks.append(asyncio.create_task(batcher.serve(second)))
        pending = [batcher.submit(request("a"))]
        await asyncio.sleep(0)
        assert second.batches == []  # "a" is held for company while the other worker runs
        pending += [batcher.submit(request(x)) for x in ("b", "c", "d")]
        await asyncio.gather(*pending)
        assert second.batches == [["a", "b", "c", "d"]]
        gate.set()
        await first
        for task in tasks:
            task.cancel()

    run(scenario())


def test_a_held_batch_goes_as_soon_as_no_other_batch_runs() -> None:
    async def scenario() -> None:
        batcher = make_batcher()  # max_batch_delay 1000 s: only the running batch ending frees it
        gate = asyncio.Event()
        busy, second = GatedWorker(gate=gate), GatedWorker()
        tasks = [asyncio.create_task(batcher.serve(busy))]
        first = batcher.submit(request("first"))
        await busy.started.wait()
        tasks.append(asyncio.create_task(batcher.serve(second)))
        held = batcher.submit(request("a"))
        await asyncio.sleep(0)
        assert second.batches == []  # held for company while "first" runs
        gate.set()  # "first" is answered: holding "a" now would only leave compute idle
        await first
        assert (await held).body == "a"
        assert second.batches == [["a"]] or busy.batches[1:] == [["a"]]
        for task in tasks:
            task.cancel()

    run(scenario())


def test_delay_clock_starts_at_first_arrival() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        batcher = make_batcher(clock, max_batch_delay_s=0.005)
        gate = asyncio.Event()
        busy, second = GatedWorker(gate=gate), GatedWorker()
        tasks = [asyncio.create_task(batcher.serve(busy))]
        first = batcher.submit(request("first"))
        await busy.started.wait()
        queued = [batcher.submit(request(x)) for x in ("a", "b")]
        clock.now = 1.0  # "a" has waited longer than max_batch_delay: no more waiting for it
        tasks.append(asyncio.create_task(batcher.serve(second)))
        await asyncio.gather(*queued)
        assert second.batches == [["a", "b"]]
        gate.set()
        await first
        for task in tasks:
            task.cancel()

    run(scenario())


def test_full_queue_is_refused_at_once_with_retry_after() -> None:
    async def scenario() -> None:
        batcher = make_batcher(queue_size=2)
        batcher.submit(request("a"))
        batcher.submit(request("b"))
        with pytest.raises(Overloaded) as error:
            batcher.submit(request("c"))
        assert error.value.retry_after is not None

    run(scenario())


def test_expired_requests_get_504_and_never_run() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        batcher = make_batcher(clock, response_timeout_s=1.0)
        worker = GatedWorker()
        stale = batcher.submit(request("stale"))
        clock.now = 2.0
        fresh = batcher.submit(request("fresh"))
        task = asyncio.create_task(batcher.serve(worker))
        with pytest.raises(DeadlineExceeded):
            await stale
        assert (await fresh).body == "fresh"
        assert worker.batches == [["fresh"]]
        task.cancel()

    run(scenario())


def test_abandoned_requests_are_skipped_before_inference() -> None:
    async def scenario() -> None:
        batcher = make_batcher()
        worker = GatedWorker()
        gone = batcher.submit(request("gone"))
        kept = batcher.submit(request("kept"))
        gone.cancel()  # what a client disconnect or a dataplane timeout does
        task = asyncio.create_task(batcher.serve(worker))
        await kept
        assert worker.batches == [["kept"]]
        task.cancel()

    run(scenario())


def test_per_item_status_fails_only_that_item() -> None:
    async def scenario() -> None:
        batcher = make_batcher()
        futures = [batcher.submit(request(x)) for x in ("a", "bad", "c")]
        task = asyncio.create_task(batcher.serve(GatedWorker()))
        results = await asyncio.gather(*futures)
        assert [p.status for p in results] == [200, 400, 200]
        task.cancel()

    run(scenario())


class CrashingWorker(GatedWorker):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def predict(self, batch: Sequence[InferenceRequest]) -> list[Prediction]:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("CUDA went away")
        if self.calls == 2:
            return []  # the wrong number of answers
        return await super().predict(batch)


def test_crashing_handler_fails_its_batch_and_the_model_keeps_serving() -> None:
    async def scenario() -> None:
        batcher = make_batcher(max_batch_size=2)
        first = [batcher.submit(request(x)) for x in ("a", "b")]
        second = [batcher.submit(request(x)) for x in ("c", "d")]
        third = batcher.submit(request("e"))
        task = asyncio.create_task(batcher.serve(CrashingWorker()))
        for future in first + second:
            with pytest.raises(InferenceFailed):
                await future
        assert (await third).body == "e"
        task.cancel()

    run(scenario())


def test_drain_finishes_queued_work_and_refuses_new() -> None:
    async def scenario() -> None:
        batcher = make_batcher()
        futures = [batcher.submit(request(str(i))) for i in range(6)]
        task = asyncio.create_task(batcher.serve(GatedWorker()))
        await batcher.drain()
        assert all(f.done() and not f.exception() for f in futures)
        with pytest.raises(Overloaded):
            batcher.submit(request("late"))
        task.cancel()

    run(scenario())


def test_drain_ends_once_every_queued_request_was_answered_without_a_worker() -> None:
    """With no live worker no lane takes a queued request off the queue, even once the
    dataplane has answered it 504 at its deadline: a drain (DELETE, shutdown) waited forever."""

    async def scenario() -> None:
        batcher = make_batcher()
        before = batcher.submit(request("before"))
        after = batcher.submit(request("after"))
        before.set_exception(DeadlineExceeded("answered before the drain"))
        drained = asyncio.create_task(batcher.drain())
        await asyncio.sleep(0)
        assert not drained.done()  # "after" still waits for a worker
        after.cancel()  # its client went away
        await asyncio.wait_for(drained, 5)
        assert isinstance(before.exception(), DeadlineExceeded)

    run(scenario())


def test_drain_ends_when_a_dead_workers_given_back_batch_is_answered() -> None:
    """A batch given back by a worker that died while draining is watched too."""

    async def scenario() -> None:
        batcher = make_batcher(max_batch_size=1)
        running, waiting = batcher.submit(request("a")), batcher.submit(request("b"))
        dying = PipelinedWorker()
        serving = asyncio.create_task(batcher.serve(dying))
        while len(dying.batches) < 2:
            await asyncio.sleep(0)
        drained = asyncio.create_task(batcher.drain())
        dying.die()  # "a" fails, "b" goes back to the queue: nobody is left to run it
        with pytest.raises(InferenceFailed):
            await running
        await asyncio.sleep(0)
        assert not drained.done()
        waiting.set_exception(DeadlineExceeded("the dataplane's 504"))
        await asyncio.wait_for(drained, 5)
        serving.cancel()

    run(scenario())


def test_stopping_a_worker_mid_batch_still_answers_the_batch() -> None:
    async def scenario() -> None:
        batcher = make_batcher()
        gate = asyncio.Event()
        worker = GatedWorker(gate=gate)
        task = asyncio.create_task(batcher.serve(worker))
        future = batcher.submit(request("a"))
        await worker.started.wait()
        task.cancel()
        await asyncio.sleep(0)
        gate.set()
        assert (await future).body == "a"
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario())


def test_stopping_a_stuck_worker_gives_up_after_the_response_timeout() -> None:
    async def scenario() -> None:
        # 50 ms against a handler that never returns
        batcher = make_batcher(response_timeout_s=0.05)
        worker = GatedWorker(gate=asyncio.Event())  # the gate never opens
        # As a process worker: it keeps its own time, so only the stop's wait bounds the
        # batch (with the batcher's own 50 ms wait too, which of the two fires first depends
        # on how late this test resumes on a busy host: 504 or 500).
        worker.keeps_time = True  # type: ignore[attr-defined]
        task = asyncio.create_task(batcher.serve(worker))
        future = batcher.submit(request("stuck"))
        await worker.started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(InferenceFailed):
            await future

    run(scenario())


class SerialWorker:
    """A process-like worker: batches pipelined to it run one after another, `seconds` each."""

    device = "cpu"
    pipeline_depth = 2
    keeps_time = True

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = 0
        self._one_at_a_time = asyncio.Lock()

    async def predict(self, batch: Sequence[InferenceRequest]) -> list[Prediction]:
        self.started += 1
        async with self._one_at_a_time:
            await asyncio.sleep(self.seconds)
        return [Prediction(r.request_id) for r in batch]

    async def close(self) -> None:
        pass


def test_stopping_a_pipelining_worker_gives_each_batch_in_hand_its_own_timeout() -> None:
    """Two batches of 0.6 timeouts each, run one after the other by the leaving worker: both
    are within their timeout, and both are answered (the second failed once the first
    had used up a single timeout shared by all)."""

    async def scenario() -> None:
        batcher = make_batcher(max_batch_size=1, response_timeout_s=0.5)
        worker = SerialWorker(0.3)
        task = asyncio.create_task(batcher.serve(worker))
        futures = [batcher.submit(request("a")), batcher.submit(request("b"))]
        while worker.started < 2:
            await asyncio.sleep(0)
        task.cancel()
        assert [(await future).body for future in futures] == ["a", "b"]
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario())


class PipelinedWorker:
    """A process-like worker that takes batches ahead (`pipeline_depth`) until `die()`: the
    batch it was running fails, the ones waiting behind it are given back (NotRun)."""

    device = "cpu"
    pipeline_depth = 2
    keeps_time = True

    def __init__(self) -> None:
        self.alive = True
        self.batches: list[list[str]] = []
        self._calls: list[asyncio.Future[list[Prediction]]] = []

    async def predict(self, batch: Sequence[InferenceRequest]) -> list[Prediction]:
        self.batches.append([r.request_id for r in batch])
        call: asyncio.Future[list[Prediction]] = asyncio.get_running_loop().create_future()
        self._calls.append(call)
        return await call

    def die(self) -> None:
        self.alive = False
        for index, call in enumerate(self._calls):
            call.set_exception(InferenceFailed("died") if index == 0 else NotRun())

    async def close(self) -> None:
        pass


def test_batches_a_dead_worker_never_started_go_to_the_next_in_arrival_order() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        batcher = make_batcher(clock, max_batch_size=2)
        futures = []
        for index in range(8):
            clock.now = float(index)
            futures.append(batcher.submit(request(f"r{index}")))
        dying = PipelinedWorker()
        serving = asyncio.create_task(batcher.serve(dying))
        while len(dying.batches) < 4:  # two lanes, and two overload lanes for full batches
            await asyncio.sleep(0)
        assert dying.batches == [["r0", "r1"], ["r2", "r3"], ["r4", "r5"], ["r6", "r7"]]
        dying.die()
        await serving
        for running in futures[:2]:  # the batch it was running fails
            with pytest.raises(InferenceFailed):
                await running
        worker = GatedWorker()
        task = asyncio.create_task(batcher.serve(worker))
        assert [(await f).body for f in futures[2:]] == [f"r{i}" for i in range(2, 8)]
        assert worker.batches == [["r2", "r3"], ["r4", "r5"], ["r6", "r7"]]
        task.cancel()

    run(scenario())


async def given_back_by_a_dying_worker(
    clock: FakeClock,
) -> tuple[Batcher, asyncio.Future[Prediction], asyncio.Task[None]]:
    """ "a" runs on a worker that takes "b" ahead; "a" runs past its 1 s timeout (the clock is
    at 1.5 s), the worker is killed, and "b", never started, comes back to the queue."""
    batcher = make_batcher(clock, max_batch_size=1, response_timeout_s=1.0)
    running, waiting = batcher.submit(request("a")), batcher.submit(request("b"))
    dying = PipelinedWorker()
    serving = asyncio.create_task(batcher.serve(dying))
    while len(dying.batches) < 2:
        await asyncio.sleep(0)
    clock.now = 1.5
    dying.die()
    with pytest.raises(InferenceFailed):
        await running
    return batcher, waiting, serving


def test_a_batch_a_dead_worker_never_started_queues_afresh() -> None:
    """A batch given back unrun kept the queue deadline it got on arrival: held by a worker
    that ran out its responseTimeout on the batch before it, it was past that deadline when
    it came back, and was answered 504 "timed out in the queue" instead of being run."""

    async def scenario() -> None:
        clock = FakeClock()
        batcher, waiting, serving = await given_back_by_a_dying_worker(clock)
        clock.now = 2.0  # "b" waits in the queue again, less than a responseTimeout
        worker = GatedWorker()
        task = asyncio.create_task(batcher.serve(worker))
        assert (await waiting).body == "b"
        assert worker.batches == [["b"]]
        for serving_task in (serving, task):
            serving_task.cancel()

    run(scenario())


def test_a_given_back_request_still_times_out_in_the_queue() -> None:
    """Queued afresh, not for ever: a full responseTimeout from when it came back."""

    async def scenario() -> None:
        clock = FakeClock()
        batcher, waiting, serving = await given_back_by_a_dying_worker(clock)
        clock.now = 2.6  # no worker took "b" within a responseTimeout of its return
        task = asyncio.create_task(batcher.serve(GatedWorker()))
        with pytest.raises(DeadlineExceeded, match="timed out in the queue"):
            await waiting
        for serving_task in (serving, task):
            serving_task.cancel()

    run(scenario())


def test_answered_requests_do_not_fill_the_queue() -> None:
    """Requests answered while queued (client gone, 504) leave the queue only when a lane
    takes them off, which no lane does while every worker is busy: they filled it, and live
    clients were refused 503 "job queue is full" with nothing live queued."""

    async def scenario() -> None:
        batcher = make_batcher(queue_size=3)
        gate = asyncio.Event()
        worker = GatedWorker(gate=gate)
        task = asyncio.create_task(batcher.serve(worker))
        first = batcher.submit(request("first"))
        await worker.started.wait()  # the only worker is busy: nothing leaves the queue
        for gone in [batcher.submit(request(f"gone{i}")) for i in range(3)]:
            gone.cancel()
        live = batcher.submit(request("live"))
        assert (batcher.depth, batcher.pending) == (1, 1)  # live requests only
        gate.set()
        assert [(await f).body for f in (first, live)] == ["first", "live"]
        task.cancel()

    run(scenario())


def test_a_queue_full_of_live_requests_is_still_refused() -> None:
    async def scenario() -> None:
        batcher = make_batcher(queue_size=2)
        batcher.submit(request("a")).cancel()
        batcher.submit(request("b"))
        batcher.submit(request("c"))  # room made by dropping "a"
        with pytest.raises(Overloaded):
            batcher.submit(request("d"))
        assert batcher.depth == 2

    run(scenario())
