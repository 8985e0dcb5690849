"""One export: recipe -> TorchScript + ONNX -> parity -> signature.json -> .mar in the store.

Both formats are always serialized and checked against eager PyTorch, whichever one the archive
carries, so a model that does not survive one of the two exporters is noticed at once.
Intermediate files go to ``build/export/NAME-VERSION/``; only the .mar lands in the store.

Without ``force`` an archive is kept when it is newer than the export and handler sources and
holds what the spec asks for (model, version, format, seed, torch release), so `--if-stale` never
serves an archive built with other settings under the asked-for file name.
"""

from __future__ import annotations

import fcntl
import shutil
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import handlers
from export import parity
from export.archive import MANIFEST_MEMBER, make_archive, read_json_members
from export.recipes import RECIPES, ExportError
from export.serialize import export_onnx, export_torchscript
from export.signature import Signature

FORMATS = ("torchscript", "onnx")
SUFFIXES = {"torchscript": ".pt", "onnx": ".onnx"}
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUILD_DIR = REPO_ROOT / "build" / "export"
HANDLERS_DIR = Path(handlers.__file__).resolve().parent
HANDLER_BASE = HANDLERS_DIR / "torchgate_base.py"  # shipped flat next to every handler
# minilm: ONNX Runtime embeds about 2x faster than TorchScript on CPU.
DEFAULT_FORMATS = {"digits": "torchscript", "minilm": "onnx"}


def archive_stem(name: str, version: str) -> str:
    """``digits`` for 1.0, ``digits_v2`` for 2.0, ``digits_v2.1`` for 2.1: one file name per
    version, so several versions of a model share a model store."""
    if version in ("1", "1.0"):
        return name
    return f"{name}_v{version.removesuffix('.0')}"


@dataclass(frozen=True)
class ExportSpec:
    name: str
    format: str
    version: str
    seed: int = 0
    archive: str | None = None  # file stem in the store; `archive_stem` by default

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise ExportError(f"unknown model {self.name!r}; known: {', '.join(RECIPES)}")
        if self.format not in FORMATS:
            raise ExportError(f"unknown format {self.format!r}; use one of {FORMATS}")

    @property
    def archive_file(self) -> str:
        return f"{self.archive or archive_stem(self.name, self.version)}.mar"


# `torchgate export --all`: version 1.0 and 2.0 of digits side by side, and minilm.
ALL: tuple[ExportSpec, ...] = (
    ExportSpec("digits", "torchscript", "1.0", seed=0),
    ExportSpec("digits", "onnx", "2.0", seed=1),
    ExportSpec("minilm", DEFAULT_FORMATS["minilm"], "1.0"),
)


@dataclass(frozen=True)
class BuildResult:
    spec: ExportSpec
    archive: Path
    parity: tuple[parity.ParityResult, ...] = ()
    skipped: bool = False


def _sources() -> list[Path]:
    return [*(REPO_ROOT / "export").rglob("*.py"), *HANDLERS_DIR.glob("*.py")]


def staleness(archive: Path, spec: ExportSpec) -> str | None:
    """Why `archive` must be rebuilt for `spec`, or None when it is up to date: it exists, is
    newer than every source file of export/ and handlers/, and records the settings of `spec`."""
    if not archive.exists():
        return "it does not exist"
    built = archive.stat().st_mtime
    newer = [source for source in _sources() if source.stat().st_mtime >= built]
    if newer:
        return f"{newer[0]} is newer"
    try:
        recorded = _recorded_settings(archive)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        return f"its manifest or signature.json cannot be read ({exc})"
    differences = [
        f"{key} {recorded.get(key)!r}, not {wanted!r}"
        for key, wanted in _settings(spec).items()
        if recorded.get(key) != wanted
    ]
    return "it was built with " + ", ".join(differences) if differences else None


def _settings(spec: ExportSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "version": spec.version,
        "format": spec.format,
        "seed": spec.seed,
        "torch": _release(torch.__version__),
    }


