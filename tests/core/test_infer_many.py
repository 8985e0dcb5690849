"""`DataPlane.infer_many`: the instances of one KServe v1 request, routed once."""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import pytest

from api.core.dataplane import DataPlane
from api.core.registry import ModelVersion, Registry
from api.core.routing import TrafficPolicy, TrafficRouter
from api.core.sequences import SEQUENCE_ID, SEQUENCE_START, SequenceBatcher
from api.core.types import (
    REJECT_NOT_READY,
    Backend,
    InferenceRequest,
    ModelSettings,
    NullObserver,
    Prediction,
    header_value,
)
from api.errors import InferenceFailed, ModelNotFound, ModelNotReady, Overloaded
from tests.support import aio
from tests.support.fake_backend import FakeBackend

run = functools.partial(aio.run, timeout=10)


def factory(backend: FakeBackend) -> Callable[[], Awaitable[Backend]]:
    async def make() -> Backend:
        return backend

    return make


async def dataplane(*backends: FakeBackend, batch_size: int = 4) -> DataPlane:
    registry = Registry()
    for backend in backends:
        await registry.register(
            "m",
            backend.version,
            f"m-{backend.version}.mar",
            factory(backend),
            ModelSettings(batch_size=batch_size, max_batch_delay_ms=50),
        )
    router = TrafficRouter(registry, rng=random.Random(7))
    router.set_policy("m", TrafficPolicy.from_json({"weights": {"1.0": 1, "2.0": 1}}))
    return DataPlane(registry, router=router)


def requests(count: int) -> list[InferenceRequest]:
    return [InferenceRequest({"body": str(i).encode()}) for i in range(count)]


def test_instances_share_one_version_and_are_batched() -> None:
    async def scenario() -> list[set[str]]:
        one, two = FakeBackend("m", "1.0"), FakeBackend("m", "2.0")
        plane = await dataplane(one, two)
        versions = []
        for _ in range(20):  # a random 50/50 split per request, never per instance
            answers = await plane.infer_many("m", None, requests(8))
            versions.append({a.prediction.body["version"] for a in answers})
            assert [a.prediction.body["body"] for a in answers] == [str(i) for i in range(8)]
        assert one.batches_seen + two.batches_seen == 40  # 20 requests of 8, batches of 4
        await plane.registry.close()
        return versions

    versions = run(scenario())
    assert all(len(seen) == 1 for seen in versions)
    assert set().union(*versions) == {"1.0", "2.0"}


def test_a_failure_fails_the_request_and_no_instance_is_left_running() -> None:
    async def scenario() -> None:
        backend = FakeBackend("m", "1.0", fail=True)
        plane = await dataplane(backend, FakeBackend("m", "2.0", fail=True))
        with pytest.raises(InferenceFailed):
            await plane.infer_many("m", "1.0", requests(6))
        await asyncio.sleep(0)
        assert plane.registry.get("m", "1.0").batcher.in_flight == 0
        with pytest.raises(ModelNotFound):
            await plane.infer_many("nope", None, [])
        assert await plane.infer_many("m", "1.0", []) == []
        await plane.registry.close()

    run(scenario())


def test_a_version_that_stops_being_ready_under_a_request_is_one_refusal() -> None:
    """Ready when the request is routed, not once its instances are queued: the client's one
    request is counted once as refused (not ready), not once per instance."""

    class Rejections(NullObserver):
        def __init__(self) -> None:
            self.reasons: list[str] = []

        def request_rejected(self, model: str, version: str, reason: str) -> None:
            self.reasons.append(reason)

    async def scenario() -> None:
        registry = Registry()
        await registry.register(
            "m", "1.0", "m.mar", factory(FakeBackend("m", "1.0")), ModelSettings()
        )
        observer = Rejections()
        plane = DataPlane(registry, observer=observer)
        ready_version = registry.ready_version
        calls = 0

        def ready_once(
            name: str, version: str | None = None, *, or_starting: bool = False
        ) -> ModelVersion:
            nonlocal calls
            calls += 1
            if calls > 1:  # its last worker died between routing and queueing
                raise ModelNotReady("Model m version 1.0 has no live worker")
            return ready_version(name, version, or_starting=or_starting)

        registry.ready_version = ready_once  # type: ignore[method-assign]
        with pytest.raises(ModelNotReady):
            await plane.infer_many("m", None, requests(5))
        assert observer.reasons == [REJECT_NOT_READY]
        await registry.close()

    run(scenario())


