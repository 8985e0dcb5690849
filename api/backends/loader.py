"""Import and initialize an archive's handler as a TorchServe worker does, in this process.

TorchServe runs each worker in its own Python process with the model directory on the path:
`import handler` finds the archive's handler.py and a sibling import (`import utils`) finds the
archive's utils.py. torchgate hosts every archive in one interpreter with one `sys.modules`, so
two archives shipping a `utils.py` (two versions of one model always do) would otherwise share
whichever was imported first. `archive_imports` recreates the per-process view while a worker
imports and initializes its handler, under one lock:

1. modules already in `sys.modules` under the archive's top-level names (its `*.py` files and
   package directories) are set aside, so the archive's own files are imported instead;
2. the model directory goes first on `sys.path`;
3. afterwards every module imported under those names — the archive's — is taken back out of
   `sys.modules` and kept by the worker (the handler holds its references), what was set aside
   is restored, and so is `sys.path`.

Every worker imports its archive afresh, so module-level state (a `_service = MyHandler()`
global) belongs to one worker, as it belongs to one process in TorchServe.

Limitations, each shared with or milder than one-process-per-worker:

- An archive module first imported at request time (an `import utils` inside `handle`) is not
  found, as the archive's directory is no longer on the path; import it at module level or in
  `initialize`. The error says so.
- Code that later looks a handler module up in `sys.modules` (pickling instances of its
  classes, `typing.get_type_hints`) does not find it.
- Archive modules never shadow the standard library or the packages a TorchServe worker has
  imported before it loads a handler (`_NEVER_SHADOWED`); TorchServe resolves those the same way.
- The working directory stays put (TorchServe starts a worker in the model directory): open
  files through `context.system_properties["model_dir"]`.
- While a worker loads, imports made by other threads also see the archive's directory first.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from api.backends.archive import Archive
from api.errors import TorchgateError

log = logging.getLogger(__name__)

Handle = Callable[[Any, Any], Any]
Initialize = Callable[[Any], Any]

# Modules a TorchServe worker has imported before it imports a handler: there, an archive's
# torch.py or json.py never wins either. Swapping these out of sys.modules, even briefly, could
# break the rest of the process.
_NEVER_SHADOWED = frozenset(sys.stdlib_module_names) | {"ts", "torch", "numpy", "yaml"}
_EXTENSION_SUFFIXES = (".so", ".pyd")

# Held while sys.modules and sys.path are rearranged for one archive: worker loads of different
# archives take turns. Reentrant so a handler's initialize may load another handler.
_IMPORT_LOCK = threading.RLock()


class HandlerLoadError(TorchgateError):
    """The archive's handler could not be imported or initialized."""


@dataclass(eq=False)
class EntryPoint:
    """A worker's loaded handler: `handle(data, context)` and the modules it came from."""

    handle: Handle
    description: str
    modules: dict[str, ModuleType] = field(default_factory=dict)


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


def _top(module_name: str) -> str:
    return module_name.partition(".")[0]


@contextmanager
def archive_imports(
    model_dir: Path, names: frozenset[str], modules: dict[str, ModuleType]
) -> Iterator[None]:
    """While inside, `import X` for X in `names` finds the archive's X.

    On exit the archive's modules leave `sys.modules` for `modules`, which keeps them alive.
    """
    own = names - _NEVER_SHADOWED
    entry = str(model_dir)
    with _IMPORT_LOCK:
        # Copies first: other threads may import (and grow sys.modules) meanwhile.
        saved = {key: mod for key, mod in sys.modules.copy().items() if _top(key) in own}
        for key in saved:
            del sys.modules[key]
        sys.path.insert(0, entry)
        importlib.invalidate_caches()
        try:
            yield
        finally:
            if entry in sys.path:
                sys.path.remove(entry)
            for key in [key for key in sys.modules.copy() if _top(key) in own]:
                modules[key] = sys.modules.pop(key)
            sys.modules.update(saved)


def load_handler(archive: Archive, context: Any, names: frozenset[str]) -> EntryPoint:
    """Import the archive's handler and initialize it with `context`. Blocking.

    Resolves the entry point as TorchServe's `TsModelLoader.load` does: the function named after
    the colon, else a module-level `handle`, else the module's single class, instantiated and its
    `initialize(context)` called. A function entry point is initialized, as in TorchServe, by
    calling `handle(None, context)` — unless the module defines `initialize(context)`, which is
    then called instead (a torchgate extension). Raises `HandlerLoadError`.
    """
    ref = archive.handler
    shadowed = sorted(names & _NEVER_SHADOWED)
    if shadowed:
        log.warning(
            "%s: archive modules %s are shadowed by installed modules of the same name "
            "(as in TorchServe)",
            archive.path,
            shadowed,
        )
    modules: dict[str, ModuleType] = {}
    what = f"Model {archive.name} version {archive.version}: handler {ref.spec!r}"
    with archive_imports(archive.model_dir, names, modules):
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
            raise HandlerLoadError(
                f"{what} failed to initialize: {type(exc).__name__}: {exc}"
            ) from exc
    return EntryPoint(handle, description, modules)


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


def missing_archive_module(exc: BaseException, names: frozenset[str]) -> str | None:
    """The archive module a request-time import failed to find, if that is what `exc` is."""
    if isinstance(exc, ModuleNotFoundError) and exc.name and _top(exc.name) in names:
        return exc.name
    return None
