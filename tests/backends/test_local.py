"""LocalBackend: handler kinds, the TorchServe context, per-item outcomes, failures, isolation."""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from api.backends.archive import ArchiveError
from api.backends.loader import HandlerLoadError
from api.backends.local import LocalBackend, LocalWorker, load_local_backend
from api.core.types import InferenceRequest, ModelSettings, Prediction
from api.errors import BadRequest, InferenceFailed, ModelNotReady
from tests.backends.conftest import BuildArchive, expected_linear, requests, run, settings

ECHO = """
    def handle(data, context):
        if data is None:
            return None
        return [{"body": row["body"], "id": context.get_request_id(idx)}
                for idx, row in enumerate(data)]
"""


async def serve(
    path: Path,
    batches: Sequence[Sequence[InferenceRequest]],
    *,
    workers: int = 1,
    model_settings: ModelSettings | None = None,
    **options: Any,
) -> list[list[Prediction]]:
    """Load the archive, run each batch on worker 0, close everything (as the registry does)."""
    backend = await load_local_backend(
        path, model_settings or settings(), work_dir=path.parent / "work", **options
    )
    try:
        started = [await backend.start_worker(i) for i in range(workers)]
        return [await started[0].predict(batch) for batch in batches]
    finally:
        await backend.close()


def bodies(predictions: list[Prediction]) -> list[Any]:
    return [p.body for p in predictions]


# -- handler kinds --------------------------------------------------------------------------


def test_module_function(build_archive: BuildArchive) -> None:
    path = build_archive("echo", "handler.py", {"handler.py": ECHO})
    [out] = run(serve(path, [requests(1, "two", {"three": 3})]))
    assert bodies(out) == [
        {"body": 1, "id": "req-0"},
        {"body": "two", "id": "req-1"},
        {"body": {"three": 3}, "id": "req-2"},
    ]
    assert all(p.status == 200 and p.message == "" and p.headers == {} for p in out)


def test_module_colon_function(build_archive: BuildArchive) -> None:
    source = """
        def handle(data, context):
            raise AssertionError("not the entry point")

        def predict(data, context):
            return None if data is None else ["predict"] * len(data)
    """
    path = build_archive("fn", "handler.py", {"handler.py": source})
    [out] = run(serve(path, [requests(1, 2)], handler="handler.py:predict"))
    assert bodies(out) == ["predict", "predict"]


def test_module_initialize_is_called_instead_of_handle_none(build_archive: BuildArchive) -> None:
    source = """
        state = {}

        def initialize(context):
            state["model_dir"] = context.system_properties["model_dir"]

        def handle(data, context):
            assert data is not None, "initialize replaces handle(None, context)"
            return [state["model_dir"]] * len(data)
    """
    path = build_archive("init", "handler.py", {"handler.py": source})
    [out] = run(serve(path, [requests(1)]))
    assert Path(out[0].body).name.startswith("init-1.0-")


def test_class_handler_one_instance_per_worker(build_archive: BuildArchive) -> None:
    source = """
        import threading

        class Handler:
            def __init__(self):
                self.context = None
                self.threads = set()

            def initialize(self, context):
                self.context = context
                self.threads.add(threading.current_thread().name)

            def handle(self, data, context):
                assert context is self.context
                self.threads.add(threading.current_thread().name)
                return [{"me": id(self), "threads": sorted(self.threads),
                         "gpu": context.system_properties["gpu_id"]}] * len(data)
    """
    path = build_archive("cls", "handler.py", {"handler.py": source})

    async def scenario() -> list[list[Prediction]]:
        backend = await load_local_backend(path, settings(), work_dir=path.parent / "w")
        w0, w1 = await backend.start_worker(0), await backend.start_worker(1)
        try:
            assert w0.device == w1.device == "cpu"
            return [
                await w0.predict(requests(1)),
                await w0.predict(requests(2)),
                await w1.predict(requests(3)),
            ]
        finally:
            await backend.close()

    first, second, other = run(scenario())
    assert first[0].body["me"] == second[0].body["me"] != other[0].body["me"]
    # initialize and every handle of a worker ran on that worker's one thread
    assert len(second[0].body["threads"]) == 1
    assert second[0].body["threads"] != other[0].body["threads"]
    assert first[0].body["gpu"] is None


