"""Requests and scales while a version's workers start for the first time.

TorchServe 0.12 holds a prediction in its queue while the version's workers start (after an
asynchronous register, a scale-up from 0) and answers it once one is up; torchgate answered
503 at once. A scale-up that loses a race with the version's DELETE answered "Workers scaled";
TorchServe answers 500, torchgate now the 404 a scale of a version that is gone gets.
"""

from __future__ import annotations

import asyncio
import functools
from types import SimpleNamespace

import pytest

from api.core import supervision
from api.core.dataplane import Answer, DataPlane
from api.core.registry import ModelState, Registry
from api.core.types import InferenceRequest, ModelSettings
from api.errors import (
    DeadlineExceeded,
    HandlerLoadError,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    VersionNotFound,
)
from tests.support import aio
from tests.support.echo_backend import EchoBackend, EchoWorker, factory

run = functools.partial(aio.run, timeout=10)


class Gated(EchoBackend):
    """A handler whose `initialize` waits for `gate`, then fails `failures` times."""

    def __init__(self, version: str) -> None:
        super().__init__(version)
        self.gate = asyncio.Event()
        self.failures = 0
        self.starts = 0

    async def start_worker(self, index: int) -> EchoWorker:
        self.starts += 1
        await self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise HandlerLoadError("initialize failed: weights are missing")
        return await super().start_worker(index)


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Failed starts retried at once: a version is FAILED after its third, without 0.75 s."""
    sleep = asyncio.sleep

    async def at_once(_seconds: float) -> None:
        await sleep(0)

    patched = SimpleNamespace(**{**vars(asyncio), "sleep": at_once})
    monkeypatch.setattr(supervision, "asyncio", patched)


async def queued_prediction(dataplane: DataPlane, body: int) -> asyncio.Future[Answer]:
    """A prediction sent now, still waiting (not refused) a moment later."""
    answer = asyncio.ensure_future(dataplane.infer("m", None, InferenceRequest({"body": body})))
    await asyncio.sleep(0.05)
    assert not answer.done(), answer.exception()
    return answer


def test_an_asynchronous_register_queues_predictions_until_a_worker_is_up() -> None:
    async def scenario() -> None:
        registry = Registry()
        dataplane = DataPlane(registry)
        backend = Gated("1.0")
        await registry.register("m", "1.0", "m.mar", factory(backend), ModelSettings(), wait=False)
        answer = await queued_prediction(dataplane, 1)
        # Queued, but not ready: v2 ready, routing and describe still say so.
        assert not dataplane.model_ready("m")
        assert registry.get("m").unavailable == "Model m version 1.0 has no live worker: starting"
        backend.gate.set()
        prediction = (await answer).prediction
        assert prediction.body == {"version": "1.0", "body": 1}
        await registry.close()

    run(scenario())


@pytest.mark.parametrize("wait", [True, False])
def test_a_scale_up_from_zero_queues_predictions_until_a_worker_is_up(wait: bool) -> None:
    async def scenario() -> None:
        registry = Registry()
        dataplane = DataPlane(registry)
        backend = Gated("1.0")
        backend.gate.set()
        await registry.register("m", "1.0", "m.mar", factory(backend), ModelSettings())
        await registry.scale("m", None, 0, 0)
        with pytest.raises(ModelNotReady, match="has no workers"):  # none asked for: refused
            await dataplane.infer("m", None, InferenceRequest({"body": 0}))
        backend.gate.clear()
        scaling = asyncio.ensure_future(registry.scale("m", None, 1, 1, wait=wait))
        answer = await queued_prediction(dataplane, 2)
        backend.gate.set()
        prediction = (await answer).prediction
        assert prediction.body == {"version": "1.0", "body": 2}
        await scaling
        await registry.close()

    run(scenario())


def test_a_worker_that_never_starts_leaves_a_queued_prediction_its_timeout() -> None:
    async def scenario() -> None:
        registry = Registry()
        dataplane = DataPlane(registry)
        settings = ModelSettings(response_timeout_s=0.05)
        await registry.register("m", "1.0", "m.mar", factory(Gated("1.0")), settings, wait=False)
        with pytest.raises(DeadlineExceeded):
            await dataplane.infer("m", None, InferenceRequest({"body": 0}))
        await registry.close()

    run(scenario())


def test_a_restart_after_a_failed_start_is_still_refused_with_retry_after() -> None:
    """Only a first start in progress holds requests; once a start has failed the slot is
    being restarted, and that window answers 503 with Retry-After, as a crash's does."""

    async def scenario() -> None:
        registry = Registry()
        dataplane = DataPlane(registry)
        backend = Gated("1.0")
        backend.failures = 1
        backend.gate.set()
        await registry.register("m", "1.0", "m.mar", factory(backend), ModelSettings(), wait=False)
        (slot,) = registry.get("m").workers
        while not slot.failed_starts:
            await asyncio.sleep(0.001)
        # In the retry's backoff (0.25 s): refused, and told when to try again.
        with pytest.raises(ModelNotReady, match="weights are missing") as refused:
            await dataplane.infer("m", None, InferenceRequest({"body": 0}))
        assert refused.value.retry_after == 1
        await registry.close()

    run(scenario())