async def gated(*, batch_size: int, job_queue_size: int) -> tuple[DataPlane, asyncio.Event]:
    """Model "m" 1.0 alone, on one worker whose batches wait for the event."""
    backend = FakeBackend("m", "1.0")
    backend.gate = asyncio.Event()
    registry = Registry()
    settings = ModelSettings(batch_size=batch_size, job_queue_size=job_queue_size)
    await registry.register("m", "1.0", "m.mar", factory(backend), settings)
    return DataPlane(registry), backend.gate


async def settle() -> None:
    """Let every task that can run, run: queueing, batching, a gated batch reaching its gate."""
    for _ in range(20):
        await asyncio.sleep(0)


def test_more_instances_than_the_job_queue_holds_are_answered_in_turns() -> None:
    """An idle server answers a request with more instances than `job_queue_size`: no more
    than the queue had room for wait at once, the rest are queued as those are answered.
    Queued all at once, those past the queue's size would be refused (503), however often the
    client retried."""

    async def scenario() -> None:
        plane, gate = await gated(batch_size=2, job_queue_size=3)
        batcher = plane.registry.get("m", "1.0").batcher
        answering = asyncio.ensure_future(plane.infer_many("m", "1.0", requests(10)))
        await settle()
        assert batcher.in_flight == 3  # a batch of 2 at the worker, 1 queued
        gate.set()
        answers = await answering
        assert [a.prediction.body["body"] for a in answers] == [str(i) for i in range(10)]
        await plane.registry.close()

    run(scenario())


def test_a_request_takes_the_queue_room_that_was_free_and_a_full_queue_refuses_it() -> None:
    """Under load a request holds no more of the queue than was free when it came, not one
    place per instance; a queue already full refuses it at once, 503 with Retry-After, as it
    would a request of one instance."""

    async def scenario() -> None:
        plane, gate = await gated(batch_size=1, job_queue_size=4)
        batcher = plane.registry.get("m", "1.0").batcher
        others = [
            asyncio.ensure_future(plane.infer("m", "1.0", request)) for request in requests(3)
        ]
        await settle()  # one at the worker, two queued: room for two
        answering = asyncio.ensure_future(plane.infer_many("m", "1.0", requests(6)))
        await settle()
        assert batcher.depth == 4
        with pytest.raises(Overloaded) as refused:
            await plane.infer_many("m", "1.0", requests(2))
        assert refused.value.retry_after == 1
        gate.set()
        answers = await answering
        assert [a.prediction.body["body"] for a in answers] == [str(i) for i in range(6)]
        assert [(await other).prediction.ok for other in others] == [True] * 3
        await plane.registry.close()

    run(scenario())


def test_a_refused_request_is_refused_once_and_its_other_instances_never_queued() -> None:
    """At a full queue the first instance is refused, 503; the turn it held is not given to the
    next, which would be queued, refused and counted in its turn, one per instance."""

    async def scenario() -> None:
        plane, gate = await gated(batch_size=1, job_queue_size=2)
        batcher = plane.registry.get("m", "1.0").batcher
        others = []
        while batcher.depth < 2:  # the worker holds some; the queue fills behind them
            others.append(asyncio.ensure_future(plane.infer("m", "1.0", requests(1)[0])))
            await settle()
        submitted = 0
        submit = batcher.submit

        def counted_submit(request: InferenceRequest, *, alone: bool = False) -> Any:
            nonlocal submitted
            submitted += 1
            return submit(request, alone=alone)

        batcher.submit = counted_submit  # type: ignore[method-assign]
        with pytest.raises(Overloaded):
            await plane.infer_many("m", "1.0", requests(5))
        await settle()
        assert submitted == 1
        gate.set()
        await asyncio.gather(*others)
        await plane.registry.close()

    run(scenario())


class SummingWorker:
    """examples/stateful's handler reduced to its rule: a running sum per sequence id."""

    device = "cpu"

    def __init__(self) -> None:
        self.sums: dict[str, int] = {}

    async def predict(self, batch: Sequence[InferenceRequest]) -> list[Prediction]:
        answers = []
        for request in batch:
            if request.inputs["body"] == "fail":
                raise RuntimeError("fails on purpose")
            if request.inputs["body"] == "bad":  # the handler's own error for this item
                answers.append(Prediction({"code": 400, "message": "bad step"}, 400))
                continue
            sequence_id = header_value(request.headers, SEQUENCE_ID) or ""
            self.sums[sequence_id] = self.sums.get(sequence_id, 0) + int(request.inputs["body"])
            start = header_value(request.headers, SEQUENCE_START)
            answers.append(Prediction({"sum": self.sums[sequence_id], "start": start}))
        return answers

    async def close(self) -> None:
        pass


