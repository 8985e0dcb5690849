"""`DataPlane.infer_many`: the instances of one KServe v1 request, routed once."""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Awaitable, Callable

import pytest

from api.core.dataplane import DataPlane
from api.core.registry import ModelVersion, Registry
from api.core.routing import TrafficPolicy, TrafficRouter
from api.core.types import (
    REJECT_NOT_READY,
    Backend,
    InferenceRequest,
    ModelSettings,
    NullObserver,
)
from api.errors import InferenceFailed, ModelNotFound, ModelNotReady
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

        def ready_once(name: str, version: str | None = None) -> ModelVersion:
            nonlocal calls
            calls += 1
            if calls > 1:  # its last worker died between routing and queueing
                raise ModelNotReady("Model m version 1.0 has no live worker")
            return ready_version(name, version)

        registry.ready_version = ready_once  # type: ignore[method-assign]
        with pytest.raises(ModelNotReady):
            await plane.infer_many("m", None, requests(5))
        assert observer.reasons == [REJECT_NOT_READY]
        await registry.close()

    run(scenario())
