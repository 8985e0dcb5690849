"""WorkerBackend: handler kinds, the TorchServe context, per-item outcomes, failures, and what
worker processes give each archive (its own process, working directory and `sys.path`)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import api.backends.workers as workers_module
from api.backends.archive import ArchiveError, open_archive
from api.backends.workers import GpuRoundRobin, ProcessWorker, WorkerBackend, load_worker_backend
from api.core.types import API_V2_GRPC, InferenceRequest, NotRun, Prediction
from api.errors import (
    BadRequest,
    DeadlineExceeded,
    HandlerLoadError,
    InferenceFailed,
    ModelNotReady,
    http_status,
)
from api.workers.main import WorkerSpec, _device
from api.workers.pool import WorkerPool
from tests.backends.conftest import (
    BuildArchive,
    expected_linear,
    manifest,
    requests,
    run,
    settings,
    write_zip,
)
from tests.support.processes import descendants

ECHO = """
    def handle(data, context):
        if data is None:
            return None
        return [{"body": row["body"], "id": context.get_request_id(idx)}
                for idx, row in enumerate(data)]
"""


async def load(pool: WorkerPool, path: Path, **options: Any) -> WorkerBackend:
    options.setdefault("work_dir", path.parent / "work")
    model_settings = options.pop("model_settings", None) or settings()
    return await load_worker_backend(path, model_settings, pool=pool, **options)


async def serve(
    pool: WorkerPool,
    path: Path,
    batches: Sequence[Sequence[InferenceRequest]],
    *,
    workers: int = 1,
    **options: Any,
) -> list[list[Prediction]]:
    """Load the archive, run each batch on worker 0, close everything (as the registry does)."""
    backend = await load(pool, path, **options)
    try:
        started = [await backend.start_worker(i) for i in range(workers)]
        return [await started[0].predict(batch) for batch in batches]
    finally:
        await backend.close()


def bodies(predictions: list[Prediction]) -> list[Any]:
    return [p.body for p in predictions]


# -- handler kinds --------------------------------------------------------------------------


def test_module_function(worker_pool: WorkerPool, build_archive: BuildArchive) -> None:
    path = build_archive("echo", "handler.py", {"handler.py": ECHO})
    [out] = run(serve(worker_pool, path, [requests(1, "two", {"three": 3})]))
    assert bodies(out) == [
        {"body": 1, "id": "req-0"},
        {"body": "two", "id": "req-1"},
        {"body": {"three": 3}, "id": "req-2"},
    ]
    assert all(p.status == 200 and p.message == "" and p.headers == {} for p in out)


def test_module_colon_function(worker_pool: WorkerPool, build_archive: BuildArchive) -> None:
    source = """
        def handle(data, context):
            raise AssertionError("not the entry point")

        def predict(data, context):
            return None if data is None else ["predict"] * len(data)
    """
    path = build_archive("fn", "handler.py", {"handler.py": source})
    [out] = run(serve(worker_pool, path, [requests(1, 2)], handler="handler.py:predict"))
    assert bodies(out) == ["predict", "predict"]


def test_module_initialize_is_called_instead_of_handle_none(
    worker_pool: WorkerPool, build_archive: BuildArchive
) -> None:
    source = """
        state = {}

        def initialize(context):
            state["model_dir"] = context.system_properties["model_dir"]

        def handle(data, context):
            assert data is not None, "initialize replaces handle(None, context)"
            return [state["model_dir"]] * len(data)
    """
    path = build_archive("init", "handler.py", {"handler.py": source})
    [out] = run(serve(worker_pool, path, [requests(1)]))
    assert Path(out[0].body).name.startswith("init-1.0-")


def test_class_handler_one_instance_per_worker(
    worker_pool: WorkerPool, build_archive: BuildArchive
) -> None:
    source = """
        import os

        class Handler:
            def __init__(self):
                self.context = None
                self.initialized = 0
                self.calls = 0

            def initialize(self, context):
                self.context = context
                self.initialized += 1

            def handle(self, data, context):
                assert context is self.context
                self.calls += 1
                return [{"me": id(self), "pid": os.getpid(), "initialized": self.initialized,
                         "calls": self.calls}] * len(data)
    """
    path = build_archive("cls", "handler.py", {"handler.py": source})

    async def scenario() -> tuple[list[int], list[Any]]:
        # No GPU to take: the workers' device is "cpu" on a GPU machine too.
        backend = await load(worker_pool, path, gpus=GpuRoundRobin(0))
        w0, w1 = await backend.start_worker(0), await backend.start_worker(1)
        try:
            assert w0.device == w1.device == "cpu"
            out = [
                await w0.predict(requests(1)),
                await w0.predict(requests(2)),
                await w1.predict(requests(3)),
            ]
            return [w0.pid, w1.pid], [batch[0].body for batch in out]
        finally:
            await backend.close()

    (pid0, pid1), (first, second, other) = run(scenario())
    assert len({pid0, pid1, os.getpid()}) == 3, "each worker is a process of its own"
    assert first["pid"] == second["pid"] == pid0 and other["pid"] == pid1
    # one instance per worker, initialized once, kept across that worker's batches
    assert first["me"] == second["me"]
    assert [first["calls"], second["calls"], other["calls"]] == [1, 2, 1]
    assert first["initialized"] == second["initialized"] == other["initialized"] == 1


def test_builtin_base_handler_serves_json_rows(
    worker_pool: WorkerPool, build_archive: BuildArchive, scripted_model: bytes
) -> None:
    """The built-in name base_handler runs torchgate's implementation (handlers/builtin/):
    each request's JSON list is one input row, where TorchServe's own BaseHandler fails every
    request with "Could not infer dtype of dict". A row of the wrong shape fails alone."""
    path = build_archive(
        "base", "base_handler", {"model.pt": scripted_model}, serialized="model.pt"
    )
    recorded: list[tuple[str, str]] = []

    def on_metric(name: str, value: float, unit: str, dims: Any, kind: str) -> None:
        recorded.append((name, unit))

    [out] = run(
        serve(worker_pool, path, [requests([1.0, 2.0, 3.0, 4.0], [1.0, 2.0])], on_metric=on_metric)
    )
    assert out[0].body == pytest.approx(expected_linear([[1.0, 2.0, 3.0, 4.0]])[0])
    assert (out[0].status, out[1].status) == (200, 400)
    assert ("HandlerTime", "Milliseconds") in recorded
    assert ("PredictionTime", "Milliseconds") in recorded


def test_builtin_image_classifier_needs_no_torchvision(
    worker_pool: WorkerPool, build_archive: BuildArchive, scripted_model: bytes
) -> None:
    """TorchServe's image_classifier imports torchvision; torchgate's loads without it."""
    path = build_archive(
        "img", "image_classifier", {"model.pt": scripted_model}, serialized="model.pt"
    )
    [out] = run(serve(worker_pool, path, [requests(b"not an image")]))
    assert out[0].status == 400 and out[0].body["type"] == "BadRequest"


def test_unknown_handler_is_an_archive_error(worker_pool: WorkerPool, tmp_path: Path) -> None:
    path = write_zip(tmp_path / "m.mar", {"MAR-INF/MANIFEST.json": manifest("nope")})
    with pytest.raises(ArchiveError):
        run(serve(worker_pool, path, []))


def test_module_with_two_classes_and_no_handle(
    worker_pool: WorkerPool, build_archive: BuildArchive
) -> None:
    source = """
        class A:
            pass

        class B:
            pass
    """
    path = build_archive("two", "handler.py", {"handler.py": source})
    with pytest.raises(HandlerLoadError, match=r"exactly one class.*\['A', 'B'\]"):
        run(serve(worker_pool, path, []))


def test_initialize_failure(worker_pool: WorkerPool, build_archive: BuildArchive) -> None:
    source = """
        def handle(data, context):
            raise FileNotFoundError("weights.bin")
    """
    path = build_archive("broken", "handler.py", {"handler.py": source})
    with pytest.raises(HandlerLoadError, match="failed to initialize: FileNotFoundError"):
        run(serve(worker_pool, path, []))
    assert not list((path.parent / "work").iterdir()), "the extraction is cleaned up"


# -- the context and per-item outcomes ------------------------------------------------------


def test_context_matches_torchserve(worker_pool: WorkerPool, build_archive: BuildArchive) -> None:
    source = """
        from ts.context import Context

        def handle(data, context):
            if data is None:
                return None
            assert isinstance(context, Context)
            props = context.system_properties
            return [{
                "model_name": context.model_name,
                "handler": context.manifest["model"]["handler"],
                "batch_size": props["batch_size"],
                "server_name": props["server_name"],
                "gpu_id": props["gpu_id"],
                "limit": props["limit_max_image_pixels"],
                "yaml": context.model_yaml_config,
                "header": context.get_request_header(idx, "x-tenant"),
                "headers": context.get_all_request_header(idx),
                "request_id": context.get_request_id(idx),
            } for idx in range(len(data))]
    """
    path = build_archive(
        "ctx",
        "handler.py",
        {"handler.py": source, "model-config.yaml": "handler:\n  mode: fast\n"},
        config="model-config.yaml",
    )
    batch = requests("a", headers={"x-tenant": "acme"})
    # GpuRoundRobin(0): gpu_id is None on a GPU machine too (test_cuda.py covers a GPU's).
    [out] = run(
        serve(
            worker_pool, path, [batch], model_settings=settings(batch_size=4), gpus=GpuRoundRobin(0)
        )
    )
    assert out[0].body == {
        "model_name": "ctx",
        "handler": "handler.py",
        "batch_size": 4,
        "server_name": "MMS",
        "gpu_id": None,
        "limit": True,
        "yaml": {"handler": {"mode": "fast"}},
        "header": "acme",
        # TorchServe's worker adds each input's content type under the input's name.
        "headers": {"x-tenant": "acme", "body": {"content-type": ""}},
        "request_id": "req-0",
    }


def test_per_item_status_and_headers(worker_pool: WorkerPool, build_archive: BuildArchive) -> None:
    source = """
        def handle(data, context):
            if data is None:
                return None
            out = []
            for idx, row in enumerate(data):
                if row["body"] == "bad":
                    context.set_response_status(422, "cannot read item", idx)
                    out.append({"error": "bad item"})
                else:
                    context.set_response_content_type(idx, "text/plain")
                    context.set_response_header(idx, "x-item", str(idx))
                    out.append(row["body"].upper())
            return out
    """
    path = build_archive("status", "handler.py", {"handler.py": source})
    [out, again] = run(serve(worker_pool, path, [requests("ok", "bad", "fine"), requests("ok")]))
    assert [(p.status, p.message, p.body) for p in out] == [
        (200, "", "OK"),
        (422, "cannot read item", {"error": "bad item"}),
        (200, "", "FINE"),
    ]
    assert out[0].headers == {"content-type": "text/plain", "x-item": "0"}
    assert out[1].headers == {}
    # statuses belong to their batch: the next batch on the same worker starts from 200 again
    assert again[0].status == 200


def test_metrics_reach_the_callback_with_each_models_name(
    worker_pool: WorkerPool, build_archive: BuildArchive
) -> None:
    source = """
        def handle(data, context):
            if data is None:
                return None
            context.metrics.add_counter("Items", len(data))
            return [None] * len(data)
    """
    seen: list[tuple[str, float, str, dict[str, str], str]] = []

    def on_metric(name: str, value: float, unit: str, dims: Any, kind: str) -> None:
        seen.append((name, value, unit, dict(dims), kind))

    for model in ("first", "second"):
        path = build_archive(model, "handler.py", {"handler.py": source})
        run(serve(worker_pool, path, [requests(1, 2)], on_metric=on_metric))
    counters = [entry for entry in seen if entry[0] == "Items"]
    assert counters == [
        ("Items", 2, "Count", {"ModelName": "first", "Level": "Model"}, "counter"),
        ("Items", 2, "Count", {"ModelName": "second", "Level": "Model"}, "counter"),
    ]


def test_responses_leave_the_worker_as_builtins_and_numpy(
    worker_pool: WorkerPool, build_archive: BuildArchive
) -> None:
    source = """
        import collections
        import torch

        def handle(data, context):
            if data is None:
                return None
            return [
                {"7": 0.75, "1": 0.25},
                collections.OrderedDict(scores=torch.tensor([1.0, 2.0]), name="x"),
                torch.tensor([[3, 4]]),
                [{"nested": (1, 2)}, b"raw"],
            ]
    """
    path = build_archive("types", "handler.py", {"handler.py": source})
    [out] = run(serve(worker_pool, path, [requests("a", "b", "c", "d")]))
    flat, tensors, tensor, nested = bodies(out)
    assert flat == {"7": 0.75, "1": 0.25} and list(flat) == ["7", "1"]
    assert type(tensors) is dict and tensors["name"] == "x"
    assert isinstance(tensors["scores"], np.ndarray) and tensors["scores"].tolist() == [1.0, 2.0]
    # A tensor as the whole answer: torch.save's bytes, as TorchServe's worker sends it.
    assert isinstance(tensor, bytes) and tensor.startswith(b"PK")
    assert nested == [{"nested": [1, 2]}, b"raw"]


# -- failures ---------------------------------------------------------------------------------

CRASHY = """
    def handle(data, context):
        if data is None:
            return None
        if any(row["body"] == "crash" for row in data):
            raise ValueError("cannot handle crash")
        if any(row["body"] == "short" for row in data):
            return data[:1]
        if any(row["body"] == "none" for row in data):
            return None
        if any(row["body"] == "teapot" for row in data):
            from ts.utils.util import PredictionException
            raise PredictionException("no coffee", 400)
        if any(row["body"] == "no memory" for row in data):
            raise MemoryError("no room")
        if any(row["body"] == "no gpu memory" for row in data):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if any(row["body"] == "object" for row in data):
            return [{"label": object()}] * len(data)  # nothing the frontend may unpickle
        return ["ok"] * len(data)
