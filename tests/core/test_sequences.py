"""Sequence batching with fake stateful workers and an injected clock: nothing waits on a timer.

The fake worker is examples/stateful's handler reduced to its rule: a running sum per sequence
id, kept in the worker that ran it, so pinning and state isolation are visible in the answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from api.core.registry import Registry
from api.core.sequences import (
    SEQUENCE_ID,
    SEQUENCE_START,
    SequenceBatcher,
    describe_fields,
    refused_message,
    sequence_limits,
)
from api.core.types import (
    Backend,
    InferenceRequest,
    ModelSettings,
    NotRun,
    Prediction,
    Worker,
    header_value,
)
from api.errors import Overloaded
from tests.support import aio


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SummingWorker:
    """Adds each request's body to its sequence's sum; `gate` holds batches until set."""

    device = "cpu"

    def __init__(self, name: str, gate: asyncio.Event | None = None) -> None:
        self.name = name
        self.sums: dict[str, int] = {}
        self.batches: list[list[str]] = []
        self.gate = gate

    async def predict(self, batch: Sequence[InferenceRequest]) -> list[Prediction]:
        ids = [header_value(r.headers, SEQUENCE_ID) or "" for r in batch]
        self.batches.append(ids)
        if self.gate is not None:
            await self.gate.wait()
        out = []
        for sequence_id, request in zip(ids, batch, strict=True):
            self.sums[sequence_id] = self.sums.get(sequence_id, 0) + int(request.inputs["body"])
            out.append(Prediction({"sum": self.sums[sequence_id], "worker": self.name}))
        return out

    async def close(self) -> None:
        pass


def make(clock: FakeClock, **limits: float) -> SequenceBatcher:
    values: dict[str, float] = {
        "max_num_sequence": 4,
        "max_sequence_job_queue_size": 2,
        "sequence_max_idle_ms": 1000,
        "sequence_timeout_ms": 0,
    }
    values.update(limits)
    return SequenceBatcher(
        model="stateful",
        version="1.0",
        max_batch_size=4,
        max_batch_delay_s=0.1,
        queue_size=100,
        response_timeout_s=60.0,
        limits=sequence_limits(
            max_num_sequence=int(values["max_num_sequence"]),
            max_sequence_job_queue_size=int(values["max_sequence_job_queue_size"]),
            sequence_max_idle_ms=values["sequence_max_idle_ms"],
            sequence_timeout_ms=values["sequence_timeout_ms"],
        ),
        clock=clock,
    )


def req(body: int, sequence_id: str | None = None) -> InferenceRequest:
    headers = {SEQUENCE_ID: sequence_id} if sequence_id is not None else {}
    return InferenceRequest({"body": str(body)}, headers, f"r{body}")


async def serving(batcher: SequenceBatcher, *workers: SummingWorker) -> list[asyncio.Task[None]]:
    tasks = [asyncio.create_task(batcher.serve(w)) for w in workers]
    await asyncio.sleep(0)
    return tasks


async def stop(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def test_a_sequence_keeps_its_state_on_one_worker() -> None:
    async def scenario() -> None:
        batcher = make(FakeClock())
        a, b = SummingWorker("a"), SummingWorker("b")
        tasks = await serving(batcher, a, b)
        answers = [(await batcher.submit(req(n, "seq_0"))).body for n in (1, 2, 3)]
        other = [(await batcher.submit(req(n, "seq_1"))).body for n in (10, 20)]
        await stop(tasks)
        assert [x["sum"] for x in answers] == [1, 3, 6]
        assert len({x["worker"] for x in answers}) == 1
        assert [x["sum"] for x in other] == [10, 30]

    aio.run(scenario())


def test_requests_without_an_id_start_new_sequences_and_never_share_state() -> None:
    async def scenario() -> None:
        batcher = make(FakeClock())
        worker = SummingWorker("a")
        tasks = await serving(batcher, worker)
        first, second = req(5), req(7)
        answers = [(await batcher.submit(r)).body["sum"] for r in (first, second)]
        await stop(tasks)
        assert answers == [5, 7]
        for r in (first, second):
            assert r.headers[SEQUENCE_START] == "true"
            assert r.headers[SEQUENCE_ID].startswith("ts-seq-")
        assert first.headers[SEQUENCE_ID] != second.headers[SEQUENCE_ID]

    aio.run(scenario())


def test_a_batch_holds_one_request_per_sequence_in_order() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        batcher = make(FakeClock(), max_sequence_job_queue_size=3)
        worker = SummingWorker("a", gate)
        futures = [batcher.submit(req(n, "s")) for n in (1, 2)]
        futures.append(batcher.submit(req(100, "t")))
        tasks = await serving(batcher, worker)
        gate.set()
        answers = [(await f).body["sum"] for f in futures]
        await stop(tasks)
        assert worker.batches == [["s", "t"], ["s"]]
        assert answers == [1, 3, 100]

    aio.run(scenario())


def test_max_num_sequence_refuses_a_new_sequence_with_503() -> None:
    async def scenario() -> None:
        batcher = make(FakeClock(), max_num_sequence=2)
        batcher.submit(req(1, "a"))
        batcher.submit(req(1, "b"))
        batcher.submit(req(1, "a"))  # an existing sequence still queues
        with pytest.raises(Overloaded) as refused:
            batcher.submit(req(1, "c"))
        assert refused.value.message == refused_message("stateful")
        assert refused.value.retry_after is None  # TorchServe sends no Retry-After here
        batcher.fail_queued(Overloaded("gone"))

    aio.run(scenario())


def test_max_sequence_job_queue_size_bounds_each_sequence() -> None:
    async def scenario() -> None:
        batcher = make(FakeClock(), max_sequence_job_queue_size=2)
        batcher.submit(req(1, "a"))
        batcher.submit(req(2, "a"))
        with pytest.raises(Overloaded):
            batcher.submit(req(3, "a"))
        batcher.submit(req(1, "b"))  # other sequences are not affected
        batcher.fail_queued(Overloaded("gone"))

    aio.run(scenario())


def test_an_idle_sequence_expires_and_its_id_starts_afresh() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        batcher = make(clock, max_num_sequence=1, sequence_max_idle_ms=1000)
        worker = SummingWorker("a")
        tasks = await serving(batcher, worker)
        assert (await batcher.submit(req(4, "s"))).body["sum"] == 4
        clock.now = 0.9
        assert (await batcher.submit(req(4, "s"))).body["sum"] == 8  # still within idle time
        with pytest.raises(Overloaded):
            batcher.submit(req(1, "other"))  # maxNumSequence 1: "s" still holds the slot
        clock.now = 2.0  # idle 1.1 s > 1 s: "s" has ended
        assert list(batcher.sequences) == []
        assert (await batcher.submit(req(1, "other"))).body["sum"] == 1
        await stop(tasks)

    aio.run(scenario())


def test_sequence_timeout_ends_a_busy_sequence_once_idle() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        batcher = make(clock, sequence_max_idle_ms=10_000, sequence_timeout_ms=1000)
        tasks = await serving(batcher, SummingWorker("a"))
        await batcher.submit(req(1, "s"))
        clock.now = 0.5
        await batcher.submit(req(1, "s"))
        assert "s" in batcher.sequences
        clock.now = 1.5
        assert "s" not in batcher.sequences
        await stop(tasks)

    aio.run(scenario())


def test_without_sequence_max_idle_every_request_is_refused() -> None:
    async def scenario() -> None:
        batcher = make(FakeClock(), sequence_max_idle_ms=0)
        with pytest.raises(Overloaded, match="sequenceMaxIdleMSec"):
            batcher.submit(req(1, "s"))

    aio.run(scenario())


def test_a_dead_workers_sequences_move_to_another_worker() -> None:
    async def scenario() -> None:
        batcher = make(FakeClock())
        a, b = SummingWorker("a"), SummingWorker("b")
        task_a = asyncio.create_task(batcher.serve(a))
        await asyncio.sleep(0)
        assert (await batcher.submit(req(1, "s"))).body["worker"] == "a"
        await stop([task_a])
        tasks = await serving(batcher, b)
        assert (await batcher.submit(req(1, "s"))).body == {"sum": 1, "worker": "b"}
        await stop(tasks)

    aio.run(scenario())


def test_drain_waits_for_queued_requests() -> None:
    async def scenario() -> None:
        batcher = make(FakeClock())
        future = batcher.submit(req(3, "s"))
        tasks = await serving(batcher, SummingWorker("a"))
        await batcher.drain()
        assert future.result().body["sum"] == 3
        with pytest.raises(Overloaded):
            batcher.submit(req(1, "s"))
        await stop(tasks)

    aio.run(scenario())


def test_drain_ends_once_every_queued_request_was_answered_without_a_worker() -> None:
    async def scenario() -> None:
        batcher = make(FakeClock())
        future = batcher.submit(req(3, "s"))
        drained = asyncio.create_task(batcher.drain())
        await asyncio.sleep(0)
        assert not drained.done()
        future.cancel()  # answered by the dataplane, or its client went away: no worker runs it
        await asyncio.wait_for(drained, 5)

    aio.run(scenario())


def test_stopping_a_worker_mid_batch_still_answers_the_batch() -> None:
    """A scale-down cancels the worker's serving: the batch it runs is answered, as a plain
    batcher's is, not failed with "its worker was stopped"."""

    async def scenario() -> None:
        batcher = make(FakeClock())
        gate = asyncio.Event()
        worker = SummingWorker("a", gate)
        tasks = await serving(batcher, worker)
        future = batcher.submit(req(5, "s"))
        while not worker.batches:
            await asyncio.sleep(0)
        tasks[0].cancel()
        await asyncio.sleep(0)
        gate.set()
        assert (await future).body == {"sum": 5, "worker": "a"}
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]

    aio.run(scenario())


