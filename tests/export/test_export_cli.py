"""`torchgate export`: the archives --all builds, single exports, and failures."""

from __future__ import annotations

import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from export import archive, build, cli, recipes
from export.archive import ArchiveError, make_archive, read_manifest
from export.build import ALL, BuildResult, ExportSpec, archive_stem
from export.recipes import ExportError
from export.serialize import _verify_onnx


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


@pytest.fixture
def rebuilt(monkeypatch: pytest.MonkeyPatch) -> list[ExportSpec]:
    """The specs `build` re-exports, recorded instead of exported (seconds each)."""
    specs: list[ExportSpec] = []

    def fake_build(spec: ExportSpec, destination: Path, build_dir: Path) -> BuildResult:
        specs.append(spec)
        return BuildResult(spec, destination)

    monkeypatch.setattr(build, "_build", fake_build)
    return specs


def test_if_stale_keeps_only_archives_built_as_asked(
    model_store: Path,
    tmp_path: Path,
    rebuilt: list[ExportSpec],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(model_store / "digits.mar", store)  # newer than the sources: fresh by mtime
    built_as = ALL[0]  # digits 1.0, torchscript, seed 0
    assert build.build(built_as, store, tmp_path / "b", force=False).skipped
    # The local build label (+cpu, +cu121) changes no exported file.
    monkeypatch.setattr(torch, "__version__", torch.__version__.split("+")[0] + "+cu999")
    assert build.build(built_as, store, tmp_path / "b", force=False).skipped
    assert rebuilt == []

    others = [
        ExportSpec("digits", "onnx", "1.0", seed=7),
        replace(built_as, format="onnx"),
        replace(built_as, seed=7),
        replace(built_as, version="2.0", archive="digits"),
        ExportSpec("minilm", "torchscript", "1.0", archive="digits"),
    ]
    for spec in others:
        assert not build.build(spec, store, tmp_path / "b", force=False).skipped
    monkeypatch.setattr(torch, "__version__", "9.9.0")
    assert not build.build(built_as, store, tmp_path / "b", force=False).skipped
    assert rebuilt == [*others, built_as]


def test_if_stale_rebuilds_unreadable_archive(tmp_path: Path, rebuilt: list[ExportSpec]) -> None:
    (tmp_path / "digits.mar").write_bytes(b"not a zip")
    assert not build.build(ALL[0], tmp_path, tmp_path / "b", force=False).skipped
    assert rebuilt == [ALL[0]]


def archive_from(directory: Path, destination: Path) -> set[str]:
    """Archive a dummy model whose files all sit in `directory`; the archive's members."""
    directory.mkdir(parents=True)
    for name in ("model.pt", "handler.py", "signature.json", "index_to_name.json"):
        (directory / name).write_text("{}")
    make_archive(
        model_name="m",
        version="1.0",
        serialized_file=directory / "model.pt",
        handler=directory / "handler.py",
        extra_files=[directory / "signature.json", directory / "index_to_name.json"],
        destination=destination,
    )
    with zipfile.ZipFile(destination) as mar:
        return set(mar.namelist())


@pytest.mark.parametrize("directory", ["build[1]", "build,1", "b*?"])
def test_archive_keeps_files_whose_path_looks_like_a_pattern(
    tmp_path: Path, directory: str
) -> None:
    # torch-model-archiver splits its extra files on "," and globs them: `[1]` matched nothing
    # (a warning only) and the files were left out.
    members = archive_from(tmp_path / directory, tmp_path / f"{directory}-store" / "m.mar")
    assert members == {
        "model.pt",
        "handler.py",
        "signature.json",
        "index_to_name.json",
        "MAR-INF/MANIFEST.json",
    }


def test_archive_missing_a_file_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    @contextmanager
    def nothing_staged(extra_files: object) -> Iterator[Path]:
        with tempfile.TemporaryDirectory() as empty:
            yield Path(empty)

    monkeypatch.setattr(archive, "_staged", nothing_staged)
    with pytest.raises(
        ArchiveError, match=re.escape("left out index_to_name.json, signature.json")
    ):
        archive_from(tmp_path / "files", tmp_path / "store" / "m.mar")
    assert not (tmp_path / "store" / "m.mar").exists()


def test_an_extra_file_named_as_the_handler_is_refused(tmp_path: Path) -> None:
    # The archive is flat: the extra file would be copied over the handler, silently.
    (tmp_path / "extra").mkdir()
    for name in ("model.pt", "handler.py", "extra/handler.py"):
        (tmp_path / name).write_text("{}")
    with pytest.raises(ArchiveError, match=re.escape("share a file name: handler.py")):
        make_archive(
            model_name="m",
            version="1.0",
            serialized_file=tmp_path / "model.pt",
            handler=tmp_path / "handler.py",
            extra_files=[tmp_path / "extra" / "handler.py"],
            destination=tmp_path / "store" / "m.mar",
        )


def test_file_errors_exit_one_on_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("")
    argv = ["digits", "--out", str(tmp_path / "store"), "--build-dir", str(tmp_path / "file/b")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("torchgate export: error: ") and "Not a directory" in err
    assert err.count("\n") == 1


def test_exporter_errors_exit_one_on_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_build(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Unsupported: ONNX export of operator foo\nat line 3")

    monkeypatch.setattr(cli, "build", failing_build)
    assert cli.main(["digits", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == "torchgate export: error: Unsupported: ONNX export of operator foo at line 3\n"


def test_invalid_onnx_file_is_an_export_failure(tmp_path: Path) -> None:
    # onnx's checker raises its own ValidationError, not a RuntimeError the CLI reports.
    (tmp_path / "m.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(RuntimeError, match="not a valid ONNX model"):
        _verify_onnx(tmp_path / "m.onnx", ["x"], ["y"])