"""


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        ("crash", InferenceFailed, "handler failed: ValueError: cannot handle crash"),
        ("short", InferenceFailed, "returned 1 responses for a batch of 2 requests"),
        ("none", InferenceFailed, "returned NoneType, expected a list of 2 responses"),
        ("teapot", BadRequest, "no coffee"),
        ("object", InferenceFailed, "returned a builtins.object; a response must be"),
    ],
)
def test_failed_batch_then_the_next_one_works(
    worker_pool: WorkerPool,
    build_archive: BuildArchive,
    body: str,
    error: type[Exception],
    message: str,
) -> None:
    path = build_archive("crashy", "handler.py", {"handler.py": CRASHY})

    async def scenario() -> list[Prediction]:
        backend = await load(worker_pool, path)
        worker = await backend.start_worker(0)
        try:
            with pytest.raises(error, match=message):
                await worker.predict(requests("fine", body))
            assert worker.alive, "a failed batch costs the worker nothing"
            return await worker.predict(requests("fine", "also fine"))
        finally:
            await backend.close()

    assert bodies(run(scenario())) == ["ok", "ok"]


@pytest.mark.parametrize(
    ("body", "status"),
    [("crash", 500), ("no memory", 507), ("no gpu memory", 507)],
)
def test_a_batch_that_ran_out_of_memory_is_507_as_in_torchserve(
    worker_pool: WorkerPool, build_archive: BuildArchive, body: str, status: int
) -> None:
    # TorchServe's worker answers MemoryError and CUDA's out-of-memory 507 "Out of resources".
    path = build_archive("crashy", "handler.py", {"handler.py": CRASHY})

    async def scenario() -> InferenceFailed:
        backend = await load(worker_pool, path)
        worker = await backend.start_worker(0)
        try:
            with pytest.raises(InferenceFailed) as failed:
                await worker.predict(requests(body))
            assert worker.alive
            return failed.value
        finally:
            await backend.close()

    assert http_status(run(scenario())) == status


def test_closed_worker_refuses_batches(
    worker_pool: WorkerPool, build_archive: BuildArchive
) -> None:
    path = build_archive("closing", "handler.py", {"handler.py": ECHO})

    async def scenario() -> tuple[WorkerBackend, ProcessWorker, str]:
        backend = await load(worker_pool, path)
        worker = await backend.start_worker(0)
        await worker.close()
        await worker.close()  # idempotent
        assert not worker.alive
        with pytest.raises(ModelNotReady, match=r"Model closing version 1\.0 worker 0 is closed"):
            await worker.predict(requests(1))
        await backend.close()
        return backend, worker, await worker.exited

    backend, worker, exited = run(scenario())
    assert exited == "exit code 0", "asked to stop, the process exits cleanly"
    assert worker.memory_bytes() == 0
    assert not backend.archive.model_dir.exists()


# Body "S N": N intermediate responses S seconds apart, then the answer S seconds later.
PACED = """
    import time
    from ts.protocol.otf_message_handler import send_intermediate_predict_response

    def handle(data, context):
        if data is None:
            return None
        body = data[0]["body"]
        seconds, chunks = str(body.decode() if isinstance(body, bytes) else body).split()
        for _ in range(int(chunks)):
            time.sleep(float(seconds))
            send_intermediate_predict_response(
                ["tick"], context.request_ids, "Intermediate Prediction success", 200, context
            )
        time.sleep(float(seconds))
        return ["done"]
