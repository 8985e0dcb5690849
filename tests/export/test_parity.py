"""The parity check: measures every backend at every batch size, fails above tolerance."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from export import parity
from export.models import digits
from export.serialize import export_onnx, export_torchscript


def batches() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": rng.random((n, 4), dtype=np.float32)} for n in (1, 8)]


def reference(inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    return inputs["x"] * 2


def test_exact_backend_passes() -> None:
    results = parity.compare(reference, {"same": reference}, batches())
    assert [(r.backend, r.batch_size, r.max_abs_diff) for r in results] == [
        ("same", 1, 0.0),
        ("same", 8, 0.0),
    ]
    parity.check(results, 1e-4, "toy")


def test_drift_above_tolerance_fails_naming_backend_and_batch() -> None:
    def drifting(inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        out = reference(inputs)
        return out + (1e-3 if len(out) == 8 else 0.0)

    results = parity.compare(reference, {"drifting": drifting}, batches())
    with pytest.raises(parity.ParityError, match=r"drifting batch 8: 0\.001"):
        parity.check(results, 1e-4, "toy")
    parity.check(results, 1e-2, "toy")  # within a looser tolerance


def test_nan_fails() -> None:
    results = [parity.ParityResult("broken", 1, float("nan"))]
    with pytest.raises(parity.ParityError):
        parity.check(results, 1e-4, "toy")


def test_shape_mismatch_fails() -> None:
    def first_row(inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        return reference(inputs)[:1]

    with pytest.raises(parity.ParityError, match="output shape"):
        parity.compare(reference, {"first-row": first_row}, batches())


def test_serialized_digits_match_eager_at_batch_1_and_8(tmp_path: Path) -> None:
    data = digits.load_data()
    model = digits.DigitsClassifier(digits.DigitsNet()).eval()  # untrained is enough here
    example = {"pixels": data.x_train[:2]}
    ts = export_torchscript(model, example, tmp_path / "d.pt")
    onnx = export_onnx(
        model,
        example,
        ["probabilities"],
        {"pixels": {0: "b"}, "probabilities": {0: "b"}},
        tmp_path / "d.onnx",
    )
    results = parity.compare(
        parity.eager_runner(model),
        {"torchscript": parity.torchscript_runner(ts), "onnx": parity.onnx_runner(onnx)},
        [digits.sample_inputs(1, data), digits.sample_inputs(8, data)],
    )
    assert {(r.backend, r.batch_size) for r in results} == {
        (b, n) for b in ("torchscript", "onnx") for n in (1, 8)
    }
    parity.check(results, 1e-4, "digits")
    assert parity.worst(results)["onnx"] < 1e-4
