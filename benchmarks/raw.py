"""The model itself, in-process: what one forward pass costs without any server around it.

For each digits archive: the bare runtime (TorchScript module / ONNX Runtime session) on a ready
input tensor, with 1 intra-op thread and with one per core; and the archive's handler
(`handle()` with a minimal TorchServe context: decode the JSON-parsed body, collate, run, build
the top-5 answer) with one intra-op thread, as torchgate's CPU workers run it — the work a
server cannot avoid. Each at
batch 1 and at the archive's batchSize from config.properties. Timing is `timeit`: autorange,
then the best of five repeats, per call and per item.

The minilm handler is timed both ways: the best of five short bursts, and calls back to back for
as long as a load point runs. A server's throughput is the second: on the 2-core VM the bursts
ran 18.8-20.0 ms a call and eight-second loops 20.8-21.2 ms (the host does not hold its burst
speed), so the served figure is compared with the sustained one.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import timeit
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPEATS = 5
DIGITS_PIXELS = 64
HANDLER_THREADS = 1  # torchgate's intra-op threads per CPU worker (api.backends.workers)


@dataclass(frozen=True, slots=True)
class RawResult:
    """Time of one call of `runtime` on `batch` items; microseconds."""

    model: str  # "digits 1.0"
    runtime: str  # "TorchScript", "ONNX Runtime", "handler (TorchScript)", ...
    batch: int
    per_call_us: float
    threads: int | None = None  # intra-op threads; None: the runtime's default
    sustained_s: float | None = None  # calls back to back for this long; None: best of five

    @property
    def per_item_us(self) -> float:
        return self.per_call_us / self.batch


@dataclass
class _Context:
    """The part of TorchServe's Context the example handlers touch."""

    system_properties: dict[str, Any]
    manifest: dict[str, Any] | None
    statuses: dict[int, tuple[int, str]] = field(default_factory=dict)

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)


def seconds_per_call(call: Callable[[], object]) -> float:
    """Best-of-five `timeit` time of one call (autorange picks the loop count, >= 0.2 s)."""
    timer = timeit.Timer(call)
    number, _ = timer.autorange()
    return min(timer.repeat(repeat=REPEATS, number=number)) / number


def seconds_per_call_sustained(call: Callable[[], object], seconds: float) -> float:
    """Mean time of one call over calls back to back for `seconds` (after one warm-up call)."""
    call()
    calls = 0
    began = time.perf_counter()
    while (elapsed := time.perf_counter() - began) < seconds:
        call()
        calls += 1
    return elapsed / max(calls, 1)


def sample_pixels(batch: int) -> np.ndarray:
    """`batch` deterministic digits-like inputs, 0..16, shape [batch, 64]."""
    return np.random.default_rng(0).uniform(0, 16, size=(batch, DIGITS_PIXELS)).astype(np.float32)


def _runtime_call(
    model_dir: Path, manifest: dict[str, Any], batch: int, threads: int
) -> tuple[str, Callable[[], object]]:
    serialized = model_dir / manifest["model"]["serializedFile"]
    pixels = (sample_pixels(batch) / 16).reshape(batch, 1, 8, 8)
    if serialized.suffix == ".onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(
            str(serialized), options, providers=["CPUExecutionProvider"]
        )
        feed = {session.get_inputs()[0].name: pixels}
        return "ONNX Runtime", lambda: session.run(None, feed)
    import torch

    torch.set_num_threads(threads)
    module = torch.jit.load(str(serialized), map_location="cpu").eval()
    tensor = torch.from_numpy(pixels)

    def forward() -> object:
        with torch.inference_mode():
            return module(tensor)

    return "TorchScript", forward


def _handler_call(model_dir: Path, manifest: dict[str, Any], batch: int) -> Callable[[], object]:
    import torch

    from handlers.digits_handler import DigitsHandler

    # The handler's ONNX Runtime session takes torch's thread count too (torchgate_base).
    torch.set_num_threads(HANDLER_THREADS)
    context = _Context({"model_dir": str(model_dir), "gpu_id": None}, manifest)
    handler = DigitsHandler()
    handler.initialize(context)
    # What torchgate's engine hands a handler for `POST /predictions/digits` with a JSON body.
    data = [{"body": row.tolist()} for row in sample_pixels(batch)]
    return lambda: handler.handle(data, context)


def bench_archive(mar: Path, batch_sizes: list[int]) -> list[RawResult]:
    """Runtime (1 thread, a thread per core) and handler timings of one digits archive at
    each batch size."""
    results = []
    with tempfile.TemporaryDirectory(prefix="torchgate-raw-") as tmp:
        with zipfile.ZipFile(mar) as archive:
            archive.extractall(tmp)
        model_dir = Path(tmp)
        manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
        label = f"{manifest['model']['modelName']} {manifest['model'].get('modelVersion', '1.0')}"
        cores = len(os.sched_getaffinity(0))
        for batch in batch_sizes:
            for threads in sorted({1, cores}):
                runtime, call = _runtime_call(model_dir, manifest, batch, threads)
                per_call = seconds_per_call(call) * 1e6
                results.append(RawResult(label, runtime, batch, per_call, threads))
            handler = _handler_call(model_dir, manifest, batch)
            per_call = seconds_per_call(handler) * 1e6
            results.append(
                RawResult(label, f"handler ({runtime})", batch, per_call, HANDLER_THREADS)
            )
    return results


MINILM_SENTENCE = "torchgate serves TorchServe model archives without Java."


def bench_minilm(mar: Path, batch: int, sustained_s: float) -> list[RawResult]:
    """The minilm handler in-process at `batch` texts per call, one intra-op thread as
    torchgate's workers run it: the best of five bursts, and calls back to back for
    `sustained_s` seconds, the batched throughput a server of it can at best keep up."""
    import torch

    from handlers.minilm_handler import MiniLMHandler

    torch.set_num_threads(HANDLER_THREADS)
    with tempfile.TemporaryDirectory(prefix="torchgate-raw-") as tmp:
        with zipfile.ZipFile(mar) as archive:
            archive.extractall(tmp)
        manifest = json.loads((Path(tmp) / "MAR-INF" / "MANIFEST.json").read_text())
        context = _Context({"model_dir": tmp, "gpu_id": None, "batch_size": batch}, manifest)
        handler = MiniLMHandler()
        handler.initialize(context)
        data = [{"body": MINILM_SENTENCE.encode()} for _ in range(batch)]

        def call() -> object:
            return handler.handle(data, context)

        burst = seconds_per_call(call) * 1e6
        sustained = seconds_per_call_sustained(call, sustained_s) * 1e6
    label = f"{manifest['model']['modelName']} {manifest['model'].get('modelVersion', '1.0')}"
    runtime = "handler (ONNX Runtime)"
    return [
        RawResult(label, runtime, batch, burst, HANDLER_THREADS),
        RawResult(label, runtime, batch, sustained, HANDLER_THREADS, sustained_s=sustained_s),
    ]
