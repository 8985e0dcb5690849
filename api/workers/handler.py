"""Import and initialize an archive's handler, in its worker process, as TorchServe's worker does.

Each worker is its own process hosting one archive (see `api.workers`), so the archive gets the
view a TorchServe worker gives it: the model directory is the working directory and the first
entry of `sys.path`, so `import handler`, a sibling `import utils` (at module level or at
request time) and `open("config.json")` all find the archive's files. Two archives shipping a
`utils.py` never meet: they live in different processes. As in TorchServe, a module the worker
had imported before the handler (torch, numpy, ts, the standard library) is not replaced by an
archive file of the same name; that is logged. So are torchgate's own top-level packages (`api`,
`export`, `handlers`): a worker runs torchgate's `api`, so an archive's `api` module is never
imported (TorchServe's worker has no such package).

The worker's PYTHONPATH ends with the model directory (and the model's package directory), as
TorchServe's frontend sets it for its workers: a `python` the handler starts, from any working
directory, imports the archive's modules too.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import site
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from api.backends.archive import Archive
from api.errors import HandlerLoadError

log = logging.getLogger(__name__)

Handle = Callable[[Any, Any], Any]
Initialize = Callable[[Any], Any]

_EXTENSION_SUFFIXES = (".so", ".pyd")
# torchgate's own top-level packages: a worker that imported one of them (every worker runs
# `api`) shadows an archive module of that name.
TORCHGATE_PACKAGES = frozenset({"api", "export", "handlers"})


@dataclass(eq=False)
class EntryPoint:
    """A worker's loaded handler: `handle(data, context)` and what it is, for the log."""

    handle: Handle
    description: str


def archive_module_names(model_dir: Path) -> frozenset[str]:
    """Top-level module names the archive provides: its `*.py` files and package directories."""
    names: set[str] = set()
    for entry in model_dir.iterdir():
        if entry.is_file():
            if entry.suffix == ".py":
                names.add(entry.stem)
            elif entry.suffix in _EXTENSION_SUFFIXES:
                names.add(entry.name.split(".", 1)[0])
        elif entry.is_dir() and any(entry.glob("*.py")):
            names.add(entry.name)
    return frozenset(name for name in names if name.isidentifier())


def enter_model_dir(model_dir: Path, packages: Sequence[str] = ()) -> None:
    """Make this process see the archive as a TorchServe worker does (see the module docstring).

    `packages`: the model's own package directories (its installed requirements), searched
    right after the model directory; their .pth files are processed as in site-packages.
    PYTHONPATH, which the processes the handler starts inherit, gets the same directories at
    its end: TorchServe's frontend sets `[handler dir:]$PYTHONPATH:model dir:...` for its
    workers.
    """
    os.chdir(model_dir)
    inherited = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [*inherited, str(model_dir), *packages])
    )
    before = list(sys.path)
    for directory in packages:
        site.addsitedir(directory)
    added = [entry for entry in sys.path if entry not in before]
    sys.path[:] = [str(model_dir), *added, *before]
    importlib.invalidate_caches()


def load_handler(archive: Archive, context: Any) -> EntryPoint:
    """Import the archive's handler and initialize it with `context`. Blocking.

    Resolves the entry point as TorchServe's `TsModelLoader.load` does: the function named after
    the colon, else a module-level `handle`, else the module's single class, instantiated and its
    `initialize(context)` called. A function entry point is initialized, as in TorchServe, by
    calling `handle(None, context)` — unless the module defines `initialize(context)`, which is
    then called instead (a torchgate extension). Raises `HandlerLoadError`.
    """
    ref = archive.handler
    provided = archive_module_names(archive.model_dir)
    shadowed = sorted(name for name in provided if name in sys.modules)
    own = [name for name in shadowed if name in TORCHGATE_PACKAGES]
    if own:
        log.warning(
            "%s: archive modules %s are shadowed by torchgate's own top-level packages of "
            "those names (api, export, handlers; TorchServe has none): rename them",
            archive.path,
            own,
        )
    others = [name for name in shadowed if name not in TORCHGATE_PACKAGES]
    if others:
        log.warning(
            "%s: archive modules %s are shadowed by modules the worker had already imported "
            "(as in TorchServe)",
            archive.path,
            others,
        )
    what = f"Model {archive.name} version {archive.version}: handler {ref.spec!r}"
    try:
        module = importlib.import_module(ref.module)
    except Exception as exc:
        raise HandlerLoadError(f"{what} failed to import: {type(exc).__name__}: {exc}") from exc
    if ref.file is not None and Path(module.__file__ or "").resolve() != ref.file.resolve():
        raise HandlerLoadError(
            f"{what}: module {ref.module!r} resolves to {module.__file__}, not the archive's "
            f"file; rename the handler file"
        )
    handle, initialize, description = _entry_point(module, ref.function, what)
    try:
        initialize(context)
    except Exception as exc:
        raise HandlerLoadError(f"{what} failed to initialize: {type(exc).__name__}: {exc}") from exc
    return EntryPoint(handle, description)


def _entry_point(
    module: ModuleType, function: str | None, what: str
) -> tuple[Handle, Initialize, str]:
    name = function or "handle"
    entry = getattr(module, name, None)
    if entry is not None:
        if not callable(entry):
            raise HandlerLoadError(f"{what}: {module.__name__}.{name} is not callable")
        initialize = getattr(module, "initialize", None)
        if callable(initialize) and initialize is not entry:
            return entry, initialize, f"{module.__name__}:{name}"
        return entry, lambda context: entry(None, context), f"{module.__name__}:{name}"
    if function is not None:
        raise HandlerLoadError(f"{what}: module {module.__name__} has no function {function!r}")
    classes = [
        member
        for _, member in inspect.getmembers(module, inspect.isclass)
        if member.__module__ == module.__name__
    ]
    if len(classes) != 1:
        raise HandlerLoadError(
            f"{what}: expected a module-level handle(data, context) function or exactly one "
            f"class in {module.__name__}, found {[cls.__name__ for cls in classes]}"
        )
    try:
        service: Any = classes[0]()
    except Exception as exc:
        raise HandlerLoadError(
            f"{what}: {classes[0].__name__}() failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(getattr(service, "handle", None)):
        raise HandlerLoadError(f"{what}: class {classes[0].__name__} has no handle method")
    initialize = getattr(service, "initialize", None)
    return (
        service.handle,
        initialize if callable(initialize) else _no_initialize,
        f"{module.__name__}.{classes[0].__name__}",
    )


def _no_initialize(context: Any) -> None:
    pass
