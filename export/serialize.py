"""nn.Module -> TorchScript (.pt) and ONNX (.onnx), both with dynamic batch (and sequence) dims.

ONNX goes through the TorchScript-based exporter (``dynamo=False``): it names outputs reliably
(the dynamo exporter wrote a "Duplicate definition of name" graph when given ``output_names``),
takes ``dynamic_axes`` directly and writes one self-contained file for models under 2 GB, so no
``.onnx.data`` side file has to travel in the archive. `export_onnx` checks the result with
onnx's checker and by opening it in ONNX Runtime before anything is archived.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

ONNX_OPSET = 17


@contextmanager
def quiet_exporters() -> Iterator[None]:
    """Silence the tracer's and the legacy exporter's advisory warnings (deprecation notices,
    "converting a tensor to a Python boolean might cause the trace to be incorrect" inside
    transformers). Parity checks, not these warnings, decide whether an export is right, and the
    test suite runs with warnings as errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        yield


def _as_tensors(inputs: Mapping[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(array)) for array in inputs.values())


def export_torchscript(
    module: nn.Module, example_inputs: Mapping[str, np.ndarray], path: Path
) -> Path:
    """Trace `module` on `example_inputs` (keyed by input name, in forward() order) and save it.

    Tracing records the ops of one run; shapes stay symbolic, so batch and sequence length stay
    dynamic as long as forward() has no data-dependent Python branches. Parity at two batch
    sizes is what proves that for a given model."""
    module.eval()
    with quiet_exporters(), torch.no_grad():
        traced = torch.jit.trace(module, _as_tensors(example_inputs), check_trace=False)
        frozen = torch.jit.freeze(traced)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(frozen, str(path))
    return path


def export_onnx(
    module: nn.Module,
    example_inputs: Mapping[str, np.ndarray],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    path: Path,
) -> Path:
    """Export `module` to ONNX (opset `ONNX_OPSET`) with the given dynamic axes, then verify
    that the file is a valid model that ONNX Runtime can open."""
    module.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_exporters(), torch.no_grad():
        torch.onnx.export(
            module,
            _as_tensors(example_inputs),
            str(path),
            input_names=list(example_inputs),
            output_names=list(output_names),
            dynamic_axes={name: dict(axes) for name, axes in dynamic_axes.items()},
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    _verify_onnx(path, list(example_inputs), list(output_names))
    return path


def _verify_onnx(path: Path, input_names: list[str], output_names: list[str]) -> None:
    import onnx
    import onnxruntime

    # Both raise exception types of their own (not RuntimeError): make them export failures.
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise RuntimeError(f"{path}: not a valid ONNX model: {exc}") from exc
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's Fail, InvalidGraph, ... share no base but Exception
        raise RuntimeError(f"{path}: ONNX Runtime cannot load it: {exc}") from exc
    got_inputs = [node.name for node in session.get_inputs()]
    got_outputs = [node.name for node in session.get_outputs()]
    # The exporter drops inputs the graph does not use; every name it keeps must be ours.
    if not set(got_inputs) <= set(input_names) or got_outputs != output_names:
        raise RuntimeError(
            f"{path}: ONNX graph has inputs {got_inputs} and outputs {got_outputs}, "
            f"expected inputs {input_names} and outputs {output_names}"
        )
