"""Server health as TorchServe's /ping computes it, per-model readiness, and the worker bound."""

from __future__ import annotations

import asyncio
import functools
import logging

import pytest

from api.core.dataplane import DataPlane
from api.core.registry import Registry
from api.core.types import ModelSettings
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


def test_a_version_that_cannot_start_its_workers_makes_the_server_unhealthy() -> None:
    async def scenario() -> None:
        registry = Registry()
        dataplane = DataPlane(registry)
        await registry.register("a", "1.0", "a.mar", factory(EchoBackend("1.0")), ModelSettings())
        await registry.register(
            "broken", "1.0", "b.mar", factory(BrokenBackend("1.0")), ModelSettings(),
            keep_failed=True,
        )  # fmt: skip
        # Restarting (fewer failed starts than FAILED_AFTER) counts as having its worker, as a
        # TorchServe worker inside its retry window does.
        assert dataplane.ready()
        broken = registry.get("broken")
        while broken.state.value != "FAILED":
            await asyncio.sleep(0.05)
        assert not dataplane.ready()
        assert not dataplane.model_ready("broken") and dataplane.model_ready("a")
        assert "weights are missing" in (broken.unavailable or "")
        await registry.close()

    run(scenario())


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
    assert "minWorkers=6, maxWorkers=9: clamped to torchgate.max_workers_per_model=2" in (
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
