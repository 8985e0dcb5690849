"""signature.json: what an archive's model takes and returns, written next to the handler.

Schema (``schema_version`` 1)::

    {
      "schema_version": 1,
      "name": "digits", "version": "1.0",
      "format": "torchscript" | "onnx",
      "serialized_file": "digits.pt",          # the archive member the handler loads
      "inputs":  [TENSOR, ...],                # what a client sends (KServe v2 metadata)
      "outputs": [TENSOR, ...],                # what a client gets back
      "model_inputs":  [TENSOR, ...],          # what the serialized network takes, in order
      "model_outputs": [TENSOR, ...],          # what it returns, in order
      "labels": ["0", ...] | null,
      "preprocessing": {...},                  # what the handler does between the two
      "postprocessing": {...},
      "parity": {"tolerance": 1e-4, "max_abs_diff": {"torchscript": ..., "onnx": ...}},
      "training": {...} | null,                # e.g. seed and held-out accuracy
      "export": {"seed": 0, "torch": "2.13.0+cpu"}  # what `--if-stale` compares to rebuild
    }

    TENSOR = {"name": str, "datatype": "FP32" | "INT64" | "BYTES" | ...,   # KServe v2 names
              "torch_dtype": "torch.float32" | null, "numpy_dtype": "float32" | "object",
              "shape": [-1, ...],                                          # -1: dynamic
              "description": str}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

# KServe v2 datatype -> (torch dtype, numpy dtype). BYTES has no torch dtype; numpy holds
# variable-length strings as object arrays.
DATATYPES: dict[str, tuple[str | None, str]] = {
    "BOOL": ("torch.bool", "bool"),
    "INT32": ("torch.int32", "int32"),
    "INT64": ("torch.int64", "int64"),
    "FP16": ("torch.float16", "float16"),
    "FP32": ("torch.float32", "float32"),
    "FP64": ("torch.float64", "float64"),
    "BYTES": (None, "object"),
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]
    description: str = ""

    def __post_init__(self) -> None:
        if self.datatype not in DATATYPES:
            raise ValueError(f"unknown KServe v2 datatype {self.datatype!r}")
        if any(dim < -1 or dim == 0 for dim in self.shape):
            raise ValueError(f"shape {self.shape} of {self.name!r}: use -1 for dynamic dims")

    def to_dict(self) -> dict[str, Any]:
        torch_dtype, numpy_dtype = DATATYPES[self.datatype]
        return {
            "name": self.name,
            "datatype": self.datatype,
            "torch_dtype": torch_dtype,
            "numpy_dtype": numpy_dtype,
            "shape": list(self.shape),
            "description": self.description,
        }


@dataclass(frozen=True)
class Signature:
    name: str
    version: str
    format: str
    serialized_file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    model_inputs: tuple[TensorSpec, ...]
    model_outputs: tuple[TensorSpec, ...]
    labels: tuple[str, ...] | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    postprocessing: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] | None = None
    export: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "version": self.version,
            "format": self.format,
            "serialized_file": self.serialized_file,
            "inputs": [spec.to_dict() for spec in self.inputs],
            "outputs": [spec.to_dict() for spec in self.outputs],
            "model_inputs": [spec.to_dict() for spec in self.model_inputs],
            "model_outputs": [spec.to_dict() for spec in self.model_outputs],
            "labels": list(self.labels) if self.labels is not None else None,
            "preprocessing": self.preprocessing,
            "postprocessing": self.postprocessing,
            "parity": self.parity,
            "training": self.training,
            "export": self.export,
        }

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path