"""


def test_response_timeout_counts_from_when_the_worker_takes_a_batch_up(
    worker_pool: WorkerPool, build_archive: BuildArchive
) -> None:
    """As TorchServe's responseTimeout: the time the handler spends on a batch. The second of two
    0.6 s batches waits 0.6 s in the worker's socket behind the first (pipelining), then runs:
    1.2 s after it was sent, against a 1 s timeout, it answers, and the worker lives on."""
    path = build_archive("paced", "handler.py", {"handler.py": PACED})

    async def scenario() -> list[list[Prediction]]:
        backend = await load(worker_pool, path, model_settings=settings(response_timeout_s=1.0))
        worker = await backend.start_worker(0)
        try:
            answers = await asyncio.gather(
                worker.predict(requests("0.6 0")), worker.predict(requests("0.6 0"))
            )
            assert worker.alive
            return list(answers)
        finally:
            await backend.close()

    assert [bodies(answer) for answer in run(scenario())] == [["done"], ["done"]]


def test_a_stream_has_response_timeout_per_response_not_in_all(
    worker_pool: WorkerPool, build_archive: BuildArchive
) -> None:
    """TorchServe waits responseTimeout for each reply of a streaming handler: a generation
    that sends a token every 0.4 s may run 2 s against a 1 s timeout."""
    path = build_archive("paced", "handler.py", {"handler.py": PACED})
    chunks: list[Prediction] = []

    async def scenario() -> list[Prediction]:
        backend = await load(worker_pool, path, model_settings=settings(response_timeout_s=1.0))
        worker = await backend.start_worker(0)
        try:
            request = InferenceRequest({"body": "0.4 4"}, {}, "req-0", stream=chunks.append)
            return await worker.predict([request])
        finally:
            await backend.close()

    assert bodies(run(scenario())) == ["done"]
    assert [chunk.body for chunk in chunks] == ["tick"] * 4


def test_parts_for_an_api_that_answers_once_are_dropped_with_one_warning(
    worker_pool: WorkerPool, build_archive: BuildArchive, caplog: pytest.LogCaptureFixture
) -> None:
    """A streaming handler reached through v2 infer (no `stream`): the client gets the final
    response; the parts are dropped, and the log says so once per API, not in silence."""
    path = build_archive("paced", "handler.py", {"handler.py": PACED})

    async def scenario() -> list[list[Prediction]]:
        backend = await load(worker_pool, path)
        worker = await backend.start_worker(0)
        try:
            return [
                await worker.predict([InferenceRequest({"body": "0 2"}, {}, "r", "v2-rest")])
                for _ in range(2)
            ]
        finally:
            await backend.close()

    with caplog.at_level(logging.WARNING, logger="api.backends.workers"):
        answers = run(scenario())
    assert [bodies(answer) for answer in answers] == [["done"], ["done"]]
    notes = [r.getMessage() for r in caplog.records if "intermediate responses" in r.getMessage()]
    assert len(notes) == 1 and "to a v2-rest request" in notes[0]


STREAMS_ITS_IDS = """
    from ts.protocol.otf_message_handler import send_intermediate_predict_response

    def handle(data, context):
        if data is None:
            return None
        ids = [context.get_request_id(idx) for idx in range(len(data))]
        send_intermediate_predict_response(ids, context.request_ids, "ok", 200, context)
        return ids
