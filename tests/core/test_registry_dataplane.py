"""Registry and dataplane with an in-memory backend."""

from __future__ import annotations

import asyncio
import functools
import time
from types import SimpleNamespace

import pytest

from api.core.dataplane import DataPlane
from api.core.registry import Registry
from api.core.types import InferenceRequest, ModelSettings
from api.errors import (
    BadRequest,
    Conflict,
    DeadlineExceeded,
    DefaultVersionInUse,
    HandlerLoadError,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    VersionNotFound,
    error_for_status,
    grpc_code_name,
    http_status,
)
from tests.support import aio
from tests.support.echo_backend import EchoBackend, EchoWorker, factory

run = functools.partial(aio.run, timeout=10)


class SlowStart(EchoBackend):
    """A handler whose `initialize` takes `start_s`."""

    def __init__(self, version: str, start_s: float) -> None:
        super().__init__(version)
        self.start_s = start_s

    async def start_worker(self, index: int) -> EchoWorker:
        await asyncio.sleep(self.start_s)
        return await super().start_worker(index)


def test_register_serve_and_unregister_versions() -> None:
    async def scenario() -> None:
        registry = Registry()
        dataplane = DataPlane(registry)
        v1, v2 = EchoBackend("1.0"), EchoBackend("2.0")
        await registry.register(
            "m", "1.0", "m.mar", factory(v1), ModelSettings(min_workers=2, max_workers=2)
        )
        await registry.register("m", "2.0", "m2.mar", factory(v2), ModelSettings())
        assert registry.default_version("m") == "1.0"  # the first version stays the default
        assert len(v1.workers) == 2
        answer = await dataplane.infer("m", None, InferenceRequest({"body": 1}))
        assert answer.prediction.body == {"version": "1.0", "body": 1}
        answer = await dataplane.infer("m", "2.0", InferenceRequest({"body": 2}))
        assert answer.model_version.version == "2.0"

        with pytest.raises(DefaultVersionInUse):  # the default version goes last
            await registry.unregister("m", "1.0")
        registry.set_default("m", "2.0")
        await registry.unregister("m", "1.0")
        assert v1.closed and all(w.closed for w in v1.workers)
        assert [v.version for v in registry.versions("m")] == ["2.0"]

    run(scenario())


def test_unknown_models_versions_and_duplicates() -> None:
    async def scenario() -> None:
        registry = Registry()
        dataplane = DataPlane(registry)
        await registry.register("m", "1.0", "m.mar", factory(EchoBackend("1.0")), ModelSettings())
        with pytest.raises(ModelNotFound):
            await dataplane.infer("nope", None, InferenceRequest({"body": 0}))
        with pytest.raises(VersionNotFound):
            await dataplane.infer("m", "9.9", InferenceRequest({"body": 0}))
        with pytest.raises(VersionNotFound):
            registry.set_default("m", "9.9")
        with pytest.raises(Conflict):
            await registry.register(
                "m", "1.0", "m.mar", factory(EchoBackend("1.0")), ModelSettings()
            )

    run(scenario())


def test_scaling_to_zero_makes_the_model_not_ready_and_back() -> None:
    async def scenario() -> None:
        registry = Registry()
        dataplane = DataPlane(registry)
        backend = EchoBackend("1.0")
        await registry.register("m", "1.0", "m.mar", factory(backend), ModelSettings())
        await registry.scale("m", None, 0, 0)
        assert not dataplane.model_ready("m")
        assert dataplane.ready()  # scaled to 0 on purpose: the server is not sick (TorchServe)
        with pytest.raises(ModelNotReady):
            await dataplane.infer("m", None, InferenceRequest({"body": 0}))
        await registry.scale("m", None, 3, 3)
        assert len(registry.get("m").workers) == 3
        assert dataplane.ready() and dataplane.model_ready("m")
        with pytest.raises(BadRequest):
            await registry.scale("m", None, 2, 1)
        # As TorchServe: workers change only to come within the new range.
        await registry.scale("m", None, 1, 4)
        assert len(registry.get("m").workers) == 3
        await registry.scale("m", None, 1, 2)
        assert len(registry.get("m").workers) == 2

    run(scenario())


def test_request_past_response_timeout_gets_504() -> None:
    async def scenario() -> None:
        registry = Registry()
        dataplane = DataPlane(registry)
        # The worker takes 100 s; the deadline is 10 ms: four orders of magnitude of margin.
        await registry.register(
            "slow",
            "1.0",
            "s.mar",
            factory(EchoBackend("1.0", delay=100.0)),
            ModelSettings(response_timeout_s=0.01),
        )
        with pytest.raises(DeadlineExceeded):
            await dataplane.infer("slow", None, InferenceRequest({"body": 0}))

    run(scenario())


