"""KServe's storage layout for TorchServe models, made at test time, and its test handler.

KServe's TorchServe runtime (and torchgate in its place) reads, from the `storageUri`:

    config/config.properties      TorchServe's keys; `model_snapshot` names the models
    model-store/NAME.mar          the archives

`build_layout` writes that tree with the archives of `HANDLER` (one per version) and a
config.properties shaped like KServe's own example (its inference and management addresses
share one port, as there).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import TypeVar

from tests.support.archives import build_archive

T = TypeVar("T")

# Answers each instance (a batch item) with what it got, the version that answered and the
# `explain` request header TorchServe's frontend sets; `{"status": N}` fails that item alone.
HANDLER = """
    def handle(data, context):
        if data is None:
            return None
        version = context.manifest["model"].get("modelVersion")
        explain = context.get_request_header(0, "explain")
        answers = []
        for idx, row in enumerate(data):
            value = row.get("data", row.get("body")) if isinstance(row, dict) else row
            if isinstance(value, (bytes, bytearray)):
                value = value.decode()
            if isinstance(row, dict) and "status" in row:
                context.set_response_status(int(row["status"]), "instance refused", idx)
            answers.append({"echo": value, "version": version, "explain": explain})
        return answers
"""


def build_layout(
    root: Path,
    model: str,
    versions: Sequence[str],
    *,
    settings: Mapping[str, object] | None = None,
    extra: Mapping[str, str] | None = None,
) -> Path:
    """Write KServe's layout under `root` for `model` at `versions` (the first is the default);
    returns the path of config/config.properties."""
    store = root / "model-store"
    store.mkdir(parents=True, exist_ok=True)
    (root / "config").mkdir(exist_ok=True)
    snapshot: dict[str, dict[str, object]] = {}
    for index, version in enumerate(versions):
        mar = f"{model}_v{version.replace('.', '_')}.mar"
        built = build_archive(
            root / "build", model, "handler.py", {"handler.py": HANDLER}, version=version
        )
        shutil.move(built, store / mar)
        snapshot[version] = {
            "defaultVersion": index == 0,
            "marName": mar,
            "minWorkers": 1,
            "maxWorkers": 1,
            "batchSize": 4,
            "maxBatchDelay": 5,
            "responseTimeout": 60,
            **(settings or {}),
        }
    shutil.rmtree(root / "build", ignore_errors=True)
    model_snapshot = {"name": "startup.cfg", "modelCount": 1, "models": {model: snapshot}}
    lines = {
        "inference_address": "http://0.0.0.0:8085",
        "management_address": "http://0.0.0.0:8085",
        "metrics_address": "http://0.0.0.0:8082",
        "grpc_inference_port": "7070",
        "grpc_management_port": "7071",
        "enable_metrics_api": "true",
        "metrics_format": "prometheus",
        "job_queue_size": "10",
        "model_store": str(store),
        "model_snapshot": json.dumps(model_snapshot),
        **(extra or {}),
    }
    config = root / "config" / "config.properties"
    config.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
    return config


def start_together(stack: ExitStack, managers: Sequence[AbstractContextManager[T]]) -> list[T]:
    """Enter the servers' context managers at once (each waits for its /ping), all or none."""
    with ThreadPoolExecutor(len(managers)) as pool:
        futures = [pool.submit(manager.__enter__) for manager in managers]
        wait(futures)
    for manager, future in zip(managers, futures, strict=True):
        if future.exception() is None:
            stack.push(manager.__exit__)
    for future in futures:
        error = future.exception()
        if error is not None:
            raise error
    return [future.result() for future in futures]