def test_builtin_base_handler_serves_json_rows(
    build_archive: BuildArchive, scripted_model: bytes
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

    [out] = run(serve(path, [requests([1.0, 2.0, 3.0, 4.0], [1.0, 2.0])], on_metric=on_metric))
    assert out[0].body == pytest.approx(expected_linear([[1.0, 2.0, 3.0, 4.0]])[0])
    assert (out[0].status, out[1].status) == (200, 400)
    assert ("HandlerTime", "Milliseconds") in recorded
    assert ("PredictionTime", "Milliseconds") in recorded


def test_builtin_image_classifier_needs_no_torchvision(
    build_archive: BuildArchive, scripted_model: bytes
) -> None:
    """TorchServe's image_classifier imports torchvision; torchgate's loads without it."""
    path = build_archive(
        "img", "image_classifier", {"model.pt": scripted_model}, serialized="model.pt"
    )
    [out] = run(serve(path, [requests(b"not an image")]))
    assert out[0].status == 400 and out[0].body["type"] == "BadRequest"


def test_unknown_handler_is_an_archive_error(tmp_path: Path) -> None:
    from tests.backends.conftest import manifest, write_zip

    path = write_zip(tmp_path / "m.mar", {"MAR-INF/MANIFEST.json": manifest("nope")})
    with pytest.raises(ArchiveError):
        run(serve(path, []))


def test_module_with_two_classes_and_no_handle(build_archive: BuildArchive) -> None:
    source = """
        class A:
            pass

        class B:
            pass
    """
    path = build_archive("two", "handler.py", {"handler.py": source})
    with pytest.raises(HandlerLoadError, match=r"exactly one class.*\['A', 'B'\]"):
        run(serve(path, []))


def test_initialize_failure(build_archive: BuildArchive) -> None:
    source = """
        def handle(data, context):
            raise FileNotFoundError("weights.bin")
    """
    path = build_archive("broken", "handler.py", {"handler.py": source})
    with pytest.raises(HandlerLoadError, match="failed to initialize: FileNotFoundError"):
        run(serve(path, []))
    assert not list((path.parent / "work").iterdir()), "the extraction is cleaned up"


# -- the context and per-item outcomes ------------------------------------------------------


def test_context_matches_torchserve(build_archive: BuildArchive) -> None:
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
    [out] = run(serve(path, [batch], model_settings=settings(batch_size=4)))
    assert out[0].body == {
        "model_name": "ctx",
        "handler": "handler.py",
        "batch_size": 4,
        "server_name": "MMS",
        "gpu_id": None,
        "limit": True,
        "yaml": {"handler": {"mode": "fast"}},
        "header": "acme",
        "headers": {"x-tenant": "acme"},
        "request_id": "req-0",
    }


def test_per_item_status_and_headers(build_archive: BuildArchive) -> None:
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
    [out] = run(serve(path, [requests("ok", "bad", "fine")]))
    assert [(p.status, p.message, p.body) for p in out] == [
        (200, "", "OK"),
        (422, "cannot read item", {"error": "bad item"}),
        (200, "", "FINE"),
    ]
    assert out[0].headers == {"content-type": "text/plain", "x-item": "0"}
    assert out[1].headers == {}
    # statuses belong to their batch: the next batch starts from 200 again
    [again] = run(serve(path, [requests("bad"), requests("ok")]))[1:]
    assert again[0].status == 200


def test_metrics_reach_the_callback_with_each_models_name(build_archive: BuildArchive) -> None:
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
        run(serve(path, [requests(1, 2)], on_metric=on_metric))
    counters = [entry for entry in seen if entry[0] == "Items"]
    assert counters == [
        ("Items", 2, "Count", {"ModelName": "first", "Level": "Model"}, "counter"),
        ("Items", 2, "Count", {"ModelName": "second", "Level": "Model"}, "counter"),
    ]


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
        return ["ok"] * len(data)
"""


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        ("crash", InferenceFailed, "handler failed: ValueError: cannot handle crash"),
        ("short", InferenceFailed, "returned 1 responses for a batch of 2 requests"),
        ("none", InferenceFailed, "returned NoneType, expected a list of 2 responses"),
        ("teapot", BadRequest, "no coffee"),
    ],
)
def test_failed_batch_then_the_next_one_works(
    build_archive: BuildArchive, body: str, error: type[Exception], message: str
) -> None:
    path = build_archive("crashy", "handler.py", {"handler.py": CRASHY})

    async def scenario() -> list[Prediction]:
        backend = await load_local_backend(path, settings(), work_dir=path.parent / "w")
        worker = await backend.start_worker(0)
        try:
            with pytest.raises(error, match=message):
                await worker.predict(requests("fine", body))
            return await worker.predict(requests("fine", "also fine"))
        finally:
            await backend.close()

    assert bodies(run(scenario())) == ["ok", "ok"]


def test_closed_worker_refuses_batches(build_archive: BuildArchive) -> None:
    path = build_archive("closing", "handler.py", {"handler.py": ECHO})

    async def scenario() -> tuple[LocalBackend, LocalWorker]:
        backend = await load_local_backend(path, settings(), work_dir=path.parent / "w")
        worker = await backend.start_worker(0)
        await worker.close()
        await worker.close()  # idempotent
        with pytest.raises(ModelNotReady):
            await worker.predict(requests(1))
        await backend.close()
        return backend, worker

    backend, _ = run(scenario())
    assert not backend.archive.model_dir.exists()


# -- isolation between archives ---------------------------------------------------------------

SIBLING_HANDLER = """
    import common

    counter = {"calls": 0}

    def handle(data, context):
        if data is None:
            return None
        counter["calls"] += 1
        return [{"who": common.WHO, "calls": counter["calls"]}] * len(data)
"""


def test_same_module_names_in_two_archives(build_archive: BuildArchive) -> None:
    a = build_archive(
        "alpha", "handler.py", {"handler.py": SIBLING_HANDLER, "common.py": "WHO = 'alpha'\n"}
    )
    b = build_archive(
        "beta", "handler.py", {"handler.py": SIBLING_HANDLER, "common.py": "WHO = 'beta'\n"}
    )
    path_before = list(sys.path)

    async def scenario() -> list[Any]:
        backend_a = await load_local_backend(a, settings(), work_dir=a.parent / "w")
        backend_b = await load_local_backend(b, settings(), work_dir=b.parent / "w")
        a0 = await backend_a.start_worker(0)
        b0 = await backend_b.start_worker(0)
        a1 = await backend_a.start_worker(1)
        try:
            # nothing of either archive is left importable by name
            assert "common" not in sys.modules and "handler" not in sys.modules
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
        {"who": "alpha", "calls": 1},  # module state is per worker, as per process in TorchServe
    ]
    assert sys.path == path_before


def test_archive_package_directory(build_archive: BuildArchive) -> None:
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
    [out] = run(serve(path, [requests("hi")]))
    assert bodies(out) == ["HI!"]
    assert "helpers" not in sys.modules


def test_import_at_request_time_explains_itself(build_archive: BuildArchive) -> None:
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
    with pytest.raises(InferenceFailed, match="'lazy_helper' was imported at request time"):
        run(serve(path, [requests(1)]))


def test_handler_runs_off_the_event_loop_thread(build_archive: BuildArchive) -> None:
    source = """
        import threading

        def handle(data, context):
            return None if data is None else [threading.current_thread().name] * len(data)
    """
    path = build_archive("thread", "handler.py", {"handler.py": source})
    [out] = run(serve(path, [requests(1)]))
    assert out[0].body != threading.current_thread().name
    assert out[0].body.startswith("torchgate-thread-1.0-w0")


def test_workers_go_round_robin_over_gpus(
    build_archive: BuildArchive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Device assignment only: CUDA itself is faked, the handler never touches it."""
    import torch

    current: dict[str, int] = {}
    monkeypatch.setattr(
        torch.cuda,
        "set_device",
        lambda gpu: current.__setitem__(threading.current_thread().name, gpu),
    )
    source = """
        import threading

        def handle(data, context):
            if data is None:
                return None
            gpu = context.system_properties["gpu_id"]
            return [[gpu, threading.current_thread().name]] * len(data)
    """
    path = build_archive("gpus", "handler.py", {"handler.py": source})

    async def scenario() -> list[tuple[str, Any]]:
        backend = await load_local_backend(
            path, settings(), work_dir=path.parent / "w", gpu_count=2
        )
        try:
            workers = [await backend.start_worker(i) for i in range(3)]
            return [(w.device, (await w.predict(requests(1)))[0].body) for w in workers]
        finally:
            await backend.close()

    out = run(scenario())
    assert [(device, gpu) for device, (gpu, _) in out] == [
        ("cuda:0", 0),
        ("cuda:1", 1),
        ("cuda:0", 0),
    ]
    assert [current[thread] for _, (_, thread) in out] == [0, 1, 0]
