"""The state torchgate keeps across restarts, like TorchServe's `model_snapshot`.

Registered models and versions (archive url), worker counts, batch settings, default versions
and traffic policies are written to one JSON file after every change, and read back at start in
place of config.properties' `load_models`/`models=` (and `torchgate.traffic`). Delete the file,
or start with `torchgate serve --ncs`, to start from config.properties again.

The file (`torchgate.snapshot_file`, default `logs/config/torchgate/torchgate-snapshot.json`
under the config file's folder; a folder of its own, as TorchServe reads every file in
logs/config as one of its snapshots) holds TorchServe's `models={...}` shape, so a version entry
reads like a config.properties one::

    {
      "name": "torchgate-snapshot", "formatVersion": 1, "created": "2025-...+00:00",
      "modelCount": 1,
      "models": {"digits": {"1.0": {"defaultVersion": true, "marName": "digits.mar",
                                    "minWorkers": 1, "maxWorkers": 1, "batchSize": 8,
                                    "maxBatchDelay": 5.0, "responseTimeout": 120.0,
                                    "jobQueueSize": 100}}},
      "traffic": {"digits": {"weights": {"1.0": 90, "2.0": 10},
                             "sticky_header": "X-User-Id", "shadow": null}}
    }

Writes are atomic: a temp file in the same directory is written, flushed and fsynced, renamed
over the snapshot, and the directory is fsynced. A crash at any point leaves either the previous
snapshot or the new one, never a torn file; leftover temp files are ignored (and removed at
start). Writes happen on management changes only, never on the inference path: the file is a
few kilobytes, so it is written synchronously on the event loop, and a change is on disk before
the management API answers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from api.config import Config
from api.core.registry import ModelVersion, Registry
from api.core.routing import TrafficPolicy, TrafficRouter
from api.core.workflow import WORKFLOW_KEY
from api.errors import TorchgateError
from api.model_loader import ModelLoader, load_by_model

log = logging.getLogger(__name__)

NAME = "torchgate-snapshot"
FORMAT_VERSION = 1
# Its default place: a folder of its own under TorchServe's snapshot folder (logs/config).
SNAPSHOT_FILE = f"{NAME}.json"
SNAPSHOT_FOLDER = "torchgate"


class SnapshotError(ValueError):
    """The snapshot file exists but cannot be read as a torchgate snapshot."""


# -- the file -----------------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old content or the new, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_directory(path.parent)  # make the rename itself durable


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - platforms that cannot open a directory
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_snapshot(path: Path) -> dict[str, Any] | None:
    """The snapshot at `path`, None when there is none; SnapshotError when it is unreadable."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SnapshotError(f"cannot read snapshot {path}: {exc}") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SnapshotError(f"snapshot {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("name") != NAME:
        raise SnapshotError(f"{path} is not a torchgate snapshot")
    if data.get("formatVersion") != FORMAT_VERSION:
        raise SnapshotError(
            f"snapshot {path} has format version {data.get('formatVersion')!r}; this torchgate "
            f"reads version {FORMAT_VERSION}"
        )
    models, traffic = data.get("models"), data.get("traffic", {})
    if not isinstance(models, dict) or not isinstance(traffic, dict):
        raise SnapshotError(f"snapshot {path}: models and traffic must be JSON objects")
    for name, versions in models.items():
        if not isinstance(versions, dict) or not all(
            isinstance(v, dict) for v in versions.values()
        ):
            raise SnapshotError(f"snapshot {path}: models.{name} must be an object of versions")
    return data


def remove_stale_temp_files(path: Path) -> None:
    """Delete temp files a crash mid-write left beside the snapshot; they are never read."""
    if not path.parent.is_dir():
        return
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()
            log.info("removed %s, left by an interrupted snapshot write", stale)


# -- state <-> JSON -----------------------------------------------------------------------------


def capture(registry: Registry, router: TrafficRouter) -> dict[str, Any]:
    """The snapshot of the current state (see the module docstring for the shape)."""
    models: dict[str, dict[str, Any]] = {}
    for name in registry.names():
        default = registry.default_version(name)
        entries = {
            v.version: _version_entry(v, default=v.version == default)
            for v in registry.versions(name)
            if WORKFLOW_KEY not in v.backend_info  # a workflow's node: not restored, as in TS
        }
        if entries:
            models[name] = entries
    return {
        "name": NAME,
        "formatVersion": FORMAT_VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "modelCount": len(models),
        "models": models,
        "traffic": {name: p.to_json() for name, p in sorted(router.policies().items())},
    }


def _version_entry(model_version: ModelVersion, *, default: bool) -> dict[str, Any]:
    settings = model_version.settings
    entry: dict[str, Any] = {
        "defaultVersion": default,
        "marName": model_version.url,
        "minWorkers": settings.min_workers,
        "maxWorkers": settings.max_workers,
        "batchSize": settings.batch_size,
        "maxBatchDelay": settings.max_batch_delay_ms,
        "responseTimeout": settings.response_timeout_s,
        "startupTimeout": settings.startup_timeout_s,
        "jobQueueSize": settings.job_queue_size,
    }
    # torchgate's own per-version settings from models={...} (e.g. a backend choice).
    entry.update({k: v for k, v in model_version.backend_info.items() if k.startswith("torchgate")})
    return entry


async def restore(data: Mapping[str, Any], loader: ModelLoader, router: TrafficRouter) -> list[str]:
    """Register the snapshot's versions and apply its policies; one error line per failure.

    A version that fails to load does not stop the others; a policy that sends it traffic is
    skipped, one that names it with none goes on without it.
    A handler that fails to start keeps its version registered, retried (see `Registry.register`).
    """
    items: list[tuple[str, str, tuple[str, str, dict[str, Any]]]] = []
    for name, versions in data["models"].items():
        # The default version first, so the model serves as soon as it is there.
        ordered = sorted(versions.items(), key=lambda item: not item[1].get("defaultVersion"))
        items += [
            (name, f"{name} {version} ({entry.get('marName')})", (name, version, entry))
            for version, entry in ordered
        ]

    async def load(item: tuple[str, str, dict[str, Any]]) -> None:
        name, version, entry = item
        await loader.register(
            str(entry["marName"]),
            loader.config.model_settings(entry),
            model_name=name,
            version=version,
            make_default=bool(entry.get("defaultVersion")),
            extra={k: v for k, v in entry.items() if k.startswith("torchgate")},
            keep_failed=True,
            origin="snapshot",
        )
        loader.startup_models.add(name)  # as TorchServe's model_snapshot: `/invocations`

    errors = await load_by_model(items, load)
    for line in errors:
        log.error("could not restore from snapshot: %s", line)
    return errors + apply_policies(router, data.get("traffic", {}))


def _sticky_blank_as_null(model: str, spec: Any) -> Any:
    """A configured `"sticky_header": ""` meant "not sticky" before the API refused it (400):
    a config written then still starts, read as null, with a warning to change it."""
    if isinstance(spec, dict) and spec.get("sticky_header") == "":
        log.warning(
            'traffic policy for %s: "sticky_header": "" is read as null (not sticky); '
            "write null, as the API now refuses an empty header name",
            model,
        )
        return {**spec, "sticky_header": None}
    return spec


def apply_policies(router: TrafficRouter, policies: Mapping[str, Any]) -> list[str]:
    """Set each model's policy (from a snapshot or `torchgate.traffic`); returns error lines.

    A policy stands while a version it names is not ready yet (`TrafficRouter.restore_policy`):
    it is served once that version is. Only one naming a version that failed to load, with
    traffic, is skipped.
    """
    errors = []
    for model, spec in policies.items():
        try:
            policy = TrafficPolicy.from_json(_sticky_blank_as_null(model, spec))
            applied = router.restore_policy(model, policy)
        except TorchgateError as exc:
            errors.append(f"traffic policy for {model}: {exc.message}")
            log.error("could not apply the traffic policy for %s: %s", model, exc.message)
            continue
        left_out = sorted(policy.versions_named() - applied.versions_named())
        if left_out:
            # Said, since the snapshot written next no longer names them.
            log.warning(
                "traffic policy for %s: left out version(s) %s, not loaded; they had no traffic",
                model,
                ", ".join(left_out),
            )
    return errors


def move_legacy_files(path: Path) -> None:
    """Earlier releases kept the snapshot, with its `.prev-*`, `.corrupt` and temporary files,
    in logs/config itself, where TorchServe reads every file as one of its own snapshots and,
    on a name without its timestamp, fails to start (FSSnapshotSerializer.getLastSnapshotFS).
    It skips folders there: the files move into torchgate's own (`path`'s folder). Where that
    already has a snapshot, the old one is kept beside it as `<name>.legacy`, not restored."""
    if path.name != SNAPSHOT_FILE or path.parent.name != SNAPSHOT_FOLDER:
        return
    legacy_folder = path.parent.parent
    legacy = [*legacy_folder.glob(f"{SNAPSHOT_FILE}*"), *legacy_folder.glob(f".{SNAPSHOT_FILE}.*")]
    for old in legacy:
        target = path.parent / old.name
        if target.exists():
            target = target.with_name(f"{old.name}.legacy")
        try:
            if old.name.startswith("."):
                old.unlink()  # a write that never finished
            else:
                old.replace(target)
        except OSError as exc:
            log.error("could not move %s into %s: %s", old, path.parent, exc)
    if legacy:
        log.warning(
            "moved torchgate's snapshot files from %s into %s (TorchServe cannot start beside "
            "them)",
            legacy_folder,
            path.parent,
        )


# -- wiring -------------------------------------------------------------------------------------


class Snapshotter:
    """Writes the snapshot whenever the registry or the traffic policies change."""

    def __init__(self, path: Path, registry: Registry, router: TrafficRouter) -> None:
        self.path = path
        self.registry = registry
        self.router = router
        self._paused = False
        registry.on_change.append(self.changed)
        router.on_change.append(self.changed)

    def changed(self) -> None:
        if not self._paused:
            self.write()

    def check_folder(self) -> None:
        """OSError unless the snapshot's folder (made if missing) takes a file: checked at
        start, so a read-only folder stops it rather than failing every later write."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        move_legacy_files(self.path)
        with tempfile.TemporaryFile(dir=self.path.parent):
            pass

    def write(self) -> None:
        """Write the current state now; an I/O error is logged, the change stands."""
        data = json.dumps(capture(self.registry, self.router), indent=2).encode()
        try:
            write_atomic(self.path, data)
        except OSError:
            log.exception("could not write snapshot %s", self.path)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold writes back (while loading at start), then write once.

        Restoring registers versions one by one; writing after each would leave a partial
        snapshot behind if the process died half-way, and the next start would lose the rest.
        """
        self._paused = True
        try:
            yield
        finally:
            self._paused = False
        self.write()

    def keep_previous(self, failures: int) -> None:
        """Keep the snapshot as it was beside the one about to be written without what failed
        to restore (a model store mounted late, a package index down): renamed back, it
        restores them once the cause is gone. TorchServe keeps its earlier snapshots too. One
        copy per such start: a second failing start must not replace the whole snapshot kept
        by the first with its own partial one."""
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        previous = self.path.with_name(f"{self.path.name}.prev-{stamp}")
        try:
            shutil.copy2(self.path, previous)
        except OSError as exc:
            log.error("could not keep the snapshot as it was in %s: %s", previous, exc)
            return
        log.warning(
            "%d item(s) of snapshot %s could not be restored; the snapshot as it was is kept "
            "as %s (rename it back once the cause is fixed)",
            failures,
            self.path,
            previous,
        )

    def load(self) -> dict[str, Any] | None:
        """The saved snapshot, or None to start from config.properties.

        An unreadable snapshot (torn by something other than torchgate, or edited by hand) is
        moved aside to `<file>.corrupt`, logged, and torchgate starts from config.properties.
        """
        remove_stale_temp_files(self.path)
        try:
            return read_snapshot(self.path)
        except SnapshotError as exc:
            aside = self.path.with_name(self.path.name + ".corrupt")
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            log.error("%s; moved it to %s and starting from config.properties", exc, aside)
            return None


async def load_startup_state(
    config: Config, loader: ModelLoader, router: TrafficRouter, snapshotter: Snapshotter | None
) -> list[str]:
    """Restore the snapshot if there is one (and `config.snapshot_restore`), else load what
    config.properties asks for."""
    if snapshotter is None:
        errors = await loader.load_startup_models()
        return errors + apply_policies(router, config.traffic)
    with snapshotter.paused():  # written once, when everything is loaded
        saved = snapshotter.load() if config.snapshot_restore else None
        if saved is not None:
            log.info("restoring models and traffic policies from snapshot %s", snapshotter.path)
            if config.load_models or config.models or config.traffic:
                # Said out loud: an edited config.properties or --models is not what serves.
                log.warning(
                    "snapshot %s restored: load_models, models= and torchgate.traffic (and "
                    "--models) are not used while it exists; delete it or start with --ncs "
                    "to load them",
                    snapshotter.path,
                )
            errors = await restore(saved, loader, router)
            if errors:
                snapshotter.keep_previous(len(errors))
            return errors
        errors = await loader.load_startup_models()
        return errors + apply_policies(router, config.traffic)
