"""base_handler: tensors from JSON lists and raw bytes in, the model's output rows out.

TorchServe's own base_handler answers every request with "Could not infer dtype of dict"
(it makes one tensor of the request dicts); each request is one input row here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.handlers.builtin.conftest import (
    Packed,
    Serve,
    eager,
    items,
    model_class,
    onnx,
    torchscript,
)

SOURCE = """
import torch


class TinyLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.to(torch.float32))
"""


def packed_model(tmp_path: Path, fmt: str) -> tuple[torch.nn.Module, Packed]:
    torch.manual_seed(4)
    model = model_class(SOURCE, tmp_path)().eval()
    if fmt == "torchscript":
        return model, torchscript(model)
    if fmt == "eager":
        return model, eager(model, SOURCE)
    example = {"x": np.zeros((2, 4), np.float32)}
    return model, onnx(model, example, ["y"], {"x": {0: "n"}, "y": {0: "n"}}, tmp_path)


def row(model: torch.nn.Module, values: Any) -> list[float]:
    """TorchServe's BaseHandler on one input: as_tensor, the model, tolist."""
    with torch.no_grad():
        out: list[float] = model(torch.as_tensor(values)[None])[0].tolist()
    return out


@pytest.mark.parametrize("fmt", ["torchscript", "eager", "onnx"])
def test_rows_match_reference_and_bad_rows_fail_alone(
    serve: Serve, tmp_path: Path, fmt: str
) -> None:
    model, packed = packed_model(tmp_path, fmt)
    bodies: list[Any] = [
        [1.0, 2.0, 3.0, 4.0],  # parsed JSON (application/json)
        [4, 3, 2, 1],  # integers: int64, as torch.as_tensor makes them (ONNX: cast to float)
        json.dumps([0.5, -1.0, 0.0, 2.0]).encode(),  # JSON sent without its content type
        bytes([7, 8, 9, 10]),  # raw bytes: one value per byte
        [1.0, 2.0, 3.0],  # the wrong shape for this model
        {"data": [1, 2, 3, 4]},  # a JSON object is not a tensor
        "not json",
    ]
    metrics: list[str] = []
    [answers] = serve(
        "base_handler", packed, items(*bodies), on_metric=lambda name, *_: metrics.append(name)
    )
    expected = [row(model, [1.0, 2.0, 3.0, 4.0]), row(model, [4, 3, 2, 1])]
    expected += [row(model, [0.5, -1.0, 0.0, 2.0]), row(model, [7, 8, 9, 10])]
    assert [p.status for p in answers] == [200] * 4 + [400] * 3
    for answer, want in zip(answers, expected, strict=False):
        assert answer.body == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert "cannot take an input of shape [3]" in answers[4].body["message"]
    assert "got dict" in answers[5].body["message"]
    assert "expected a JSON number or list" in answers[6].body["message"]
    assert "HandlerTime" in metrics  # TorchServe's BaseHandler metric, for existing dashboards
