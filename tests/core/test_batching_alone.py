"""Requests that run in a batch of their own (`Batcher.submit`'s `alone`: TorchServe's describe
request), with the fakes of test_batching: no test here waits on a timer.

`BaseHandler` reads `describe` on a batch's first row only and then answers once for the whole
batch, so a describe request batched with predictions failed them all.
"""

from __future__ import annotations

import asyncio

import pytest

from api.core.batching import Batcher
from api.core.types import Prediction
from api.errors import DeadlineExceeded
from tests.core.test_batching import FakeClock, GatedWorker, make_batcher, request, run
from tests.core.test_sequences import FakeClock as SequenceClock
from tests.core.test_sequences import SummingWorker, make, req, serving, stop


async def served_in_one_go(
    batcher: Batcher, queued: list[asyncio.Future[Prediction]]
) -> list[list[str]]:
    """Run what is queued on one worker started only now; its batches."""
    worker = GatedWorker()
    task = asyncio.create_task(batcher.serve(worker))
    answers = await asyncio.gather(*queued)
    assert [p.batch_size for p in answers] == [
        len(batch) for batch in worker.batches for _ in batch
    ]
    task.cancel()
    return worker.batches


def test_the_batch_before_a_request_that_runs_alone_closes_at_it() -> None:
    async def scenario() -> None:
        batcher = make_batcher()  # batches of 4
        queued = [batcher.submit(request(x)) for x in ("a", "b")]
        queued.append(batcher.submit(request("describe"), alone=True))
        queued += [batcher.submit(request(x)) for x in ("c", "d")]
        assert await served_in_one_go(batcher, queued) == [
            ["a", "b"],
            ["describe"],
            ["c", "d"],  # the requests after it still batch together
        ]

    run(scenario())


def test_nothing_queued_after_a_request_that_runs_alone_joins_it() -> None:
    async def scenario() -> None:
        batcher = make_batcher()
        queued = [batcher.submit(request("describe"), alone=True)]
        queued += [batcher.submit(request(x)) for x in ("a", "b", "c", "d", "e")]
        assert await served_in_one_go(batcher, queued) == [
            ["describe"],
            ["a", "b", "c", "d"],
            ["e"],
        ]

    run(scenario())


def test_requests_that_run_alone_one_after_another_each_run_alone() -> None:
    async def scenario() -> None:
        batcher = make_batcher()
        queued = [batcher.submit(request(x), alone=True) for x in ("d1", "d2")]
        queued.append(batcher.submit(request("a")))
        assert await served_in_one_go(batcher, queued) == [["d1"], ["d2"], ["a"]]

    run(scenario())


def test_a_batch_held_for_company_goes_once_a_request_that_runs_alone_is_next() -> None:
    """While the model is saturated a batch waits to fill (here up to 1000 s: a hang). A request
    that runs alone arriving behind it closes it, opens a batch nobody joins, and the requests
    after it batch together in their turn."""

    async def scenario() -> None:
        batcher = make_batcher()
        gate = asyncio.Event()
        busy, second = GatedWorker(gate=gate), GatedWorker()
        tasks = [asyncio.create_task(batcher.serve(busy))]
        first = batcher.submit(request("first"))
        await busy.started.wait()  # one worker is busy: the model is saturated
        tasks.append(asyncio.create_task(batcher.serve(second)))
        held = batcher.submit(request("a"))
        await asyncio.sleep(0)
        assert second.batches == []  # "a" is held for company
        alone = batcher.submit(request("describe"), alone=True)
        after = [batcher.submit(request(x)) for x in ("b", "c", "d", "e")]
        await asyncio.gather(held, alone, *after)
        assert second.batches == [["a"], ["describe"], ["b", "c", "d", "e"]]
        gate.set()
        await first
        for task in tasks:
            task.cancel()

    run(scenario())


def test_an_abandoned_request_that_runs_alone_splits_no_batch() -> None:
    async def scenario() -> None:
        batcher = make_batcher()
        queued = [batcher.submit(request("a"))]
        batcher.submit(request("describe"), alone=True).cancel()  # its client went away
        queued.append(batcher.submit(request("b")))
        assert await served_in_one_go(batcher, queued) == [["a", "b"]]

    run(scenario())


def test_an_expired_request_that_runs_alone_is_answered_504_and_splits_nothing() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        batcher = make_batcher(clock, response_timeout_s=1.0)
        late = batcher.submit(request("describe"), alone=True)
        clock.now = 2.0
        queued = [batcher.submit(request(x)) for x in ("a", "b")]
        assert await served_in_one_go(batcher, queued) == [["a", "b"]]
        with pytest.raises(DeadlineExceeded, match="timed out in the queue"):
            await late

    run(scenario())


def test_a_sequence_batchers_request_that_runs_alone_shares_no_batch() -> None:
    """A stateful model's describe request is a sequence of its own (it names none), and
    runs with no other sequence's request: `BaseHandler` would answer once for the batch."""

    async def scenario() -> None:
        batcher = make(SequenceClock(), max_num_sequence=8)  # batches of 4
        first = [batcher.submit(req(n, f"seq_{n}")) for n in (1, 2)]
        alone = batcher.submit(req(5), alone=True)
        later = [batcher.submit(req(n, f"seq_{n}")) for n in (3, 4)]
        worker = SummingWorker("a")
        tasks = await serving(batcher, worker)
        answers = await asyncio.gather(*first, alone, *later)
        await stop(tasks)
        assert answers[2].body == {"sum": 5, "worker": "a"}
        [describe] = [ids for ids in worker.batches if len(ids) == 1]
        assert describe[0].startswith("ts-seq-")  # its own new sequence
        assert sorted(len(ids) for ids in worker.batches) == [1, 4]  # the others together

    run(scenario())


def test_a_sequence_batcher_answers_a_request_that_runs_alone() -> None:
    """`SequenceBatcher` keeps queues per sequence, not `Batcher`'s: the request is queued
    there (a sequence of its own) and answered, not lost in a queue nobody serves."""

    async def scenario() -> None:
        batcher = make(SequenceClock())
        tasks = await serving(batcher, SummingWorker("a"))
        answer = await batcher.submit(req(5), alone=True)
        await stop(tasks)
        assert answer.body == {"sum": 5, "worker": "a"}

    run(scenario())
