"""The frontend <-> worker round trip alone: one batch out, its answers back, no HTTP.

    .venv/bin/python -m benchmarks.ipc [--calls 2000]

Forks one worker (through the zygote, as `torchgate serve` does) hosting an echo handler that
returns each item's length, and times sequential `ProcessWorker.predict` calls, so the figure
is the per-batch cost of the process boundary: pickling, one `writev` each way, two wake-ups,
unpickling, the handler's context set-up. Payloads: one small JSON item, a batch of 8 of them,
a 1 MiB image body (sent out of band), and a 4 MiB float32 tensor (a v2 binary input).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import uvloop

from api.backends.workers import ProcessWorker, load_worker_backend
from api.core.types import InferenceRequest, ModelSettings
from api.workers.pool import WorkerPool
from benchmarks.load import render_table

ECHO = """
def handle(data, context):
    if data is None:
        return None
    out = []
    for row in data:
        body = row.get("body")
        out.append(body.nbytes if hasattr(body, "nbytes") else len(body))
    return out
"""


@dataclass(frozen=True, slots=True)
class Payload:
    name: str
    batch: list[InferenceRequest]

    @property
    def nbytes(self) -> int:
        total = 0
        for request in self.batch:
            body = request.inputs["body"]
            total += body.nbytes if isinstance(body, np.ndarray) else len(body)
        return total


def payloads() -> list[Payload]:
    small = [0.5] * 64  # what digits gets for a JSON array of 64 numbers

    def one(body: Any) -> InferenceRequest:
        return InferenceRequest({"body": body}, {}, "r")

    return [
        Payload("1 item, 64 floats (JSON list)", [one(small)]),
        Payload("8 items, 64 floats each", [one(small) for _ in range(8)]),
        Payload("1 item, 1 MiB image bytes", [one(bytes(1 << 20))]),
        Payload("1 item, 4 MiB float32 tensor", [one(np.ones(1 << 20, np.float32))]),
    ]


def write_archive(directory: Path) -> Path:
    import json
    import zipfile

    path = directory / "echo.mar"
    manifest = {"runtime": "python", "model": {"modelName": "echo", "handler": "echo.py"}}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest))
        archive.writestr("echo.py", ECHO)
    return path


async def time_calls(worker: ProcessWorker, payload: Payload, calls: int) -> list[float]:
    for _ in range(min(100, calls)):  # warm-up
        await worker.predict(payload.batch)
    seconds = []
    for _ in range(calls):
        started = time.perf_counter()
        await worker.predict(payload.batch)
        seconds.append(time.perf_counter() - started)
    return seconds


async def measure(calls: int) -> list[list[str]]:
    pool = WorkerPool()
    rows = []
    with tempfile.TemporaryDirectory(prefix="torchgate-ipc-") as tmp:
        backend = await load_worker_backend(
            write_archive(Path(tmp)), ModelSettings(batch_size=8), pool=pool, work_dir=Path(tmp)
        )
        worker = await backend.start_worker(0)
        try:
            for payload in payloads():
                n = calls if payload.nbytes < 1 << 16 else max(calls // 10, 50)
                seconds = await time_calls(worker, payload, n)
                rows.append(_row(payload, seconds))
        finally:
            await backend.close()
            await pool.close()
    return rows


def _row(payload: Payload, seconds: Sequence[float]) -> list[str]:
    ordered = sorted(seconds)
    p50 = statistics.median(ordered) * 1e6
    p99 = ordered[int(len(ordered) * 0.99) - 1] * 1e6
    return [payload.name, f"{payload.nbytes:,}", f"{p50:,.0f}", f"{p99:,.0f}", str(len(ordered))]


COLUMNS = ("payload", "bytes", "p50 µs", "p99 µs", "calls")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ipc")
    parser.add_argument("--calls", type=int, default=2000)
    options = parser.parse_args(argv)
    rows = uvloop.run(measure(options.calls))  # the loop `torchgate serve` runs on
    print(render_table(COLUMNS, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