def _recorded_settings(archive: Path) -> dict[str, Any]:
    # Name and version from the manifest: that is what TorchServe and torchgate serve.
    manifest, signature = read_json_members(archive, MANIFEST_MEMBER, "signature.json")
    model = manifest["model"]
    exported = signature.get("export") or {}  # absent in archives from before it was recorded
    return {
        "name": model.get("modelName"),
        "version": model.get("modelVersion"),
        "format": signature.get("format"),
        "seed": exported.get("seed"),
        "torch": _release(str(exported.get("torch"))),
    }


def _release(torch_version: str) -> str:
    """The release of a torch version, "2.13.0" for "2.13.0+cpu": the local label (+cpu, +cu121)
    changes no exported file, and the images install torch without it, so it must not make
    archives built elsewhere stale."""
    return torch_version.split("+")[0]


@contextmanager
def _exclusive(build_dir: Path) -> Iterator[None]:
    """One build at a time per build directory, across processes: test sessions and
    `make` may build concurrently, and they share build/export/ and the model store."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build(
    spec: ExportSpec,
    out_dir: Path,
    build_dir: Path = DEFAULT_BUILD_DIR,
    force: bool = True,
) -> BuildResult:
    with _exclusive(build_dir):
        destination = out_dir / spec.archive_file
        # Checked under the lock: a concurrent build may just have written it.
        if not force:
            reason = staleness(destination, spec)
            if reason is None:
                print(f"{destination} is up to date")
                return BuildResult(spec, destination, skipped=True)
            print(f"rebuilding {destination}: {reason}")
        return _build(spec, destination, build_dir)


def _build(spec: ExportSpec, destination: Path, build_dir: Path) -> BuildResult:
    workdir = build_dir / f"{spec.name}-{spec.version}"
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)

    recipe = RECIPES[spec.name](spec.seed, workdir)
    files = {
        "torchscript": export_torchscript(
            recipe.module, recipe.example_inputs, workdir / f"{spec.name}.pt"
        ),
        "onnx": export_onnx(
            recipe.module,
            recipe.example_inputs,
            [output.name for output in recipe.model_outputs],
            recipe.dynamic_axes,
            workdir / f"{spec.name}.onnx",
        ),
    }
    results = parity.compare(
        parity.eager_runner(recipe.module),
        {
            "torchscript": parity.torchscript_runner(files["torchscript"]),
            "onnx": parity.onnx_runner(files["onnx"]),
        },
        recipe.parity_batches,
    )
    print(parity.report(results, spec.name))
    parity.check(results, recipe.tolerance, spec.name)

    serialized = files[spec.format]
    signature = Signature(
        name=spec.name,
        version=spec.version,
        format=spec.format,
        serialized_file=serialized.name,
        inputs=recipe.inputs,
        outputs=recipe.outputs,
        model_inputs=recipe.model_inputs,
        model_outputs=recipe.model_outputs,
        labels=recipe.labels,
        preprocessing=recipe.preprocessing,
        postprocessing=recipe.postprocessing,
        parity={"tolerance": recipe.tolerance, "max_abs_diff": parity.worst(results)},
        training=recipe.training,
        export={"seed": spec.seed, "torch": torch.__version__},
    ).write(workdir / "signature.json")
    # An exporter that spills weights to "<file>.data" needs that file next to the model.
    side_data = [p for p in [serialized.with_name(serialized.name + ".data")] if p.exists()]
    archive = make_archive(
        model_name=spec.name,
        version=spec.version,
        serialized_file=serialized,
        handler=HANDLERS_DIR / recipe.handler,
        extra_files=[signature, HANDLER_BASE, *recipe.extra_files, *side_data],
        destination=destination,
    )
    print(f"wrote {archive} (model {spec.name} {spec.version}, {spec.format})")
    return BuildResult(spec, archive, tuple(results))


def build_all(
    out_dir: Path,
    build_dir: Path = DEFAULT_BUILD_DIR,
    force: bool = True,
    specs: Sequence[ExportSpec] = ALL,
) -> list[BuildResult]:
    return [build(spec, out_dir, build_dir, force) for spec in specs]


def ensure_archives(model_store: Path, build_dir: Path = DEFAULT_BUILD_DIR) -> list[Path]:
    """Build `ALL` into `model_store` unless up to date; the archives' paths (test fixtures)."""
    return [result.archive for result in build_all(model_store, build_dir, force=False)]