def test_a_request_its_worker_times_is_not_cut_short_by_its_queue_deadline() -> None:
    """Once a worker that times its own batches (`keeps_time`: a process worker, killed past
    responseTimeout) has the request, the request's deadline no longer applies to it: the
    batch takes 50 ms against a 10 ms responseTimeout and still answers."""

    async def scenario() -> None:
        registry = Registry()
        dataplane = DataPlane(registry)
        backend = EchoBackend("1.0", delay=0.05)
        await registry.register(
            "timed", "1.0", "t.mar", factory(backend), ModelSettings(response_timeout_s=0.01)
        )
        (worker,) = backend.workers
        worker.keeps_time = True  # type: ignore[attr-defined]
        answer = await dataplane.infer("timed", None, InferenceRequest({"body": 7}))
        assert answer.prediction.body == {"version": "1.0", "body": 7}

    run(scenario())


def test_metadata_comes_from_the_signature() -> None:
    async def scenario() -> None:
        registry = Registry()
        dataplane = DataPlane(registry)
        await registry.register("m", "1.0", "m.mar", factory(EchoBackend("1.0")), ModelSettings())
        metadata = dataplane.metadata("m")
        assert metadata.platform == "onnxruntime_onnx"
        assert metadata.versions == ["1.0"]
        assert [(t.name, t.datatype, t.shape) for t in metadata.inputs] == [("x", "FP32", [-1, 64])]

    run(scenario())


def test_scaling_to_zero_answers_the_queue_at_once() -> None:
    async def scenario() -> None:
        registry = Registry()
        backend = EchoBackend("1.0", delay=0.2)
        await registry.register("m", "1.0", "m.mar", factory(backend), ModelSettings())
        batcher = registry.get("m").batcher
        running = batcher.submit(InferenceRequest({"body": 1}))
        await asyncio.sleep(0.05)  # the one worker has the first request
        queued = batcher.submit(InferenceRequest({"body": 2}))
        await registry.scale("m", None, 0, 0)
        assert (await running).body == {"version": "1.0", "body": 1}  # finished, not dropped
        with pytest.raises(ModelNotReady):
            await queued  # answered now, not at its deadline
        await registry.unregister("m")  # and nothing is left for unregister to wait on

    run(scenario())


@pytest.mark.parametrize(
    ("status", "http", "grpc_name"),
    [
        (400, 400, "INVALID_ARGUMENT"),
        (422, 422, "INVALID_ARGUMENT"),
        (429, 429, "RESOURCE_EXHAUSTED"),
        (404, 404, "NOT_FOUND"),
        (507, 507, "INTERNAL"),
        (503, 503, "UNAVAILABLE"),
    ],
)
def test_a_handler_status_keeps_its_class(status: int, http: int, grpc_name: str) -> None:
    error = error_for_status(status, "from the handler")
    assert http_status(error) == http
    assert grpc_code_name(error) == grpc_name


def test_a_slow_handler_start_holds_up_no_other_registration() -> None:
    """One handler's `initialize` can take its startupTimeout per worker: another model's
    registration (at start-up, or through the management API) and a scale of a third model
    no longer wait behind it. The same version twice is still a Conflict."""

    async def scenario() -> None:
        registry = Registry()
        await registry.register("c", "1.0", "c.mar", factory(EchoBackend("1.0")), ModelSettings())
        slow = asyncio.ensure_future(
            registry.register("a", "1.0", "a.mar", factory(SlowStart("1.0", 3.0)), ModelSettings())
        )
        await asyncio.sleep(0.05)  # a is starting its worker
        with pytest.raises(Conflict):
            await registry.register(
                "a", "1.0", "a.mar", factory(EchoBackend("1.0")), ModelSettings()
            )
        await asyncio.wait_for(
            registry.register("b", "1.0", "b.mar", factory(EchoBackend("1.0")), ModelSettings()),
            1.0,
        )
        await asyncio.wait_for(registry.scale("c", None, 2, 2), 1.0)
        assert not slow.done()
        await slow
        assert sorted(registry.names()) == ["a", "b", "c"]
        await registry.close()

    run(scenario())


def test_the_default_cannot_go_while_another_version_loads_nor_a_version_land_after_close() -> None:
    """Loading without the lock: a version still loading counts as one of the model's (its
    default stays, as TorchServe refuses too), and one that finishes loading after `close`
    began is stopped rather than published into a registry nobody will close again."""

    async def scenario() -> None:
        registry = Registry()
        await registry.register("a", "1.0", "a.mar", factory(EchoBackend("1.0")), ModelSettings())
        upgrade = SlowStart("2.0", 0.5)
        loading = asyncio.ensure_future(
            registry.register("a", "2.0", "a2.mar", factory(upgrade), ModelSettings())
        )
        await asyncio.sleep(0.05)
        with pytest.raises(DefaultVersionInUse):
            await registry.unregister("a", "1.0")
        await loading

        late = SlowStart("1.0", 0.5)
        landing = asyncio.ensure_future(
            registry.register("b", "1.0", "b.mar", factory(late), ModelSettings())
        )
        await asyncio.sleep(0.05)
        await registry.close()
        with pytest.raises(Overloaded):
            await landing
        assert registry.names() == [] and late.closed
        assert all(worker.closed for worker in late.workers)

    run(scenario())


