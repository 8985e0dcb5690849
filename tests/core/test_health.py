"""Server health as TorchServe's /ping computes it, per-model readiness, and the worker bound."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Sequence

import pytest

from api.core.dataplane import DataPlane
from api.core.registry import Registry
from api.core.supervision import WorkerSlot
from api.core.types import InferenceRequest, ModelSettings, Prediction
from api.errors import BadRequest, HandlerLoadError, http_status
from tests.support import aio
from tests.support.echo_backend import EchoBackend, EchoWorker, factory

run = functools.partial(aio.run, timeout=20)


class BrokenBackend(EchoBackend):
    """A handler whose initialize() always raises."""

    async def start_worker(self, index: int) -> EchoWorker:
        raise HandlerLoadError("initialize: weights are missing")


def test_a_model_scaled_to_zero_leaves_the_server_healthy_but_is_not_ready() -> None:
    async def scenario() -> None:
        registry = Registry()
        dataplane = DataPlane(registry)
        await registry.register("a", "1.0", "a.mar", factory(EchoBackend("1.0")), ModelSettings())
        await registry.register(
            "idle", "1.0", "b.mar", factory(EchoBackend("1.0")), ModelSettings(min_workers=0)
        )
        assert dataplane.ready()
        assert dataplane.model_ready("a") and not dataplane.model_ready("idle")
        assert registry.get("idle").unavailable == "Model idle version 1.0 has no workers"
        dataplane.accepting = False  # SIGTERM: unhealthy whatever the models
        assert not dataplane.ready()

    run(scenario())


def test_a_version_failing_past_its_retry_window_makes_the_server_unhealthy() -> None:
    """TorchServe's rule: a worker that keeps failing counts toward /ping until it has failed
    for maxRetryTimeoutInSec (300 s by default; 1 s here); its version's own clients are told
    at once (FAILED after FAILED_AFTER starts, not ready, 503)."""

    async def scenario() -> None:
        registry = Registry()
        dataplane = DataPlane(registry)
        await registry.register("a", "1.0", "a.mar", factory(EchoBackend("1.0")), ModelSettings())
        await registry.register(
            "broken", "1.0", "b.mar", factory(BrokenBackend("1.0")),
            ModelSettings(max_retry_timeout_s=1.0), keep_failed=True,
        )  # fmt: skip
        broken = registry.get("broken")
        while broken.state.value != "FAILED":
            await asyncio.sleep(0.05)
        assert not dataplane.model_ready("broken") and dataplane.model_ready("a")
        assert "weights are missing" in (broken.unavailable or "")
        # Failing for less than the window: still counted, as TorchServe's worker retrying.
        (slot,) = broken.workers
        assert slot.failing_since is not None
        if time.monotonic() - slot.failing_since < 0.9:
            assert dataplane.ready()
        while time.monotonic() - slot.failing_since < 1.0:
            await asyncio.sleep(0.05)
        assert not dataplane.ready()
        await registry.close()

    run(scenario())


def test_the_retry_window_restarts_with_each_success() -> None:
    """A worker that served and then died starts a new window: its earlier failures do not
    count (TorchServe resets its recoveryStartTS once a worker loads)."""
    slot = WorkerSlot(0, None, failing_since=time.monotonic() - 10)
    assert slot.given_up(5.0)
    slot.failing_since = time.monotonic()
    assert not slot.given_up(5.0)
    slot.worker, slot.failing_since = EchoWorker("1.0", 0.0), None
    assert not slot.given_up(0.0)


def test_worker_counts_above_the_bound_are_refused_naming_it() -> None:
    async def scenario() -> None:
        registry = Registry(max_workers_per_model=4)
        await registry.register("m", "1.0", "m.mar", factory(EchoBackend("1.0")), ModelSettings())
        for low, high in ((5, 5), (1, 64)):
            with pytest.raises(BadRequest) as refused:
                await registry.scale("m", None, low, high)
            assert http_status(refused.value) == 400
            assert "bound of 4 workers per model" in refused.value.message
            assert "torchgate.max_workers_per_model" in refused.value.message
        assert len(registry.get("m").workers) == 1  # nothing changed
        await registry.scale("m", None, 4, 4)
        assert len(registry.get("m").workers) == 4
        with pytest.raises(BadRequest, match="bound of 4"):
            await registry.register(
                "n", "1.0", "n.mar", factory(EchoBackend("1.0")),
                ModelSettings(min_workers=8, max_workers=8),
            )  # fmt: skip
        assert registry.names() == ["m"]

    run(scenario())


def test_start_up_settings_above_the_bound_are_clamped_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        registry = Registry(max_workers_per_model=2)
        backend = EchoBackend("1.0")
        settings = ModelSettings(min_workers=6, max_workers=9)
        await registry.register("m", "1.0", "m.mar", factory(backend), settings, keep_failed=True)
        assert len(registry.get("m").workers) == len(backend.workers) == 2
        assert (settings.min_workers, settings.max_workers) == (2, 2)  # the backend's copy too

    with caplog.at_level(logging.WARNING, logger="api.core.registry"):
        run(scenario())
    assert "minWorkers=6, maxWorkers=9: clamped to 2 (torchgate.max_workers_per_model)" in (
        caplog.text
    )


def test_the_bound_leaves_a_remote_backends_in_flight_slots_alone() -> None:
    class Slots(EchoBackend):
        worker_processes = False  # as a remote TorchServe's: request slots, not processes

    async def scenario() -> None:
        registry = Registry(max_workers_per_model=2)
        settings = ModelSettings(min_workers=16, max_workers=16)
        await registry.register("m", "1.0", "torchserve://h:1/m", factory(Slots("1.0")), settings)
        assert len(registry.get("m").workers) == 16

    run(scenario())


def test_worker_ids_are_unique_in_the_server_and_never_reused() -> None:
    """As TorchServe's (its worker ids are ports from one counter): describe's ids do not
    collide across models, and a worker scaled away leaves its id unused."""

    async def scenario() -> None:
        registry = Registry()
        for name in ("a", "b"):
            await registry.register(
                name, "1.0", f"{name}.mar", factory(EchoBackend("1.0")), ModelSettings()
            )
        ids = lambda name: [slot.id for slot in registry.get(name).workers]  # noqa: E731
        assert (ids("a"), ids("b")) == ([9000], [9001])
        await registry.scale("a", None, 2, 2)
        await registry.scale("a", None, 1, 1)
        await registry.scale("a", None, 2, 2)
        assert ids("a") == [9000, 9003]
        await registry.close()

    run(scenario())


def test_workers_scaled_away_take_no_new_batch() -> None:
    """A scale-down stops every leaving worker at once: none starts another batch while the
    others finish theirs (stopped one after another, the later ones kept serving the queue)."""
    started: list[tuple[float, int]] = []

    class Recording(EchoWorker):
        def __init__(self, index: int) -> None:
            super().__init__("1.0", 0.3)
            self.index = index

        async def predict(self, batch: Sequence[InferenceRequest]) -> list[Prediction]:
            started.append((time.monotonic(), self.index))
            return await super().predict(batch)

    class Backend(EchoBackend):
        async def start_worker(self, index: int) -> EchoWorker:
            return Recording(index)

    async def scenario() -> None:
        registry = Registry()
        dataplane = DataPlane(registry)
        settings = ModelSettings(min_workers=4, max_workers=4)
        await registry.register("m", "1.0", "m.mar", factory(Backend("1.0")), settings)
        requests = [
            asyncio.ensure_future(dataplane.infer("m", None, InferenceRequest({"body": i})))
            for i in range(40)
        ]
        await asyncio.sleep(0.05)  # each worker has a batch in hand
        scaled_at = time.monotonic()
        await registry.scale("m", None, 1, 1, wait=False)
        await asyncio.sleep(0.5)  # the leaving ones finish their batch meanwhile
        assert [index for at, index in started if at > scaled_at and index != 0] == []
        for request in requests:
            request.cancel()
        await asyncio.gather(*requests, return_exceptions=True)
        await registry.close()

    run(scenario())


def test_unregistering_a_version_waits_only_for_its_own_asynchronous_scale_down() -> None:
    """A scale-down answered at once (202) leaves its workers finishing their batch; only
    their own version's unregister waits for them, not another model's."""

    async def scenario() -> None:
        registry = Registry()
        dataplane = DataPlane(registry)
        await registry.register(
            "slow", "1.0", "s.mar", factory(EchoBackend("1.0", 3.0)), ModelSettings()
        )
        await registry.register("b", "1.0", "b.mar", factory(EchoBackend("1.0")), ModelSettings())
        held = asyncio.ensure_future(dataplane.infer("slow", None, InferenceRequest({"body": 1})))
        await asyncio.sleep(0.05)  # its worker has the batch in hand
        await registry.scale("slow", None, 0, 0, wait=False)
        began = time.monotonic()
        await registry.unregister("b", "1.0")
        assert time.monotonic() - began < 1.0, "b waited for slow's leaving worker"
        await registry.unregister("slow", "1.0")  # waits for it: the batch is answered
        assert held.done() and (await held).prediction.status == 200
        await registry.close()

    run(scenario())


def test_a_scale_down_whose_caller_goes_away_still_stops_its_workers() -> None:
    """A synchronous scale-down cancelled part-way (a gRPC client's deadline) finishes in the
    background: the batch in hand is answered and the leaving worker is closed (its process
    ended), not left running outside the registry's count; a DELETE waits for it."""

    async def scenario() -> None:
        registry = Registry()
        dataplane = DataPlane(registry)
        backend = EchoBackend("1.0", 0.5)
        await registry.register("m", "1.0", "m.mar", factory(backend), ModelSettings())
        held = asyncio.ensure_future(dataplane.infer("m", None, InferenceRequest({"body": 1})))
        await asyncio.sleep(0.05)  # its worker has the batch in hand
        scaling = asyncio.ensure_future(registry.scale("m", None, 0, 0))
        await asyncio.sleep(0.05)
        scaling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await scaling
        assert (await held).prediction.status == 200
        await registry.unregister("m", "1.0")
        assert [worker.closed for worker in backend.workers] == [True]
        await registry.close()

    run(scenario())


def test_an_unregister_whose_caller_goes_away_still_unloads_and_says_so() -> None:
    """Cancelled while it drains, an unregister still tells `on_change` (the snapshot), which
    kept the deleted version until the next change, and still stops the workers and closes
    the backend."""

    async def scenario() -> None:
        registry = Registry()
        dataplane = DataPlane(registry)
        changes: list[list[str]] = []
        registry.on_change.append(lambda: changes.append([v.name for v in registry]))
        backend = EchoBackend("1.0", 0.5)
        await registry.register("m", "1.0", "m.mar", factory(backend), ModelSettings())
        held = asyncio.ensure_future(dataplane.infer("m", None, InferenceRequest({"body": 1})))
        await asyncio.sleep(0.05)
        unregistering = asyncio.ensure_future(registry.unregister("m", "1.0"))
        await asyncio.sleep(0.05)
        unregistering.cancel()
        with pytest.raises(asyncio.CancelledError):
            await unregistering
        assert (await held).prediction.status == 200
        await registry.close()  # waits for the unload in the background
        assert backend.closed and all(worker.closed for worker in backend.workers)
        assert changes[-1] == []

    run(scenario())


def test_a_scale_down_stops_a_failing_worker_before_a_serving_one() -> None:
    class FirstFails(EchoBackend):
        async def start_worker(self, index: int) -> EchoWorker:
            if index == 0:
                raise HandlerLoadError("initialize: weights are missing")
            return await super().start_worker(index)

    async def scenario() -> None:
        registry = Registry()
        dataplane = DataPlane(registry)
        settings = ModelSettings(min_workers=2, max_workers=2)
        backend = FirstFails("1.0")
        await registry.register("m", "1.0", "m.mar", factory(backend), settings, keep_failed=True)
        await registry.scale("m", None, 1, 1)
        assert [slot.index for slot in registry.get("m").workers] == [1]
        answer = await dataplane.infer("m", None, InferenceRequest({"body": 1}))
        assert answer.prediction.status == 200
        await registry.close()

    run(scenario())


def test_a_remote_that_cannot_serve_costs_the_servers_health_only_past_the_retry_window() -> None:
    """As a local worker that keeps failing to start: the version is not ready at once, but
    `/ping` turns unhealthy only once that has lasted maxRetryTimeoutInSec (a blip of a
    proxied TorchServe made the whole server unready, and a load balancer took every model
    away with it)."""

    class Remote(EchoBackend):
        unavailable: str | None = None
        unavailable_since: float | None = None

    async def scenario() -> None:
        registry = Registry()
        dataplane = DataPlane(registry)
        remote = Remote("1.0")
        settings = ModelSettings(max_retry_timeout_s=60)
        await registry.register("m", "1.0", "m.mar", factory(remote), settings)
        remote.unavailable, remote.unavailable_since = "TorchServe is down", time.monotonic()
        assert not dataplane.model_ready("m")
        assert dataplane.ready()
        remote.unavailable_since = time.monotonic() - 61
        assert not dataplane.ready()
        remote.unavailable = remote.unavailable_since = None
        assert dataplane.ready() and dataplane.model_ready("m")
        await registry.close()

    run(scenario())


class FailsOnce(EchoBackend):
    """A handler whose `initialize` fails the first time for the worker indexes in `failing`,
    after `start_s` (each start takes that long)."""

    def __init__(self, version: str, start_s: float, failing: set[int]) -> None:
        super().__init__(version)
        self.start_s, self.failing = start_s, failing
        self.starts: list[int] = []

    async def start_worker(self, index: int) -> EchoWorker:
        self.starts.append(index)
        await asyncio.sleep(self.start_s)
        if index in self.failing:
            self.failing.discard(index)
            raise HandlerLoadError(f"initialize: worker {index} ran out of memory")
        return await super().start_worker(index)


def test_a_failed_synchronous_scale_up_leaves_its_worker_retrying_and_ping_healthy() -> None:
    """As TorchServe: the scale answers 500 "Failed to start workers" with the handler's
    error, but the range stays as asked (and is written to the snapshot at once), the failed
    worker keeps its slot and is retried with backoff, and `/ping` stays healthy meanwhile.
    (It raised the handler's error before: the failed worker had no slot, nothing retried
    it, the snapshot was not told, and /ping answered 500 with 3 workers for 4 asked.)"""

    async def scenario() -> None:
        registry = Registry()
        dataplane = DataPlane(registry)
        asked: list[int] = []
        registry.on_change.append(lambda: asked.append(registry.get("m").settings.min_workers))
        backend = FailsOnce("1.0", 0.05, failing={2})
        await registry.register("m", "1.0", "m.mar", factory(backend), ModelSettings())
        with pytest.raises(HandlerLoadError) as failed:
            await registry.scale("m", None, 4, 4)
        assert http_status(failed.value) == 500
        assert failed.value.message == (
            "Failed to start workers for model m version 1.0: "
            "initialize: worker 2 ran out of memory"
        )
        model = registry.get("m")
        assert model.settings.min_workers == 4 and asked[-1] == 4
        assert [slot.index for slot in model.workers] == [0, 1, 2, 3]
        assert dataplane.ready()
        while not all(slot.live for slot in model.workers):  # the retry succeeds
            await asyncio.sleep(0.01)
        assert backend.starts.count(2) == 2
        await registry.close()

    run(scenario())


def test_the_server_stays_healthy_while_a_synchronous_scale_up_starts_its_workers() -> None:
    """The new workers' slots are there (STARTING) from the moment the range is set, as with
    an asynchronous scale: /ping counted min_workers=3 against the workers started so far and
    answered 500 for the whole scale, and a load balancer dropped the server."""

    async def scenario() -> None:
        registry = Registry()
        dataplane = DataPlane(registry)
        backend = FailsOnce("1.0", 0.0, failing=set())
        await registry.register("m", "1.0", "m.mar", factory(backend), ModelSettings())
        backend.start_s = 0.5
        scaling = asyncio.ensure_future(registry.scale("m", None, 3, 3))
        await asyncio.sleep(0.1)
        model = registry.get("m")
        assert [slot.status for slot in model.workers] == ["READY", "STARTING", "STARTING"]
        assert dataplane.ready()
        await scaling
        assert [slot.status for slot in model.workers] == ["READY"] * 3
        await registry.close()

    run(scenario())


def test_a_synchronous_scale_up_whose_caller_goes_away_leaves_its_workers_starting() -> None:
    """Cancelled part-way (a gRPC client's deadline), the scale-up still has every slot it
    added supervised and the range written to the snapshot: its workers come up regardless
    (before, the ones not started yet were never started, and the range reached the snapshot
    only with the next unrelated change)."""

    async def scenario() -> None:
        registry = Registry()
        asked: list[int] = []
        registry.on_change.append(lambda: asked.append(registry.get("m").settings.min_workers))
        backend = FailsOnce("1.0", 0.0, failing=set())
        await registry.register("m", "1.0", "m.mar", factory(backend), ModelSettings())
        backend.start_s = 0.2
        scaling = asyncio.ensure_future(registry.scale("m", None, 4, 4))
        await asyncio.sleep(0.05)
        scaling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await scaling
        assert asked[-1] == 4
        model = registry.get("m")
        while len(model.workers) < 4 or not all(slot.live for slot in model.workers):
            await asyncio.sleep(0.01)
        assert len(backend.workers) == 4
        await registry.close()

    run(scenario(), timeout=5)