"""


def test_a_batch_mixing_entry_points_streams_each_part_to_its_own_request(
    worker_pool: WorkerPool, build_archive: BuildArchive
) -> None:
    """With a service_envelope, a batch of a KServe item (unwrapped by torchgate) and a
    TorchServe item runs the handler once per group; each group's indexes start at 0, and
    its parts still reach their own requests, not the batch's first."""
    path = build_archive("ids", "handler.py", {"handler.py": STREAMS_ITS_IDS})
    parts: dict[str, list[Any]] = {"kserve": [], "torchserve": []}

    async def scenario() -> None:
        backend = await load(worker_pool, path, service_envelope="body")
        worker = await backend.start_worker(0)
        try:
            batch = [
                InferenceRequest(
                    {"body": b"1"}, {}, "kserve", API_V2_GRPC, stream=parts["kserve"].append
                ),
                InferenceRequest(
                    {"body": b"2"}, {}, "torchserve", stream=parts["torchserve"].append
                ),
            ]
            await worker.predict(batch)
        finally:
            await backend.close()

    run(scenario())
    assert {api: [part.body for part in got] for api, got in parts.items()} == {
        "kserve": ["kserve"],
        "torchserve": ["torchserve"],
    }


FAILS_MID_STREAM = """
    from ts.handler_utils.utils import send_intermediate_predict_response

    def handle(data, context):
        if data is None:
            return None
        send_intermediate_predict_response(["tick"], context.request_ids, "ok", 200, context)
        send_intermediate_predict_response(
            ["lost"], context.request_ids, "upstream gave up", 507, context
        )
        send_intermediate_predict_response(["after"], context.request_ids, "ok", 200, context)
        if data[0].get("body") == b"raise":
            raise ValueError("raised after the error it streamed")
        return ["done"]
"""


