"""signature.json: the schema in the built archives, and TensorSpec's rules."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from export.signature import DATATYPES, SCHEMA_VERSION, TensorSpec

TENSOR_KEYS = {"name", "datatype", "torch_dtype", "numpy_dtype", "shape", "description"}


def signature_of(archive: Path) -> dict[str, Any]:
    with zipfile.ZipFile(archive) as mar:
        signature: dict[str, Any] = json.loads(mar.read("signature.json"))
    return signature


def check_tensors(tensors: list[dict[str, Any]]) -> None:
    assert tensors
    for tensor in tensors:
        assert set(tensor) == TENSOR_KEYS
        torch_dtype, numpy_dtype = DATATYPES[tensor["datatype"]]
        assert (tensor["torch_dtype"], tensor["numpy_dtype"]) == (torch_dtype, numpy_dtype)
        assert tensor["shape"][0] == -1  # dynamic batch


@pytest.mark.parametrize(
    ("stem", "version", "fmt", "serialized"),
    [
        ("digits", "1.0", "torchscript", "digits.pt"),
        ("digits_v2", "2.0", "onnx", "digits.onnx"),
        ("minilm", "1.0", "onnx", "minilm.onnx"),
    ],
)
def test_archive_signature(
    model_store: Path, stem: str, version: str, fmt: str, serialized: str
) -> None:
    signature = signature_of(model_store / f"{stem}.mar")
    assert signature["schema_version"] == SCHEMA_VERSION
    assert (signature["version"], signature["format"]) == (version, fmt)
    assert signature["serialized_file"] == serialized
    for key in ("inputs", "outputs", "model_inputs", "model_outputs"):
        check_tensors(signature[key])
    assert signature["parity"]["tolerance"] == 1e-4
    assert set(signature["parity"]["max_abs_diff"]) == {"torchscript", "onnx"}
    assert max(signature["parity"]["max_abs_diff"].values()) <= 1e-4
    assert signature["preprocessing"]
    # What `--if-stale` compares: the seed and the torch release it was exported with.
    assert signature["export"]["seed"] == (1 if stem == "digits_v2" else 0)
    assert signature["export"]["torch"].split("+")[0] == torch.__version__.split("+")[0]


def test_digits_signature_details(model_store: Path) -> None:
    signature = signature_of(model_store / "digits.mar")
    assert signature["labels"] == [str(i) for i in range(10)]
    (pixels,) = signature["model_inputs"]
    assert (pixels["name"], pixels["datatype"], pixels["shape"]) == (
        "pixels",
        "FP32",
        [-1, 1, 8, 8],
    )
    (probabilities,) = signature["outputs"]
    assert (probabilities["name"], probabilities["shape"]) == ("probabilities", [-1, 10])
    assert signature["preprocessing"]["divide_by"] == 16.0
    assert signature["training"]["seed"] == 0
    assert signature["training"]["heldout_accuracy"] >= 0.95
    assert signature_of(model_store / "digits_v2.mar")["training"]["seed"] == 1


def test_minilm_signature_details(model_store: Path) -> None:
    signature = signature_of(model_store / "minilm.mar")
    assert signature["labels"] is None
    (text,) = signature["inputs"]
    assert (text["name"], text["datatype"], text["numpy_dtype"], text["torch_dtype"]) == (
        "text",
        "BYTES",
        "object",
        None,
    )
    assert [t["name"] for t in signature["model_inputs"]] == [
        "input_ids",
        "attention_mask",
        "token_type_ids",
    ]
    assert all(
        t["datatype"] == "INT64" and t["shape"] == [-1, -1] for t in signature["model_inputs"]
    )
    (embedding,) = signature["outputs"]
    assert (embedding["name"], embedding["shape"]) == ("embedding", [-1, 384])
    assert signature["preprocessing"]["max_length"] == 256


def test_tensor_spec_rejects_unknown_datatype_and_zero_dims() -> None:
    with pytest.raises(ValueError, match="datatype"):
        TensorSpec("x", "float32", (-1,))
    with pytest.raises(ValueError, match="dynamic"):
        TensorSpec("x", "FP32", (0, 3))
    assert TensorSpec("x", "INT64", (-1, -1)).to_dict()["torch_dtype"] == "torch.int64"