def test_a_crashed_workers_restart_is_still_refused_with_retry_after() -> None:
    async def scenario() -> None:
        registry = Registry()
        dataplane = DataPlane(registry)
        backend = Gated("1.0")
        backend.gate.set()
        await registry.register("m", "1.0", "m.mar", factory(backend), ModelSettings())
        (slot,) = registry.get("m").workers
        slot.worker = None  # as `supervise` leaves a slot whose worker exited
        with pytest.raises(ModelNotReady, match="no live worker") as refused:
            await dataplane.infer("m", None, InferenceRequest({"body": 0}))
        assert refused.value.retry_after == 1
        await registry.close()

    run(scenario())


def test_queued_predictions_are_answered_once_the_starts_fail_for_good(no_backoff: None) -> None:
    """FAILED (FAILED_AFTER failed starts, no live worker): what waited for the start gets the
    handler's error now, not a 504 at its response timeout."""

    async def scenario() -> None:
        registry = Registry()
        dataplane = DataPlane(registry)
        backend = Gated("1.0")
        settings = ModelSettings(response_timeout_s=100.0)
        await registry.register("m", "1.0", "m.mar", factory(backend), settings, wait=False)
        answer = await queued_prediction(dataplane, 0)
        backend.failures = 100
        backend.gate.set()
        with pytest.raises(ModelNotReady, match="failed: initialize failed: weights") as failed:
            await asyncio.wait_for(answer, 2.0)
        assert failed.value.retry_after is None
        assert registry.get("m").state is ModelState.FAILED
        await registry.close()

    run(scenario())


@pytest.mark.parametrize("named", [False, True])
def test_a_synchronous_scale_up_overtaken_by_a_delete_says_the_version_is_gone(
    named: bool,
) -> None:
    """Its workers were stopped before they started because the version went: not "scaled"
    (TorchServe: 500), but the 404 a scale of it gets now."""

    async def scenario() -> None:
        registry = Registry()
        backend = Gated("1.0")
        backend.gate.set()
        await registry.register("solo", "1.0", "s.mar", factory(backend), ModelSettings())
        backend.gate.clear()
        version = "1.0" if named else None
        scaling = asyncio.ensure_future(registry.scale("solo", version, 4, 4))
        while len(registry.get("solo").workers) < 4:  # its slots added: it waits on them
            await asyncio.sleep(0.001)
        await registry.unregister("solo")
        with pytest.raises(ModelNotFound) as gone:
            await asyncio.wait_for(scaling, 2.0)
        assert type(gone.value) is ModelNotFound
        assert gone.value.message == "Model not found: solo"
        await registry.close()

    run(scenario())


def test_a_scale_up_of_a_version_deleted_beside_others_names_the_version() -> None:
    async def scenario() -> None:
        registry = Registry()
        first, second = Gated("1.0"), Gated("2.0")
        first.gate.set()
        second.gate.set()
        await registry.register("m", "1.0", "m.mar", factory(first), ModelSettings())
        await registry.register("m", "2.0", "m2.mar", factory(second), ModelSettings())
        second.gate.clear()
        scaling = asyncio.ensure_future(registry.scale("m", "2.0", 3, 3))
        while len(registry.get("m", "2.0").workers) < 3:  # its slots added: it waits on them
            await asyncio.sleep(0.001)
        await registry.unregister("m", "2.0")
        with pytest.raises(VersionNotFound) as gone:
            await asyncio.wait_for(scaling, 2.0)
        assert gone.value.message == "Model version: 2.0 does not exist for model: m"
        await registry.close()

    run(scenario())


def test_a_scale_up_that_meets_the_servers_stop_is_told_so() -> None:
    """Not 404: the model was never unregistered; the stop took the slots it waited on."""

    async def scenario() -> None:
        registry = Registry()
        backend = Gated("1.0")
        backend.gate.set()
        await registry.register("solo", "1.0", "s.mar", factory(backend), ModelSettings())
        backend.gate.clear()
        scaling = asyncio.ensure_future(registry.scale("solo", None, 4, 4))
        while len(registry.get("solo").workers) < 4:  # its slots added: it waits on them
            await asyncio.sleep(0.001)
        await registry.close()
        with pytest.raises(Overloaded, match="the server is stopping"):
            await asyncio.wait_for(scaling, 2.0)

    run(scenario())