def test_an_intermediate_response_with_an_error_code_fails_the_batch(
    worker_pool: WorkerPool, build_archive: BuildArchive
) -> None:
    """TorchServe answers every request of the batch with the code and message of an
    intermediate response whose code is not 200, and drops what the handler sends after."""
    path = build_archive("fails", "handler.py", {"handler.py": FAILS_MID_STREAM})
    parts: list[Prediction] = []

    async def scenario() -> None:
        backend = await load(worker_pool, path)
        worker = await backend.start_worker(0)
        try:
            for body in (b"x", b"raise"):  # the error streamed first wins over a raise after
                request = InferenceRequest({"body": body}, {}, "r", stream=parts.append)
                with pytest.raises(InferenceFailed) as failed:
                    await worker.predict([request])
                assert failed.value.message == "upstream gave up"
                assert failed.value.status == 507
        finally:
            await backend.close()

    run(scenario())
    assert [part.body for part in parts] == ["tick", "tick"]


STREAMS_LATE = """
    import threading
    import time
    from ts.handler_utils.utils import send_intermediate_predict_response

    def handle(data, context):
        if data is None:
            return None
        if bytes(data[0]["body"]) == b"first":
            ids = context.request_ids

            def late():  # a generation thread left running after its batch was answered
                time.sleep(0.3)
                send_intermediate_predict_response(["stray"], ids, "ok", 200, context)

            threading.Thread(target=late).start()
            return ["first done"]
        time.sleep(1.0)
        return ["second done"]
"""


def test_a_part_sent_after_its_batch_was_answered_reaches_no_other_request(
    worker_pool: WorkerPool, build_archive: BuildArchive
) -> None:
    """Parts name their requests by index in the batch: one a thread sends once its batch is
    answered would go to the request at that index of the batch running then, another
    client's. The worker drops what the running batch does not hold."""
    path = build_archive("late", "handler.py", {"handler.py": STREAMS_LATE})
    parts: list[Prediction] = []

    async def scenario() -> list[Any]:
        backend = await load(worker_pool, path)
        worker = await backend.start_worker(0)
        try:
            await worker.predict([InferenceRequest({"body": b"first"}, {}, "r1")])
            second = InferenceRequest({"body": b"second"}, {}, "r2", stream=parts.append)
            return bodies(await worker.predict([second]))
        finally:
            await backend.close()

    assert run(scenario()) == ["second done"]
    assert parts == []