class EchoBackend:
    batches = True
    signature: Mapping[str, Any] | None = None
    manifest: Mapping[str, Any] = {}

    async def start_worker(self, index: int) -> Worker:
        return SummingWorker(str(index))

    async def close(self) -> None:
        pass


def test_the_registry_uses_sequence_batching_for_such_versions() -> None:
    async def scenario() -> None:
        registry = Registry()

        async def factory() -> Backend:
            return EchoBackend()

        stateful = ModelSettings(sequence_batching=True, sequence_max_idle_ms=1000)
        version = await registry.register("m", "1.0", "m.mar", factory, stateful)
        plain = await registry.register("p", "1.0", "p.mar", factory, ModelSettings())
        assert isinstance(version.batcher, SequenceBatcher)
        assert not isinstance(plain.batcher, SequenceBatcher)
        await registry.close()

    aio.run(scenario())


def test_describe_fields_as_torchserve_shows_them() -> None:
    assert describe_fields(ModelSettings()) == {
        "stateful": False,
        "sequenceMaxIdleMSec": 0,
        "sequenceTimeoutMSec": 0,
        "maxNumSequence": 0,
        "maxSequenceJobQueueSize": 0,
    }
    stateful = ModelSettings(
        sequence_batching=True,
        sequence_max_idle_ms=1500,
        max_num_sequence=2,
        max_sequence_job_queue_size=2,
    )
    assert describe_fields(stateful) == {
        "stateful": True,
        "sequenceMaxIdleMSec": 1500,
        "sequenceTimeoutMSec": 0,
        "maxNumSequence": 2,
        "maxSequenceJobQueueSize": 2,
    }


