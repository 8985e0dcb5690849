"""Open a TorchServe model archive: validate it, extract it safely, read what it declares.

Accepted, as TorchServe accepts them in its model store: a `.mar` (a zip, the default of
`torch-model-archiver`), a `.tar.gz` (`--archive-format tgz`, files under one top directory),
or an already-extracted directory (`--archive-format no-archive`). Everything a worker will rely
on is checked here, before any handler code runs, and every failure is an `ArchiveError` whose
message names the archive:

- unsafe members (paths escaping the directory, links, zip bombs) -> see `extract.py`;
- `MAR-INF/MANIFEST.json` missing, not JSON, or without `model.modelName` / `model.handler`;
- a file the manifest names (serializedFile, modelFile, configFile) absent from the archive;
- a handler that is neither a file in the archive, an installed module, nor one of TorchServe's
  built-in handlers (`base_handler`, `image_classifier`, ...).

TorchServe's built-in handler names (`image_classifier`, `image_segmenter`, `object_detector`,
`text_classifier`, `base_handler`, bare or as `ts.torch_handler.<name>`) resolve to torchgate's
own implementations in `handlers.builtin`, with TorchServe's contract: TorchServe's modules
import torchvision and captum. Its other handler modules (`densenet_handler`, ...) still resolve
to `ts.torch_handler.<name>`.

Archives are extracted into a fresh directory under `work_dir` named after the model and its
version (`NAME-VERSION-xxxx`), so two versions of a model, or the same archive loaded twice,
never share files. `Archive.remove()` deletes it.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from importlib.machinery import ModuleSpec, PathFinder, all_suffixes
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

import yaml

from api.backends.extract import ArchiveLimits, ExtractError, open_reader
from api.core.names import MODEL_NAME
from api.errors import BadRequest

if TYPE_CHECKING:
    from _typeshed.importlib import MetaPathFinderProtocol

MANIFEST = PurePosixPath("MAR-INF", "MANIFEST.json")
SIGNATURE = "signature.json"
MAX_METADATA_BYTES = 1024 * 1024  # manifest, signature.json, model-config.yaml
PYTHON_RUNTIMES = frozenset({"python", "python3"})
DEFAULT_VERSION = "1.0"  # TorchServe's, for manifests without modelVersion
_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_.-]")

HandlerSource = Literal["archive", "installed", "builtin"]
TS_HANDLERS = "ts.torch_handler"
# TorchServe's built-in handlers that torchgate implements itself (see the module docstring).
BUILTIN_HANDLERS = frozenset(
    {"base_handler", "image_classifier", "image_segmenter", "object_detector", "text_classifier"}
)
BUILTIN_PACKAGE = "handlers.builtin"
# libyaml's loader where PyYAML has it: the pure-Python one takes seconds of CPU per 100 KB.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MODULE_SUFFIXES = all_suffixes()  # .py, .pyc, and extension modules' (.so)


class ArchiveError(BadRequest):
    """A model archive that cannot be served as it is; the message names the archive."""

    type_name = "InvalidModelException"


class _Invalid(Exception):
    """Raised inside this module; `open_archive` turns it into ArchiveError naming the archive."""


@dataclass(frozen=True, slots=True)
class HandlerRef:
    """Where the manifest's `handler` points, resolved the way TorchServe's model loader does.

    `module` is the name to import (`handlers.builtin.<name>` or `ts.torch_handler.<name>` for a
    built-in handler, see the module docstring), `file`
    the module's file when it ships in the archive, `function` the entry point after a colon
    (`handler.py:my_handle`), or None for TorchServe's default (`handle`, or the module's single
    class).
    """

    spec: str
    module: str
    function: str | None
    source: HandlerSource
    file: Path | None = None


@dataclass(slots=True)
class Archive:
    path: Path  # what was opened: the .mar/.tar.gz file or the directory
    model_dir: Path  # the extracted files; TorchServe's system_properties["model_dir"]
    manifest: dict[str, Any]
    name: str
    version: str
    handler: HandlerRef
    serialized_file: Path | None
    signature: dict[str, Any] | None
    # model-config.yaml (manifest model.configFile): TorchServe handlers read it from
    # context.model_yaml_config, and it may carry frontend settings (minWorkers, batchSize...).
    model_config: dict[str, Any] = field(default_factory=dict)
    # The directory torchgate created for the extraction; None for a directory it was given.
    extracted_to: Path | None = None

    def remove(self) -> None:
        """Delete the extracted files (never a directory the user handed in)."""
        if self.extracted_to is not None:
            shutil.rmtree(self.extracted_to, ignore_errors=True)
            self.extracted_to = None


def open_archive(
    path: Path,
    *,
    work_dir: Path | None = None,
    limits: ArchiveLimits | None = None,
    name: str | None = None,
    handler: str | None = None,
) -> Archive:
    """Validate and (for a file) extract the archive at `path`. Blocking: run it in a thread.

    `name` and `handler` override the manifest's modelName and handler, as the `model_name` and
    `handler` parameters of TorchServe's register API do.
    """
    path = Path(path)
    try:
        if path.is_dir():
            return _describe(path, path.resolve(), _read_dir_manifest(path), name, handler, None)
        if not path.is_file():
            raise _Invalid("does not exist")
        return _extract(path, work_dir, limits or ArchiveLimits(), name, handler)
    except (_Invalid, ExtractError) as exc:
        raise ArchiveError(f"Model archive {path}: {exc}") from exc
    except OSError as exc:
        raise ArchiveError(f"Model archive {path} cannot be read: {exc}") from exc


def archive_identity(
    path: Path, *, name: str | None = None, limits: ArchiveLimits | None = None
) -> tuple[str, str]:
    """(model name, version) the archive at `path` registers as (`name` overriding the
    manifest's, as load_models' `name=`), read from its manifest alone, nothing extracted.
    Blocking: run it in a thread. ArchiveError as `open_archive` raises it."""
    path = Path(path)
    try:
        if path.is_dir():
            return _name_and_version(_read_dir_manifest(path), name, path)
        if not path.is_file():
            raise _Invalid("does not exist")
        with open_reader(path, limits or ArchiveLimits()) as reader:
            raw = reader.read(_find_manifest(reader.members), MAX_METADATA_BYTES)
        return _name_and_version(_parse_manifest(raw), name, path)
    except (_Invalid, ExtractError) as exc:
        raise ArchiveError(f"Model archive {path}: {exc}") from exc
    except OSError as exc:
        raise ArchiveError(f"Model archive {path} cannot be read: {exc}") from exc


def default_work_dir() -> Path:
    return Path(tempfile.gettempdir()) / "torchgate-models"


def _extract(
    path: Path,
    work_dir: Path | None,
    limits: ArchiveLimits,
    name: str | None,
    handler: str | None,
) -> Archive:
    with open_reader(path, limits) as reader:
        manifest_path = _find_manifest(reader.members)
        manifest = _parse_manifest(reader.read(manifest_path, MAX_METADATA_BYTES))
        model_name, version = _name_and_version(manifest, name, path)
        work = work_dir or default_work_dir()
        work.mkdir(parents=True, exist_ok=True)
        prefix = f"{safe_name(model_name)}-{safe_name(version)}-"
        target = Path(tempfile.mkdtemp(prefix=prefix, dir=work))
        try:
            reader.extract_all(target)
            model_dir = target.joinpath(*manifest_path.parts[:-2]).resolve()
            return _describe(path, model_dir, manifest, name, handler, target)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise


def safe_name(text: str) -> str:
    """`text` fit for a file name: characters outside [A-Za-z0-9_.-] become "_"."""
    return _UNSAFE_CHARS.sub("_", text)


def _find_manifest(members: dict[PurePosixPath, Any]) -> PurePosixPath:
    if MANIFEST in members:
        return MANIFEST
    # tgz archives keep their files under one top directory, `NAME/MAR-INF/MANIFEST.json`.
    tops = {member.parts[0] for member in members}
    if len(tops) == 1:
        nested = PurePosixPath(tops.pop(), *MANIFEST.parts)
        if nested in members:
            return nested
    raise _Invalid(f"missing {MANIFEST}: not a TorchServe model archive")


def _read_dir_manifest(directory: Path) -> dict[str, Any]:
    manifest = directory.joinpath(*MANIFEST.parts)
    if not manifest.is_file():
        raise _Invalid(f"missing {MANIFEST}: not a TorchServe model directory")
    return _parse_manifest(_read_metadata(manifest, str(MANIFEST)))


def _read_metadata(file: Path, what: str) -> bytes:
    """The bytes of a metadata file, refused past MAX_METADATA_BYTES before they are parsed."""
    if file.stat().st_size > MAX_METADATA_BYTES:
        raise _Invalid(f"{what} is larger than {MAX_METADATA_BYTES} bytes")
    return file.read_bytes()


def _parse_manifest(raw: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise _Invalid(f"{MANIFEST} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("model"), dict):
        raise _Invalid(f'{MANIFEST} has no "model" object')
    runtime = manifest.get("runtime", "python")
    if runtime not in PYTHON_RUNTIMES:
        raise _Invalid(f"runtime {runtime!r} is not supported (only python)")
    return manifest


def _name_and_version(
    manifest: dict[str, Any], override: str | None, path: Path
) -> tuple[str, str]:
    model = manifest["model"]
    name = override or model.get("modelName") or _default_name(path)
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise _Invalid(
            f"invalid or missing model name {name!r} (letters, digits, '_', '-', '.'; "
            f"starting with a letter or digit)"
        )
    version = model.get("modelVersion") or DEFAULT_VERSION
    if not isinstance(version, str | int | float):
        raise _Invalid(f"invalid modelVersion {version!r}")
    return name, str(version)


def _default_name(path: Path) -> str:
    """A manifest without modelName: the archive's file or folder name without its extension,
    each character other than a letter, digit or '_' made '_', as TorchServe names it."""
    base = path.name
    for suffix in (".tar.gz", ".mar", ".model", ".tgz", ".zip"):
        if base.endswith(suffix) and base != suffix:
            base = base[: -len(suffix)]
            break
    return re.sub(r"\W", "_", base, flags=re.ASCII)


def _describe(
    path: Path,
    model_dir: Path,
    manifest: dict[str, Any],
    name_override: str | None,
    handler_override: str | None,
    extracted_to: Path | None,
) -> Archive:
    """Check what the manifest names against the files in `model_dir`."""
    name, version = _name_and_version(manifest, name_override, path)
    model = manifest["model"]
    serialized = _named_file(model_dir, model, "serializedFile")
    _named_file(model_dir, model, "modelFile")
    config_file = _named_file(model_dir, model, "configFile")
    # requirementsFile: installed (or not) by api.backends.requirements, per the server's config.
    spec = handler_override or model.get("handler")
    if not isinstance(spec, str) or not spec.strip():
        raise _Invalid(f'{MANIFEST} names no handler ("model.handler")')
    return Archive(
        path=path,
        model_dir=model_dir,
        manifest=manifest,
        name=name,
        version=version,
        handler=_resolve_handler(spec.strip(), model_dir),
        serialized_file=serialized,
        signature=_read_signature(model_dir),
        model_config=_read_yaml(config_file) if config_file else {},
        extracted_to=extracted_to,
    )


def _named_file(model_dir: Path, model: dict[str, Any], key: str) -> Path | None:
    value = model.get(key)
    if not value:
        return None
    if not isinstance(value, str):
        raise _Invalid(f"manifest {key} must be a file name, got {value!r}")
    file = (model_dir / value).resolve()
    if not file.is_relative_to(model_dir):
        raise _Invalid(f"manifest {key} {value!r} points outside the archive")
    if not file.is_file():
        raise _Invalid(f"manifest names {key} {value!r}, which is not in the archive")
    return file


def _read_signature(model_dir: Path) -> dict[str, Any] | None:
    file = model_dir / SIGNATURE
    if not file.is_file():
        return None
    try:
        signature = json.loads(_read_metadata(file, SIGNATURE))
    except ValueError as exc:
        raise _Invalid(f"{SIGNATURE} is not valid JSON: {exc}") from exc
    if not isinstance(signature, dict):
        raise _Invalid(f"{SIGNATURE} must hold a JSON object")
    return signature


def _read_yaml(file: Path) -> dict[str, Any]:
    raw = _read_metadata(file, file.name)
    try:
        config = yaml.load(raw.decode("utf-8"), Loader=_YAML_LOADER)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise _Invalid(f"{file.name} is not valid YAML: {exc}") from exc
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise _Invalid(f"{file.name} must hold a YAML mapping")
    return config


def _resolve_handler(spec: str, model_dir: Path) -> HandlerRef:
    """Resolve a manifest `handler` in TorchServe's order: archive, installed module, built-in.

    As in TorchServe, `path/to/handler.py:fn` means module `handler`, entry point `fn`. A
    built-in name means torchgate's implementation, also when spelled `ts.torch_handler.<name>`.
    """
    module_part, _, function = spec.partition(":")
    module = module_part.rsplit("/", 1)[-1]
    is_file = module.endswith(".py")
    module = module.removesuffix(".py")
    if not _MODULE_NAME.fullmatch(module) or (function and not function.isidentifier()):
        raise _Invalid(f"handler {spec!r} is not a module name or file name")
    entry = function or None
    file = _archive_module_file(model_dir, module)
    if file is not None:
        return HandlerRef(spec, module, entry, "archive", file)
    if is_file:
        raise _Invalid(f"handler file {module_part!r} is not in the archive")
    name = module.removeprefix(f"{TS_HANDLERS}.")
    if name != module and name in BUILTIN_HANDLERS:
        return HandlerRef(spec, f"{BUILTIN_PACKAGE}.{name}", entry, "builtin")
    if _importable(module):
        return HandlerRef(spec, module, entry, "installed")
    if module in BUILTIN_HANDLERS:
        return HandlerRef(spec, f"{BUILTIN_PACKAGE}.{module}", entry, "builtin")
    builtin = f"{TS_HANDLERS}.{module}"
    if "." not in module and _importable(builtin):
        return HandlerRef(spec, builtin, entry, "builtin")
    raise _Invalid(
        f"handler {spec!r} is neither a file in the archive, an installed module, nor one of "
        f"TorchServe's built-in handlers (base_handler, image_classifier, text_classifier, "
        f"object_detector, image_segmenter)"
    )


def _archive_module_file(model_dir: Path, module: str) -> Path | None:
    base = model_dir.joinpath(*module.split("."))
    for candidate in (base.with_name(base.name + ".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _importable(module: str) -> bool:
    """Whether `module` is installed, found on disk without importing it or its packages.

    The name comes from the archive or the client, and importing a package runs its
    `__init__` in the frontend (importlib.util.find_spec imports every parent): `torch.x` would
    load torch, `test.autotest.x` run CPython's test suite.
    """
    top, *submodules = module.split(".")
    spec = _find_top_level(top)
    if spec is None:
        return False
    search = list(spec.submodule_search_locations or ())
    for submodule in submodules:
        found = _find_submodule(submodule, search)
        if found is None:
            return False
        search = found
    return True


def _find_submodule(name: str, locations: list[str]) -> list[str] | None:
    """Where submodule `name` of a package searching `locations` is, by importlib's rules
    (FileFinder, PathFinder) read off the disk: the directories to search for its own
    submodules ([] for a module), or None if it is not there.

    Not PathFinder.find_spec(name, locations): it raises KeyError for a namespace package
    whose parent is not imported.
    """
    portions: list[str] = []
    for location in map(Path, locations):
        package = location / name
        if any((package / f"__init__{suffix}").is_file() for suffix in _MODULE_SUFFIXES):
            return [str(package)]
        if any((location / f"{name}{suffix}").is_file() for suffix in _MODULE_SUFFIXES):
            return []
        if package.is_dir():  # a namespace package's portion, unless a regular one comes later
            portions.append(str(package))
    return portions or None


def _find_top_level(name: str) -> ModuleSpec | None:
    """The spec of a top-level module, from sys.path, else from the other finders on
    sys.meta_path (setuptools' editable installs), which locate it without running it."""
    others = [finder for finder in sys.meta_path if finder is not PathFinder]
    finders: list[MetaPathFinderProtocol] = [PathFinder, *others]
    for finder in finders:
        try:
            spec = finder.find_spec(name, None)
        except (ImportError, ValueError):  # how a finder may turn down a name
            continue
        if spec is not None:
            return spec
    return None