SETS_NO_STATUS = """
    def handle(data, context):
        if data is None:
            return None
        context.set_response_status(700, "Out of range")
        return ["answer"]
"""


def test_a_status_that_is_no_http_status_is_a_500_for_its_request(
    worker_pool: WorkerPool, build_archive: BuildArchive
) -> None:
    """set_response_status(700): the frontend cannot send it (its status line lookup failed
    after the response had started, and the connection was dropped with a traceback)."""
    path = build_archive("status", "handler.py", {"handler.py": SETS_NO_STATUS})
    (answer,) = run(serve(worker_pool, path, [requests("x")]))[0]
    assert answer.status == 500
    assert "set_response_status(700) is not an HTTP status" in str(answer.body)


def test_metric_updates_that_fail_are_logged_once_per_reply(
    worker_pool: WorkerPool,
    build_archive: BuildArchive,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A reply can carry thousands of updates: one traceback each flooded the log, on the
    event loop."""
    path = build_archive("echo", "handler.py", {"handler.py": ECHO})

    def refuses(*update: Any) -> None:
        raise ValueError("malformed")

    async def scenario() -> None:
        backend = await load(worker_pool, path, on_metric=refuses)
        try:
            with caplog.at_level(logging.ERROR, logger="api.backends.workers"):
                backend._report([("x", 1.0, "", {}, "counter")] * 1000)
        finally:
            await backend.close()

    run(scenario())
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "echo: a handler metric could not be recorded",
        "echo: 1000 handler metrics of one reply not recorded",
    ]


def test_a_batch_past_response_timeout_kills_the_worker_and_frees_the_one_behind(
    worker_pool: WorkerPool, build_archive: BuildArchive
) -> None:
    path = build_archive("paced", "handler.py", {"handler.py": PACED})

    async def scenario() -> tuple[BaseException | list[Prediction], ...]:
        backend = await load(worker_pool, path, model_settings=settings(response_timeout_s=1.0))
        worker = await backend.start_worker(0)
        try:
            outcomes = await asyncio.gather(
                worker.predict(requests("1.5 0")),
                worker.predict(requests("0 0")),
                return_exceptions=True,
            )
            assert not worker.alive
            return tuple(outcomes)
        finally:
            await backend.close()

    slow, behind = run(scenario())
    assert isinstance(slow, DeadlineExceeded)
    assert isinstance(behind, NotRun)  # never started: the batcher gives it to another worker


DIES_ON_REQUEST = """
    import os

    def handle(data, context):
        if data is None:
            return None
        os._exit(3)
"""


def test_a_registration_cancelled_while_extracting_leaves_no_files(
    worker_pool: WorkerPool, build_archive: BuildArchive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller that goes away (a gRPC deadline) cannot stop the extracting thread; what it
    extracts is removed when it is done, not left until the server exits."""
    path = build_archive("echo", "handler.py", {"handler.py": ECHO})
    work = path.parent / "work"
    work.mkdir()
    real_open = workers_module.open_archive

    def slow_open(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.5)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(workers_module, "open_archive", slow_open)

    async def scenario() -> None:
        loading = asyncio.ensure_future(load(worker_pool, path, work_dir=work))
        await asyncio.sleep(0.1)
        loading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loading
        await asyncio.sleep(1.5)  # the thread finishes, its files go

    run(scenario())
    assert list(work.iterdir()) == []


def test_a_dead_worker_is_not_kept_by_its_backend(
    worker_pool: WorkerPool, build_archive: BuildArchive
) -> None:
    """The supervisor replaces a dead worker without closing it: the backend must not keep
    it (with its 256 KiB receive buffer) until the version is unloaded, crash after crash."""
    path = build_archive("dies", "handler.py", {"handler.py": DIES_ON_REQUEST})

    async def scenario() -> None:
        backend = await load(worker_pool, path)
        try:
            worker = await backend.start_worker(0)
            assert backend._workers == {worker}
            with pytest.raises(InferenceFailed):
                await worker.predict(requests("x"))
            await worker.exited
            await asyncio.sleep(0)
            assert backend._workers == set()
        finally:
            await backend.close()

    run(scenario())


SLOW_START = """
    import time

    def handle(data, context):
        if data is None:
            time.sleep(30)  # loading a large model
            return None
        return ["up"] * len(data)
"""


def test_a_worker_whose_start_was_abandoned_is_killed_at_once(
    worker_pool: WorkerPool, build_archive: BuildArchive
) -> None:
    """A slot stopped while its worker is being forked (a scale-down during a restart): the
    zygote forks it all the same, and nobody will drive it. It is killed as soon as its pid is
    known, not left to finish a long `initialize` first."""
    path = build_archive("slow_start", "handler.py", {"handler.py": SLOW_START})
    ready = build_archive("ready", "handler.py", {"handler.py": ECHO})

    async def scenario() -> None:
        warm = await load(worker_pool, ready)
        await (await warm.start_worker(0)).close()  # the zygote has imported torch: it forks now
        zygote = worker_pool.zygote_pid
        assert zygote is not None
        before = descendants(zygote)
        backend = await load(worker_pool, path)
        try:
            start = asyncio.ensure_future(backend.start_worker(0))
            await asyncio.sleep(0)  # the fork request is sent; its pid is not back yet
            start.cancel()
            with pytest.raises(asyncio.CancelledError):
                await start
            await asyncio.sleep(1.0)  # forked, its pid reported, and killed
            assert descendants(zygote) == before
        finally:
            await asyncio.gather(backend.close(), warm.close())

    run(scenario())


# -- what a worker process gives its archive --------------------------------------------------


def test_handler_runs_in_a_worker_process_in_its_model_dir(
    worker_pool: WorkerPool, build_archive: BuildArchive
) -> None:
    """TorchServe's worker contract: the model directory is the working directory and first on
    `sys.path`; the process is forked by the pool's zygote, never the frontend itself."""
    source = """
        import os
        import sys

        def handle(data, context):
            if data is None:
                return None
            return [{"pid": os.getpid(), "parent": os.getppid(), "cwd": os.getcwd(),
                     "path0": sys.path[0], "config": open("config.txt").read()}] * len(data)
    """
    path = build_archive("where", "handler.py", {"handler.py": source, "config.txt": "ok"})
    cwd_before, path_before = os.getcwd(), list(sys.path)

    async def scenario() -> tuple[ProcessWorker, Path, Any]:
        backend = await load(worker_pool, path)
        try:
            worker = await backend.start_worker(0)
            assert worker.memory_bytes() > 0
            [out] = await worker.predict(requests(1))
            return worker, backend.archive.model_dir, out.body
        finally:
            await backend.close()

    worker, model_dir, body = run(scenario())
    assert body["pid"] == worker.pid != os.getpid()
    assert body["parent"] == worker_pool.zygote_pid
    assert Path(body["cwd"]).resolve() == model_dir.resolve()
    assert body["path0"] == str(model_dir)
    assert body["config"] == "ok"
    assert (os.getcwd(), sys.path) == (cwd_before, path_before), "the frontend is untouched"


SIBLING_HANDLER = """
    import common

    counter = {"calls": 0}

    def handle(data, context):
        if data is None:
            return None
        counter["calls"] += 1
        return [{"who": common.WHO, "calls": counter["calls"]}] * len(data)
"""


def test_same_module_names_in_two_archives(
    worker_pool: WorkerPool, build_archive: BuildArchive
) -> None:
    a = build_archive(
        "alpha", "handler.py", {"handler.py": SIBLING_HANDLER, "common.py": "WHO = 'alpha'\n"}
    )
    b = build_archive(
        "beta", "handler.py", {"handler.py": SIBLING_HANDLER, "common.py": "WHO = 'beta'\n"}
    )
    path_before = list(sys.path)

    async def scenario() -> list[Any]:
        backend_a = await load(worker_pool, a)
        backend_b = await load(worker_pool, b)
        a0 = await backend_a.start_worker(0)
        b0 = await backend_b.start_worker(0)
        a1 = await backend_a.start_worker(1)
        try:
            return [
                (await a0.predict(requests(1)))[0].body,
                (await b0.predict(requests(1)))[0].body,
                (await a0.predict(requests(1)))[0].body,
                (await a1.predict(requests(1)))[0].body,
            ]
        finally:
            await backend_a.close()
            await backend_b.close()

    assert run(scenario()) == [
        {"who": "alpha", "calls": 1},
        {"who": "beta", "calls": 1},
        {"who": "alpha", "calls": 2},
        {"who": "alpha", "calls": 1},  # module state is per worker process, as in TorchServe
    ]
    # the archives' modules were imported in the workers only
    assert "common" not in sys.modules and "handler" not in sys.modules
    assert sys.path == path_before


def test_archive_package_directory(worker_pool: WorkerPool, build_archive: BuildArchive) -> None:
    source = """
        from helpers.text import shout

        def handle(data, context):
            return None if data is None else [shout(row["body"]) for row in data]
    """
    path = build_archive(
        "pkg",
        "handler.py",
        {
            "handler.py": source,
            "helpers/__init__.py": "",
            "helpers/text.py": "def shout(s):\n    return s.upper() + '!'\n",
        },
    )
    [out] = run(serve(worker_pool, path, [requests("hi")]))
    assert bodies(out) == ["HI!"]
    assert "helpers" not in sys.modules


def test_import_at_request_time_works(worker_pool: WorkerPool, build_archive: BuildArchive) -> None:
    """The model directory stays on the worker's `sys.path`, so a handler may import an archive
    module lazily, inside `handle`, as it can in TorchServe."""
    source = """
        def handle(data, context):
            if data is None:
                return None
            import lazy_helper
            return [lazy_helper.VALUE] * len(data)
    """
    path = build_archive(
        "lazy", "handler.py", {"handler.py": source, "lazy_helper.py": "VALUE = 1\n"}
    )
    [out] = run(serve(worker_pool, path, [requests(1, 2)]))
    assert bodies(out) == [1, 1]
    assert "lazy_helper" not in sys.modules


# -- devices ----------------------------------------------------------------------------------


def test_cpu_worker_has_no_gpu_and_one_torch_thread(
    worker_pool: WorkerPool, build_archive: BuildArchive
) -> None:
    source = """
        import torch

        def handle(data, context):
            if data is None:
                return None
            return [[context.system_properties["gpu_id"], torch.get_num_threads()]] * len(data)
    """
    path = build_archive("cpu", "handler.py", {"handler.py": source})

    async def scenario(**options: Any) -> tuple[str, Any]:
        backend = await load(worker_pool, path, **options)
        try:
            worker = await backend.start_worker(0)
            return worker.device, (await worker.predict(requests(1)))[0].body
        finally:
            await backend.close()

    # Every visible GPU (none, on a machine without one) and an explicit 0 both mean CPU.
    if not _cuda_visible():
        assert run(scenario()) == ("cpu", [None, 1])
    assert run(scenario(gpus=GpuRoundRobin(0), intra_op_threads=2)) == ("cpu", [None, 2])


def test_omp_num_threads_sizes_cpu_workers_unless_the_key_does(
    worker_pool: WorkerPool, build_archive: BuildArchive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As TorchServe's users size workers: with OMP_NUM_THREADS set, torch keeps the count it
    read from it (0: leave it), unless torchgate.intra_op_threads is set."""
    path = build_archive("omp", "handler.py", {"handler.py": "def handle(d, c): return d"})

    async def threads(**options: Any) -> int:
        backend = await load(worker_pool, path, **options)
        await backend.close()
        return backend._intra_op_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert run(threads()) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert run(threads()) == 0
    assert run(threads(intra_op_threads=2)) == 2


def test_worker_runs_on_the_gpu_the_frontend_assigned(tmp_path: Path) -> None:
    """The worker's side (`api.workers.main._device`, what a worker runs after the fork): the
    GPU comes from the frontend's round robin (tests/backends/test_gpu_assignment.py), and is
    made torch's current device. CUDA is a stand-in, because no GPU exists here and a forked
    worker's torch cannot be patched."""
    (tmp_path / "MAR-INF").mkdir()
    (tmp_path / "MAR-INF" / "MANIFEST.json").write_text(manifest())
    (tmp_path / "handler.py").write_text("def handle(data, context):\n    return data\n")
    archive = open_archive(tmp_path)
    chosen: list[int] = []
    cuda = SimpleNamespace(is_available=lambda: True, device_count=lambda: 3, set_device=None)
    cuda.set_device = chosen.append
    torch = SimpleNamespace(cuda=cuda)

    def device(index: int, gpu_id: int | None) -> int | None:
        spec = WorkerSpec(
            archive=archive, index=index, batch_size=1, gpu_id=gpu_id, intra_op_threads=1
        )
        return _device(torch, spec)

    # The frontend's GPU, whatever the worker's index (TorchServe: one server-wide counter)
    assert [device(0, 1), device(1, 2), device(0, 0)] == [1, 2, 0]
    assert chosen == [1, 2, 0]
    # No GPU assigned, or no CUDA in this torch: CPU, and CUDA is left alone
    chosen.clear()
    assert device(1, None) is None
    cuda.is_available = lambda: False
    assert device(1, 2) is None
    assert chosen == []


def _cuda_visible() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def test_zygote_leaves_gpu_querying_imports_to_gpu_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    # TorchServe's base_handler asks the GPU its compute capability at import; preloaded in the
    # zygote on a GPU build, that would poison every forked worker's CUDA. Builds are stood in
    # for by their `torch.version` (tests/handlers/builtin/test_cuda.py runs workers on a real
    # GPU where there is one).
    import torch

    from api.workers import zygote

    assert "ts.torch_handler.base_handler" in zygote.QUERIES_GPU_AT_IMPORT
    assert zygote.gpu_build() == bool(torch.version.cuda or torch.version.hip)
    monkeypatch.setitem(
        sys.modules, "torch", SimpleNamespace(version=SimpleNamespace(cuda=None, hip=None))
    )
    assert not zygote.gpu_build()
    cuda_torch = SimpleNamespace(version=SimpleNamespace(cuda="13.0", hip=None))
    monkeypatch.setitem(sys.modules, "torch", cuda_torch)
    assert zygote.gpu_build()
