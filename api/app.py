"""Assembles torchgate from a Config: registry, dataplane, loader, auth and the HTTP apps.

This is where backends are injected into the core: the registry only sees `Backend` objects.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from api.config import Config
from api.core.dataplane import DataPlane
from api.core.registry import Registry
from api.core.types import Backend, ModelSettings
from api.loader import ModelLoader
from api.metrics import PrometheusObserver
from api.rest.apps import build_inference_app, build_management_app, build_metrics_app
from api.rest.asgi import ASGIApp
from api.rest.security import TokenAuth

log = logging.getLogger(__name__)


async def load_local(path: Path, settings: ModelSettings, work_dir: Path) -> Backend:
    from api.backends.local import load_local_backend

    return await load_local_backend(path, settings, work_dir=work_dir)


@dataclass(eq=False)
class Torchgate:
    config: Config
    registry: Registry
    dataplane: DataPlane
    loader: ModelLoader
    observer: PrometheusObserver
    auth: TokenAuth | None
    inference_app: ASGIApp
    management_app: ASGIApp
    metrics_app: ASGIApp
    startup_errors: list[str] = field(default_factory=list)

    async def start(self) -> None:
        """Load the models config.properties asks for; a bad archive is logged, not fatal."""
        self.startup_errors = await self.loader.load_startup_models()
        for model_version in self.registry:
            model_version.backend_info["startup"] = True

    async def stop(self) -> None:
        """Stop accepting, finish what is queued, then unload every model."""
        self.dataplane.accepting = False
        await self.registry.close()


def build(config: Config, *, work_dir: Path | None = None) -> Torchgate:
    observer = PrometheusObserver()
    registry = Registry(observer)
    dataplane = DataPlane(registry, observer=observer)
    work = work_dir or Path(tempfile.mkdtemp(prefix="torchgate-models-"))
    loader = ModelLoader(config, registry, work, load_local)
    auth = None if config.disable_token_authorization else TokenAuth(config.key_file)
    if auth is not None:
        log.info("token authorization is on; keys are in %s", config.key_file)
    return Torchgate(
        config=config,
        registry=registry,
        dataplane=dataplane,
        loader=loader,
        observer=observer,
        auth=auth,
        inference_app=build_inference_app(
            dataplane, max_request_size=config.max_request_size, auth=auth
        ),
        management_app=build_management_app(
            registry, loader, enable_model_api=config.enable_model_api, auth=auth
        ),
        metrics_app=build_metrics_app(observer.render),
    )