class SummingBackend:
    batches = True
    signature: Mapping[str, Any] | None = None
    manifest: Mapping[str, Any] = {}

    def __init__(self) -> None:
        self.worker = SummingWorker()

    async def start_worker(self, index: int) -> SummingWorker:
        return self.worker

    async def close(self) -> None:
        pass


async def stateful_dataplane() -> DataPlane:
    """A sequence batching version with TorchServe's default limits: one sequence at a time,
    one request queued on it."""
    registry = Registry()

    async def make() -> Backend:
        return SummingBackend()

    settings = ModelSettings(sequence_batching=True, sequence_max_idle_ms=60_000)
    await registry.register("s", "1.0", "s.mar", make, settings)
    return DataPlane(registry)


def live_sequences(plane: DataPlane) -> list[str]:
    batcher = plane.registry.get("s").batcher
    assert isinstance(batcher, SequenceBatcher)
    return list(batcher.sequences)


def sequence_steps(
    *bodies: str, headers: Mapping[str, str] | None = None
) -> list[InferenceRequest]:
    shared = dict(headers or {})  # one dict for all, as api.rest.kserve_v1 builds them
    return [InferenceRequest({"body": body}, shared) for body in bodies]


def test_a_stateful_models_instances_are_steps_of_the_sequence_the_first_started() -> None:
    """TorchServe runs a request as one step of one sequence. Queued together, the instances
    of a request naming no sequence would each start one (the second: 503, maxNumSequence 1)."""

    async def scenario() -> None:
        plane = await stateful_dataplane()
        steps = sequence_steps("1", "2", "3")
        answers = await plane.infer_many("s", None, steps)
        assert [a.prediction.body["sum"] for a in answers] == [1, 3, 6]
        assert [a.prediction.body["start"] for a in answers] == ["true", None, None]
        assert len({r.headers[SEQUENCE_ID] for r in steps}) == 1
        assert live_sequences(plane) == [steps[0].headers[SEQUENCE_ID]]
        await plane.registry.close()

    run(scenario())


def test_a_stateful_models_instances_are_steps_of_the_clients_sequence() -> None:
    """Queued together on the client's sequence, the second instance would be refused (503,
    maxSequenceJobQueueSize 1)."""

    async def scenario() -> None:
        plane = await stateful_dataplane()
        named = {SEQUENCE_ID: "s-1"}
        answers = await plane.infer_many("s", None, sequence_steps("1", "2", headers=named))
        assert [a.prediction.body["sum"] for a in answers] == [1, 3]
        later = await plane.infer_many("s", None, sequence_steps("4", headers=named))
        assert [a.prediction.body["sum"] for a in later] == [7]
        assert live_sequences(plane) == ["s-1"]
        await plane.registry.close()

    run(scenario())


def test_a_step_the_handler_answers_with_an_error_ends_the_request() -> None:
    """A handler's per-item error is an answer, not an exception: the steps after it must not
    run all the same (the client, told the request failed, would send them again)."""

    async def scenario() -> None:
        plane = await stateful_dataplane()
        named = {SEQUENCE_ID: "s-1"}
        answers = await plane.infer_many("s", None, sequence_steps("1", "bad", "5", headers=named))
        assert [a.prediction.status for a in answers] == [200, 400]
        answers = await plane.infer_many("s", None, sequence_steps("10", headers=named))
        assert [a.prediction.body["sum"] for a in answers] == [11]  # 5 never ran
        await plane.registry.close()

    run(scenario())


def test_a_failed_step_ends_the_request_and_the_rest_never_run() -> None:
    async def scenario() -> None:
        plane = await stateful_dataplane()
        named = {SEQUENCE_ID: "s-1"}
        with pytest.raises(InferenceFailed):
            await plane.infer_many("s", None, sequence_steps("1", "fail", "5", headers=named))
        answers = await plane.infer_many("s", None, sequence_steps("10", headers=named))
        assert [a.prediction.body["sum"] for a in answers] == [11]  # 5 never ran
        await plane.registry.close()

    run(scenario())
