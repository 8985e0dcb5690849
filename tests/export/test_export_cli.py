"""`torchgate export`: the archives --all builds, single exports, and failures."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from export import cli, recipes
from export.archive import read_manifest
from export.build import ALL, ExportSpec, archive_stem
from export.recipes import ExportError


@pytest.mark.parametrize(
    ("stem", "version", "serialized"),
    [
        ("digits", "1.0", "digits.pt"),
        ("digits_v2", "2.0", "digits.onnx"),
        ("minilm", "1.0", "minilm.onnx"),
    ],
)
def test_all_builds_side_by_side_versions(
    model_store: Path, stem: str, version: str, serialized: str
) -> None:
    archive = model_store / f"{stem}.mar"
    model = read_manifest(archive)["model"]
    assert model["modelName"] == stem.split("_")[0]
    assert model["modelVersion"] == version
    assert model["serializedFile"] == serialized
    assert model["handler"] == f"{model['modelName']}_handler.py"
    with zipfile.ZipFile(archive) as mar:
        members = set(mar.namelist())
    # Flat: the handler imports its base module by plain name from the same directory.
    assert {serialized, model["handler"], "torchgate_base.py", "signature.json"} <= members
    assert ("tokenizer.json" in members) == (stem == "minilm")
    assert ("index_to_name.json" in members) == stem.startswith("digits")


def test_all_spec() -> None:
    assert [(s.archive_file, s.name, s.version, s.format, s.seed) for s in ALL] == [
        ("digits.mar", "digits", "1.0", "torchscript", 0),
        ("digits_v2.mar", "digits", "2.0", "onnx", 1),
        ("minilm.mar", "minilm", "1.0", "onnx", 0),
    ]
    assert archive_stem("digits", "2.1") == "digits_v2.1"


def test_single_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "export",
        "digits",
        "--format",
        "onnx",
        "--version",
        "3.0",
        "--seed",
        "2",
        "--out",
        str(tmp_path / "store"),
        "--build-dir",
        str(tmp_path / "build"),
    ]
    assert cli.main(argv) == 0
    model = read_manifest(tmp_path / "store" / "digits_v3.mar")["model"]
    assert (model["modelName"], model["modelVersion"]) == ("digits", "3.0")
    out = capsys.readouterr().out
    assert "digits seed 2: held-out accuracy 0.9" in out
    assert "parity digits   onnx         batch 8" in out


def test_parity_failure_exits_non_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # TorchScript reproduces eager exactly; ONNX Runtime differs by ~1e-7: above 1e-12.
    monkeypatch.setattr(recipes, "DIGITS_TOLERANCE", 1e-12)
    argv = ["digits", "--out", str(tmp_path / "store"), "--build-dir", str(tmp_path / "b")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "max abs difference from eager above 1e-12" in err
    assert "onnx batch" in err
    assert not (tmp_path / "store" / "digits.mar").exists()


def test_bad_arguments() -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([])  # neither NAME nor --all
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["resnet"])
    with pytest.raises(ExportError, match="unknown format"):
        ExportSpec("digits", "tensorrt", "1.0")