def test_a_synchronous_scale_up_holds_up_no_other_management_call() -> None:
    """Its workers start without the registry's lock: an asynchronous scale of another model
    is answered at once, as documented, and so is an unregister (both waited for every one of
    its workers' `initialize` in turn)."""

    async def scenario() -> None:
        registry = Registry()
        slow = SlowStart("1.0", 0.0)
        await registry.register("a", "1.0", "a.mar", factory(slow), ModelSettings())
        for name in ("b", "c"):
            await registry.register(
                name, "1.0", f"{name}.mar", factory(EchoBackend("1.0")), ModelSettings()
            )
        slow.start_s = 1.0
        scaling = asyncio.ensure_future(registry.scale("a", None, 3, 3))
        await asyncio.sleep(0.05)  # a's new workers are starting
        await asyncio.wait_for(registry.scale("b", None, 2, 2, wait=False), 0.2)
        await asyncio.wait_for(registry.unregister("c"), 0.2)
        assert not scaling.done()
        await scaling
        await registry.close()

    run(scenario())


class FirstFailsOthersSlow(EchoBackend):
    """Worker 0's handler fails to start at once; the others' take `start_s`."""

    def __init__(self, version: str, start_s: float) -> None:
        super().__init__(version)
        self.start_s = start_s
        self.starts = 0

    async def start_worker(self, index: int) -> EchoWorker:
        self.starts += 1
        if index == 0:
            raise HandlerLoadError("initialize failed: out of memory")
        await asyncio.sleep(self.start_s)
        return await super().start_worker(index)


def test_a_failing_registration_answers_at_its_first_failure() -> None:
    """Without keep_failed the first failed start fails the registration: it need not wait
    for the other workers' starts (up to startupTimeout each), nor retry the failed one
    meanwhile, only to be thrown away."""

    async def scenario() -> None:
        registry = Registry()
        backend = FirstFailsOthersSlow("1.0", 5.0)
        began = time.monotonic()
        with pytest.raises(HandlerLoadError, match="out of memory"):
            settings = ModelSettings(min_workers=2, max_workers=2)
            await registry.register("a", "1.0", "a.mar", factory(backend), settings)
        assert time.monotonic() - began < 2.0
        assert backend.starts == 2  # no retry of worker 0
        with pytest.raises(ModelNotFound):
            registry.get("a", "1.0")
        await registry.close()

    run(scenario())


def test_a_synchronous_scale_up_overtaken_by_a_scale_down_did_not_fail() -> None:
    """Its new worker scaled away before it started was not a failed start: no 500."""

    async def scenario() -> None:
        registry = Registry()
        slow = SlowStart("1.0", 0.5)
        await registry.register("a", "1.0", "a.mar", factory(slow), ModelSettings())
        slow.start_s = 5.0
        scaling_up = asyncio.ensure_future(registry.scale("a", None, 2, 2))
        await asyncio.sleep(0.1)
        await registry.scale("a", None, 1, 1)
        await asyncio.wait_for(scaling_up, 2.0)  # answered, without an error
        await registry.close()

    run(scenario())


def test_workers_start_side_by_side_on_register_and_synchronous_scale() -> None:
    """A version's new workers run their `initialize` at once, not one after another: 4
    starts of 0.5 s take 0.5 s, not 2 s."""

    async def scenario() -> None:
        registry = Registry()
        slow = SlowStart("1.0", 0.5)
        began = time.monotonic()
        settings = ModelSettings(min_workers=4, max_workers=4)
        await registry.register("a", "1.0", "a.mar", factory(slow), settings)
        assert time.monotonic() - began < 1.0
        began = time.monotonic()
        await registry.scale("a", None, 8, 8)
        assert time.monotonic() - began < 1.0
        assert len(slow.workers) == 8
        await registry.close()

    run(scenario())


def test_a_request_given_back_unrun_gets_another_wait_in_the_queue() -> None:
    """A dying worker gave it back (the batcher queues it afresh): the dataplane's queue timer
    must not answer it 504 at its arrival deadline, but after one more responseTimeout."""

    async def scenario() -> None:
        dataplane = DataPlane(Registry())
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        request = InferenceRequest({"body": 0})
        request.requeued = True
        model_version = SimpleNamespace(name="m", version="1.0")
        dataplane._deadline_passed(future, request, model_version, 0.05)  # type: ignore[arg-type]
        assert not future.done()
        await asyncio.sleep(0.3)
        assert isinstance(future.exception(), DeadlineExceeded)

    run(scenario())
