"""Parity: the serialized models must compute what the eager module computes.

Each backend (eager PyTorch, TorchScript, ONNX Runtime) runs the same inputs at each batch size;
the largest absolute difference from eager, per backend and batch size, must stay within the
tolerance or the export fails with `ParityError` before anything is archived.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

Inputs = Mapping[str, np.ndarray]
Runner = Callable[[Inputs], np.ndarray]


class ParityError(RuntimeError):
    """A serialized model's output differs from eager PyTorch by more than the tolerance."""


@dataclass(frozen=True)
class ParityResult:
    backend: str
    batch_size: int
    max_abs_diff: float


def eager_runner(module: nn.Module) -> Runner:
    def run(inputs: Inputs) -> np.ndarray:
        with torch.inference_mode():
            tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in inputs.values()]
            return module(*tensors).numpy()

    module.eval()
    return run


def torchscript_runner(path: Path) -> Runner:
    scripted = torch.jit.load(str(path), map_location="cpu")

    def run(inputs: Inputs) -> np.ndarray:
        with torch.inference_mode():
            tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in inputs.values()]
            return scripted(*tensors).numpy()

    return run


def onnx_runner(path: Path) -> Runner:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wanted = {node.name for node in session.get_inputs()}

    def run(inputs: Inputs) -> np.ndarray:
        feed = {name: np.ascontiguousarray(a) for name, a in inputs.items() if name in wanted}
        return np.asarray(session.run(None, feed)[0])

    return run


def compare(
    reference: Runner,
    backends: Mapping[str, Runner],
    batches: Sequence[Inputs],
) -> list[ParityResult]:
    """Max abs difference of each backend from `reference` on each batch (no tolerance)."""
    results: list[ParityResult] = []
    for inputs in batches:
        expected = reference(inputs)
        batch_size = len(next(iter(inputs.values())))
        for backend, run in backends.items():
            got = run(inputs)
            if got.shape != expected.shape:
                raise ParityError(
                    f"{backend} at batch {batch_size}: output shape {got.shape}, "
                    f"eager gives {expected.shape}"
                )
            diff = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
            results.append(ParityResult(backend, batch_size, diff))
    return results


def check(results: Sequence[ParityResult], tolerance: float, model: str) -> None:
    """Raise `ParityError` naming every (backend, batch size) above `tolerance`."""
    failures = [r for r in results if not r.max_abs_diff <= tolerance]  # NaN fails too
    if failures:
        details = ", ".join(
            f"{r.backend} batch {r.batch_size}: {r.max_abs_diff:.3g}" for r in failures
        )
        raise ParityError(f"{model}: max abs difference from eager above {tolerance:g} ({details})")


def report(results: Sequence[ParityResult], model: str) -> str:
    return "\n".join(
        f"parity {model:<8} {r.backend:<12} batch {r.batch_size:<3} max|diff| {r.max_abs_diff:.3g}"
        for r in results
    )


def worst(results: Sequence[ParityResult]) -> dict[str, float]:
    """Largest difference per backend, for signature.json."""
    out: dict[str, float] = {}
    for r in results:
        out[r.backend] = max(out.get(r.backend, 0.0), r.max_abs_diff)
    return out