class NeverStartingWorker:
    """Takes a batch, then dies before starting it (NotRun) once `die` is set."""

    device = "cpu"

    def __init__(self) -> None:
        self.alive = True
        self.die = asyncio.Event()

    async def predict(self, batch: Sequence[InferenceRequest]) -> list[Prediction]:
        await self.die.wait()
        self.alive = False
        raise NotRun()

    async def close(self) -> None:
        pass


def test_a_sequence_request_a_dead_worker_never_started_queues_afresh() -> None:
    """As in the plain batcher: its arrival deadline ran on while the dying worker held it,
    and it came back past it, answered 504 "timed out" instead of run."""

    async def scenario() -> None:
        clock = FakeClock()
        batcher = make(clock)
        batcher.response_timeout_s = 1.0
        dying = NeverStartingWorker()
        tasks = await serving(batcher, dying)  # type: ignore[arg-type]
        future = batcher.submit(req(4, "s"))
        await asyncio.sleep(0.01)
        clock.now = 1.5
        dying.die.set()
        await asyncio.sleep(0.01)
        clock.now = 2.0  # back in the queue for less than a responseTimeout
        tasks += await serving(batcher, SummingWorker("b"))
        assert (await asyncio.wait_for(future, 5)).body == {"sum": 4, "worker": "b"}
        await stop(tasks)

    aio.run(scenario())


class StartWatchingWorker(SummingWorker):
    """A `SummingWorker` that notes which requests were marked as a sequence's start."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.starts: list[bool] = []

    async def predict(self, batch: Sequence[InferenceRequest]) -> list[Prediction]:
        self.starts += [header_value(r.headers, SEQUENCE_START) == "true" for r in batch]
        return await super().predict(batch)


def test_a_moved_sequences_next_request_is_marked_as_a_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its handler state stayed with the worker that ended: the request that carries it on
    elsewhere says so (`ts_request_sequence_start: true`), once, and the log counts the
    sequences moved; a sequence that never ran on the ended worker is not marked."""

    async def scenario() -> None:
        batcher = make(FakeClock())
        a, b = StartWatchingWorker("a"), StartWatchingWorker("b")
        task_a = asyncio.create_task(batcher.serve(a))
        await asyncio.sleep(0)
        await batcher.submit(req(1, "s"))
        await stop([task_a])
        tasks = await serving(batcher, b)
        for n in (2, 3):
            assert (await batcher.submit(req(n, "s"))).body["worker"] == "b"
        await batcher.submit(req(7, "other"))
        await stop(tasks)
        assert a.starts == [False]
        assert b.starts == [True, False, False]

    with caplog.at_level(logging.INFO, logger="api.core.sequences"):
        aio.run(scenario())
    moved = [r.getMessage() for r in caplog.records if "lost their worker" in r.getMessage()]
    assert moved[0] == (  # the other when the test stops its second worker
        "stateful/1.0: 1 sequence(s) lost their worker and its state; their next requests "
        "start afresh on another worker, marked ts_request_sequence_start: true"
    )


def test_a_request_whose_client_went_away_still_runs_in_its_sequence() -> None:
    """The sequence's state is every request it took in turn, as TorchServe runs them: one
    abandoned while queued still reaches the handler (its answer dropped)."""

    async def scenario() -> None:
        batcher = make(FakeClock(), max_sequence_job_queue_size=4)
        gate = asyncio.Event()
        worker = SummingWorker("a", gate)
        tasks = await serving(batcher, worker)
        running = batcher.submit(req(1, "s"))
        await asyncio.sleep(0)
        abandoned = batcher.submit(req(10, "s"))
        abandoned.cancel()  # its client went away
        last = batcher.submit(req(100, "s"))
        gate.set()
        await running
        assert (await last).body == {"sum": 111, "worker": "a"}
        await stop(tasks)

    aio.run(scenario())
