"""Serves a workflow's nodes as models: the `WorkflowHost` that `api.core.workflow` drives.

A `.war` url names a file in the workflow store (`workflow_store` in config.properties, the
model store when unset), or a path outside it that `allowed_urls` names as a `file://` url, as
for model archives. Nothing is downloaded. Model nodes register their `.mar` through the
`ModelLoader` (the model store and allowed_urls rules apply); function nodes register a model
directory written next to the extracted workflow (`api.backends.war.function_model`).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

from api.backends.extract import ArchiveLimits
from api.backends.war import WorkflowArchive, function_model, open_war
from api.core.workflow import WORKFLOW_KEY, Node, RegisterOptions, WorkflowSpec, parse_spec
from api.errors import BadRequest, Conflict, WorkflowNotFound
from api.model_loader import ModelLoader


class WorkflowLoader:
    def __init__(self, loader: ModelLoader, work_dir: Path) -> None:
        self.loader = loader
        self.config = loader.config
        self.work_dir = work_dir / "workflows"

    @property
    def store(self) -> Path:
        return self.config.workflow_store or self.config.model_store

    def resolve(self, url: str) -> Path:
        """The .war file `url` names; WorkflowNotFound / BadRequest as TorchServe answers."""
        parts = urlsplit(url)
        if parts.scheme in ("http", "https", "s3"):
            raise BadRequest(
                f"torchgate does not download workflow archives ({url}); copy the archive "
                f"into the workflow store {self.store} and register it by file name"
            )
        if parts.scheme not in ("", "file"):
            raise BadRequest(f"Given URL {url}: unsupported scheme {parts.scheme!r}")
        given = Path(unquote(parts.path) if parts.scheme == "file" else url)
        store = Path(os.path.abspath(self.store))
        candidate = given if given.is_absolute() else store / given
        try:
            path = candidate.resolve()
            is_file = path.is_file()
        except (OSError, ValueError, RuntimeError) as exc:
            # A NUL byte, a name too long, a symlink loop: nothing that could name an archive.
            raise BadRequest(f"Given URL {url!r} is not a usable path: {exc}") from exc
        inside = ".." not in given.parts and path.is_relative_to(store.resolve())
        if not is_file or (not inside and not self.config.allows_url(path.as_uri())):
            raise WorkflowNotFound(f"Workflow not found in workflow store: {url}")
        return path

    async def open(self, url: str, name: str | None) -> WorkflowSpec:
        path = self.resolve(url)
        limits = ArchiveLimits.of(self.config)
        archive = await asyncio.to_thread(open_war, path, self.work_dir, name=name, limits=limits)
        try:
            return parse_spec(archive.name, url, archive.spec, source=archive)
        except BaseException:
            archive.remove()
            raise

    async def add_node(self, spec: WorkflowSpec, node: Node, options: RegisterOptions) -> None:
        if self.loader.registry.taken(node.model):
            # Added beside it as another version, the node would not be its default: requests
            # would go to the model already there, and removing the workflow would remove that.
            raise Conflict(f"Model {node.model} is already registered")
        overrides: dict[str, float | int] = {
            # TorchServe starts max-workers workers for each node (its initial workers).
            "minWorkers": node.settings.max_workers,
            "maxWorkers": node.settings.max_workers,
            "batchSize": max(node.settings.batch_size, 1),
            "maxBatchDelay": node.settings.max_batch_delay_ms,
        }
        if options.response_timeout_s is not None:
            overrides["responseTimeout"] = options.response_timeout_s
        if options.startup_timeout_s is not None:
            overrides["startupTimeout"] = options.startup_timeout_s
        settings = self.config.model_settings(overrides)
        if node.url is not None:
            await self.loader.register(
                node.url,
                settings,
                model_name=node.model,
                requested=True,
                extra={WORKFLOW_KEY: spec.name},
                # The spec's per-node values weigh against the archive's model-config.yaml as
                # a register call's parameters do.
                origin="api",
                api=overrides,
            )
            return
        archive = spec.source
        assert isinstance(archive, WorkflowArchive)
        model_dir = await asyncio.to_thread(function_model, archive, node.name, node.model)
        await self.loader.register_path(
            model_dir,
            settings,
            model_name=node.model,
            url=f"{spec.url}:{node.name}",
            extra={WORKFLOW_KEY: spec.name},
        )

    async def remove_node(self, model: str) -> None:
        await self.loader.registry.unregister(model)

    def discard(self, spec: WorkflowSpec) -> None:
        if isinstance(spec.source, WorkflowArchive):
            spec.source.remove()
