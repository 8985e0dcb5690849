"""Turns a model url (a .mar in model_store, or an allowed local path) into a registered version.

Shared by start-up (`load_models`, `models={...}`) and the management API's `POST /models`, so
both validate archives the same way: by default only archives inside the model store (see
`ModelLoader.resolve` and docs/security.md). Nothing is fetched over the network: TorchServe would
download an http(s) url, torchgate refuses it and asks for the archive in model_store.

A version served by a running TorchServe instead (`"torchgate.backend": {"kind": "torchserve",
...}` in models={...}, or a `torchserve://host:port/model/version` url) gets a proxy backend:
see `api.backends.torchserve`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import logging
import os
import re
import zipfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import unquote, urlsplit

from api.backends import BACKEND_KEY
from api.backends.archive import archive_identity
from api.backends.extract import ArchiveLimits
from api.config import Config, ModelEntry
from api.core.names import check_model_name
from api.core.registry import ModelVersion, Registry
from api.core.types import Backend, ModelSettings
from api.errors import BadRequest, ModelNotFound
from api.model_config import Origin, resolve_settings

log = logging.getLogger(__name__)
# Registration urls of versions a TorchServe serves behind torchgate (api.backends.torchserve).
TORCHSERVE_SCHEMES = ("torchserve://", "torchserve+http://", "torchserve+https://")
_Item = TypeVar("_Item")

# Builds a backend for an archive path: (path, settings, work_dir) -> Backend. Called with
# `name=` and `handler=` keywords too when a registration overrides the manifest's.
ArchiveBackendLoader = Callable[..., Awaitable[Backend]]


@runtime_checkable
class ArchiveBackend(Protocol):
    """A backend that hosts an archive itself (`api.backends.workers.WorkerBackend`): its
    model-config.yaml weighs in on its settings, and its requirements are installed before
    any worker starts."""

    model_config: Mapping[str, Any]

    async def prepare(
        self, settings: ModelSettings, *, install_requirements: bool, model: str
    ) -> None: ...


class ModelLoader:
    def __init__(
        self,
        config: Config,
        registry: Registry,
        work_dir: Path,
        load_local: ArchiveBackendLoader,
    ) -> None:
        self.config = config
        self.registry = registry
        self.work_dir = work_dir
        self._load_local = load_local
        # The names of the models registered at start (TorchServe's "startup models"):
        # `/invocations` without a model name goes to the model when there is one. One
        # unregistered leaves it, as in TorchServe: `/invocations` must not pick a model gone.
        self.startup_models: set[str] = set()
        registry.on_model_gone.append(self.startup_models.discard)

    def resolve(self, url: str) -> Path:
        """The local archive a url names; BadRequest/NotFound when it is not allowed or absent.

        A file name or relative path means a file in the model store. Anything else outside
        the store must match `allowed_urls` as a `file://` url of its real path (symlinks and
        `..` resolved), so `file:///models/../etc/x` cannot pass for `file:///models/.*`.
        Symlinks inside the store are followed: the operator put them there.
        """
        parts = urlsplit(url)
        if parts.scheme in ("http", "https", "s3"):
            raise BadRequest(
                f"torchgate does not download model archives ({url}); "
                f"copy the archive into the model store {self.config.model_store} and register "
                f"it by file name"
            )
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise BadRequest(f"Given URL {url} names another host")
            given = Path(unquote(parts.path))
        elif parts.scheme:
            raise BadRequest(f"Given URL {url}: unsupported scheme {parts.scheme!r}")
        else:
            given = Path(url)
        store = Path(os.path.abspath(self.config.model_store))
        real_store = store.resolve()
        candidate = given if given.is_absolute() else store / given
        try:
            path = candidate.resolve()
            exists = path.exists()
        except (OSError, ValueError, RuntimeError) as exc:
            # A NUL byte, a name too long, a symlink loop: nothing that could name an archive.
            raise BadRequest(f"Given URL {url!r} is not a usable path: {exc}") from exc
        named_in_store = ".." not in given.parts and any(
            Path(os.path.normpath(candidate)).is_relative_to(s) for s in (store, real_store)
        )
        inside = named_in_store or path.is_relative_to(real_store)
        if not inside and not self.config.allows_url(path.as_uri()):
            raise BadRequest(
                f"Given URL {url} is outside the model store and does not match any allowed "
                f"URL(s) (allowed_urls)"
            )
        if not exists:
            raise ModelNotFound(f"Model not found at: {url}")  # TorchServe's type and words
        return path

    async def register(
        self,
        url: str,
        settings: ModelSettings,
        *,
        model_name: str | None = None,
        version: str | None = None,
        make_default: bool = False,
        extra: dict[str, Any] | None = None,
        keep_failed: bool = False,
        requested: bool = False,
        origin: Origin = "config",
        api: Mapping[str, Any] | None = None,
        handler: str | None = None,
        wait: bool = True,
        described: Callable[[str, str], ModelEntry | None] | None = None,
    ) -> ModelVersion:
        """Register the archive at `url`; `keep_failed` and `wait` as in `Registry.register`.

        `described(name, version)`: the models={...} entry of the name and version the archive
        registers as, if any; its settings, defaultVersion and torchgate keys then apply (how
        TorchServe applies config.properties' models={...} at start).

        `requested`: a client asked through the management API, so a TorchServe target must
        be named by allowed_urls (config.properties and the snapshot are the operator's).
        `origin` and `api` (the register API's parameters, as TorchServe keys) decide how the
        archive's model-config.yaml weighs against `settings` (`api.model_config`).
        `handler` replaces the manifest's handler (the register API's `handler` parameter).
        """
        if model_name is not None:
            check_model_name(model_name)  # before unpacking anything; the registry checks again
        if _wants_torchserve(url, extra):
            if handler is not None:
                raise BadRequest("handler cannot be overridden for a version TorchServe serves")
            return await self._register_torchserve(
                url, settings, model_name, version, make_default, extra or {}, requested
            )
        path = self.resolve(url)
        # The registered name, not the manifest's, is the model's name in its workers too
        # (context.model_name, handler metrics, log prefixes), as in TorchServe.
        options = {"name": model_name, "handler": handler}
        options = {key: value for key, value in options.items() if value is not None}
        backend = await self._load_local(path, settings, self.work_dir, **options)
        manifest_model = backend.manifest.get("model", {})
        name = model_name or str(manifest_model.get("modelName") or path.stem)
        version = version or str(manifest_model.get("modelVersion") or "1.0")
        entry = None if described is None else described(name, version)
        if entry is not None:
            settings, make_default = entry.settings, make_default or entry.default
            described_extra = entry.extra
            if _wants_torchserve("", described_extra):
                # An entry for a proxied version that load_models did not ask for as one: its
                # settings apply to this archive (TorchServe's rule), its TorchServe does not
                # (kept, the snapshot would restore this version as a proxy).
                described_extra = {k: v for k, v in entry.extra.items() if k != BACKEND_KEY}
            extra = {**described_extra, **(extra or {})}

        try:
            if isinstance(backend, ArchiveBackend):
                settings = resolve_settings(
                    self.config,
                    backend.model_config,
                    name=name,
                    version=version,
                    origin=origin,
                    settings=settings,
                    api=api,
                )
                await backend.prepare(
                    settings,
                    install_requirements=self.config.install_py_dep_per_model,
                    model=name,
                )
        except BaseException:
            await backend.close()
            raise
        return await self._register_local(
            backend,
            name,
            version,
            url,
            settings,
            make_default=make_default,
            extra=extra,
            keep_failed=keep_failed,
            wait=wait,
        )

    async def register_path(
        self,
        path: Path,
        settings: ModelSettings,
        *,
        model_name: str,
        url: str,
        extra: dict[str, Any] | None = None,
    ) -> ModelVersion:
        """Register a model directory torchgate wrote itself (a workflow's function node), as
        `url`; unlike `register`, `path` is not looked for in the model store."""
        backend = await self._load_local(path, settings, self.work_dir, name=model_name)
        return await self._register_local(backend, model_name, "1.0", url, settings, extra=extra)

    async def _register_local(
        self,
        backend: Backend,
        name: str,
        version: str,
        url: str,
        settings: ModelSettings,
        *,
        make_default: bool = False,
        extra: dict[str, Any] | None = None,
        keep_failed: bool = False,
        wait: bool = True,
    ) -> ModelVersion:
        """Register a backend torchgate hosts; it is closed if registering fails."""

        async def ready_backend() -> Backend:
            return backend

        try:
            return await self.registry.register(
                name,
                version,
                url,
                ready_backend,
                settings,
                make_default=make_default,
                backend_info={"kind": "local", **(extra or {})},
                keep_failed=keep_failed,
                wait=wait,
            )
        except BaseException:
            await backend.close()
            raise

    async def _register_torchserve(
        self,
        url: str,
        settings: ModelSettings,
        model_name: str | None,
        version: str | None,
        make_default: bool,
        extra: dict[str, Any],
        requested: bool,
    ) -> ModelVersion:
        # Imported here, so httpx and the proxy load only when a version asks for them, and
        # in a thread: the first import takes ~100 ms that would stall every client.
        await asyncio.to_thread(importlib.import_module, "api.backends.torchserve")
        from api.backends.torchserve import open_backend, spec_for

        spec = spec_for(url, extra)
        if requested:  # before reading the store for a target that is refused anyway
            self._check_torchserve_targets([spec.inference_url, spec.management_url])
            if spec.key_file is not None:
                # A client could aim it at any file the server can read (and the server would
                # send what it holds to the target as keys): the operator's to name.
                raise BadRequest(
                    "TorchServe backend: key_file is set in config.properties (models={...}), "
                    "not through the management API"
                )
        if spec.signature is None:
            # The archive TorchServe serves is often in our model store too: its signature
            # makes v2 requests reach TorchServe's handler as v2 tensors (bridge rule 1)
            # rather than as a plain TorchServe request (rule 2).
            signature = await asyncio.to_thread(archive_signature, self.config.model_store, url)
            if signature is not None:
                spec = dataclasses.replace(spec, signature=signature)
        backend = await open_backend(spec, settings, name=model_name, version=version)

        async def ready_backend() -> Backend:
            return backend

        # Shared, so describe shows the health check's latest findings.
        info = backend.info
        info.update(extra)
        info[BACKEND_KEY] = backend.spec.to_json()  # what a snapshot restores it from
        try:
            return await self.registry.register(
                backend.name,
                backend.version,
                backend.spec.url,
                ready_backend,
                backend.settings,
                make_default=make_default,
                backend_info=info,
            )
        except BaseException:
            await backend.close()
            raise

    def _check_torchserve_targets(self, urls: list[str | None]) -> None:
        """Each address the gateway would connect to must match allowed_urls, written as
        `torchserve://HOST:PORT` (`torchserve+https://` for TLS): a pattern for archives,
        such as TorchServe's `http(s)?://.*`, never lets a client aim the server elsewhere.
        """
        for url in urls:
            if url is None:
                continue
            parts = urlsplit(url)
            scheme = "torchserve+https" if parts.scheme == "https" else "torchserve"
            target = f"{scheme}://{parts.netloc}"
            if not self.config.allows_url(target):
                raise BadRequest(
                    f"TorchServe target {target} is not named by allowed_urls (add a pattern "
                    f"such as {scheme}://{re.escape(parts.netloc)} to config.properties)"
                )

    async def load_startup_models(self) -> list[str]:
        """Register what config.properties asks for; returns one error line per failure.

        As TorchServe: load_models (or the model_snapshot) decides what loads. Each archive
        registers under load_models' `name=` or its manifest's name, with its manifest's
        version; a models={...} entry only gives the settings of the (name, version) it is
        keyed by (`api.model_config`), and an entry that matches no archive loaded is unused
        (said in a warning). torchgate's own addition: an entry with a `torchgate.backend` of a
        TorchServe registers that version as a proxy, in place of the archive of the same name
        and version.

        One bad archive never stops the others from loading. Different models load at once,
        one model's versions in load_models' order (`load_by_model`), so that which version is
        the default never depends on which archive unpacks first.
        """
        if self.config.models_from_snapshot:
            return await self._load_snapshot_models()
        archives, everything = _startup_archives(self.config)
        named = {url for url, _ in archives}
        entries = {(entry.name, entry.version): entry for entry in self.config.models}
        proxies = {
            key: entry
            for key, entry in entries.items()
            if _wants_torchserve(entry.mar_name, entry.extra)
            and (everything or entry.mar_name in named)
        }
        used: set[tuple[str, str | None]] = set()

        def described(name: str, version: str) -> ModelEntry | None:
            entry = entries.get((name, version))
            if entry is not None:
                used.add((name, version))
            return entry

        items: list[tuple[str, str, _Startup]] = []
        labels = {entry.mar_name: key for key, entry in proxies.items()}
        for url, name in archives:
            identity = await self._identity(url, name)
            key = identity if identity is not None else labels.get(url)  # no archive: a label?
            proxy = None if key is None else proxies.pop(key, None)
            if proxy is not None:  # a TorchServe serves this version, not the archive
                items.append((proxy.name, _what(proxy), _Startup(proxy.mar_name, None, proxy)))
            else:
                model = url if identity is None else identity[0]  # unreadable: fails alone
                items.append((model, url, _Startup(url, name, None)))
        for proxy in proxies.values():  # named by no archive loaded: after the archives
            items.append((proxy.name, _what(proxy), _Startup(proxy.mar_name, None, proxy)))

        async def load(item: _Startup) -> None:
            entry = item.entry
            if entry is not None:  # a proxied version: its entry names it
                used.add((entry.name, entry.version))
                registered = await self._register_entry(entry, "config")
            else:
                registered = await self.register(
                    item.url,
                    self.config.model_settings(),
                    model_name=item.name,
                    keep_failed=True,
                    described=described,
                )
            self.startup_models.add(registered.name)

        errors = await load_by_model(items, load)
        for line in errors:
            log.error("could not load model: %s", line)
        for (model, version), entry in entries.items():
            if (model, version) not in used:
                log.warning(
                    "models.%s.%s (marName %s) is not used: as in TorchServe, an entry gives "
                    "the settings of the name and version an archive of load_models registers "
                    "as, and no archive loaded at start is %s %s",
                    model,
                    version,
                    entry.mar_name,
                    model,
                    version,
                )
        return errors

    async def _register_entry(self, entry: ModelEntry, origin: Origin) -> ModelVersion:
        """The version an entry names, registered from its marName under its own name and
        version with its settings (a snapshot's entry, or a proxied version's)."""
        return await self.register(
            entry.mar_name,
            entry.settings,
            model_name=entry.name,
            version=entry.version,
            make_default=entry.default,
            extra=entry.extra,
            keep_failed=True,
            origin=origin,
        )

    async def _identity(self, url: str, name: str | None) -> tuple[str, str] | None:
        """(name, version) the archive `url` registers as, from its manifest; None when it
        cannot be read (its registration then fails with the reason)."""
        try:
            return await asyncio.to_thread(
                archive_identity, self.resolve(url), name=name, limits=ArchiveLimits.of(self.config)
            )
        except Exception:
            return None

    async def _load_snapshot_models(self) -> list[str]:
        """A model_snapshot's models, as TorchServe restores them: each entry registered under
        its own name from its marName, with the entry's settings."""

        async def load(entry: ModelEntry) -> None:
            # TorchServe registers the archive's own version; the entry's key only finds the
            # settings (ModelManager.registerAndUpdateModel).
            identity = await self._identity(entry.mar_name, entry.name)
            if identity is not None and identity[1] != entry.version:
                log.warning(
                    "model_snapshot names %s version %s, but its archive %s is version %s: "
                    "registered as %s, as TorchServe does",
                    entry.name,
                    entry.version,
                    entry.mar_name,
                    identity[1],
                    identity[1],
                )
                entry = dataclasses.replace(entry, version=identity[1])
            await self._register_entry(entry, "snapshot")
            self.startup_models.add(entry.name)

        errors = await load_by_model(
            [(entry.name, _what(entry), entry) for entry in self.config.models], load
        )
        for line in errors:
            log.error("could not load model: %s", line)
        return errors


@dataclasses.dataclass(frozen=True)
class _Startup:
    """One version to register at start: an archive (`url`, load_models' `name=`), or, with
    an `entry`, a version a TorchServe serves, named by its models={...} entry."""

    url: str
    name: str | None
    entry: ModelEntry | None


def _what(entry: ModelEntry) -> str:
    return f"{entry.name} {entry.version} ({entry.mar_name})"


async def load_by_model(
    items: Sequence[tuple[str, str, _Item]], load: Callable[[_Item], Awaitable[object]]
) -> list[str]:
    """`load` each item: one model's items in their order, different models at once.

    For start-up and snapshot restore: a large archive's extraction (the 90 MB minilm takes
    0.5 s here) then overlaps the zygote's imports and the other models' loading instead of
    waiting behind them, and so do the handlers' starts (as TorchServe starts every model's
    workers at once).
    `items`: (model name, what to call the item in an error line, item). Returns one error
    line per failure, in the order of `items`; a failure never stops the others.
    """
    by_model: dict[str, list[int]] = {}
    for index, (name, _, _) in enumerate(items):
        by_model.setdefault(name, []).append(index)
    errors: list[str | None] = [None] * len(items)

    async def load_model(indexes: list[int]) -> None:
        for index in indexes:
            _, what, item = items[index]
            try:
                await load(item)
            except Exception as exc:
                errors[index] = f"{what}: {exc}"

    await asyncio.gather(*(load_model(indexes) for indexes in by_model.values()))
    return [line for line in errors if line is not None]


def _wants_torchserve(url: str, extra: dict[str, Any] | None) -> bool:
    """Cheap test, so that registering an archive never imports the proxy (and httpx)."""
    backend = (extra or {}).get(BACKEND_KEY)
    if backend is not None:  # anything but {"kind": "local"} goes where its errors are reported
        return not (isinstance(backend, dict) and backend.get("kind") == "local")
    return url.startswith(TORCHSERVE_SCHEMES)


def _store_models(store: Path) -> list[Path]:
    """What `load_models=all` loads, as TorchServe: every entry of the model store that is not
    hidden and is a folder (an archive made with --archive-format no-archive) or a .mar,
    .model or .tar.gz file."""
    return [
        entry
        for entry in sorted(store.iterdir())
        if not entry.name.startswith(".")
        and (entry.is_dir() or entry.name.endswith((".mar", ".model", ".tar.gz")))
    ]


def _startup_archives(config: Config) -> tuple[list[tuple[str, str | None]], bool]:
    """(url, load_models' `name=` or None) of each archive load_models loads, in its order,
    and whether it said `all` (every archive of the model store).

    Read as TorchServe reads it: `all` is the whole value, in any case; each item is split at
    its first `=`, so a URL may hold `=` of its own (`name=https://host/m.mar?sig=x`)."""
    if config.load_models.strip().lower() == "all":
        store = config.model_store
        return ([(p.name, None) for p in _store_models(store)] if store.is_dir() else []), True
    found: list[tuple[str, str | None]] = []
    for item in config.load_models.split(","):
        name, equals, url = item.strip().partition("=")
        if not equals:
            name, url = "", name
        if url:
            found.append((url, name or None))
    return found, False


SIGNATURE_MAX_BYTES = 1 << 20


def archive_signature(store: Path, url: str) -> dict[str, Any] | None:
    """The `signature.json` of the archive `url` names in `store`, if there is one to read."""
    if "://" in url or not url.endswith(".mar"):
        return None
    path = (store / url).resolve()
    if not path.is_relative_to(store.resolve()) or not path.is_file():
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("signature.json")
            if info.file_size > SIGNATURE_MAX_BYTES:
                return None
            signature = json.loads(archive.read(info))
    except (KeyError, OSError, ValueError, zipfile.BadZipFile):
        return None
    return signature if isinstance(signature, dict) else None
