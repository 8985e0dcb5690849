"""The composition root: torchgate from a Config — registry, dataplane, loader, auth, the HTTP
apps and (`Torchgate.grpc_servers`) the gRPC servers.

This is where backends are injected into the core: the registry only sees `Backend` objects.
"""

from __future__ import annotations

import itertools
import logging
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from api.auth import TokenAuth
from api.backends.extract import ArchiveLimits
from api.backends.workdir import make_work_dir, remove_orphans
from api.backends.workers import gpu_round_robin, load_worker_backend
from api.config import Config, ConfigError
from api.core.dataplane import DataPlane
from api.core.registry import Registry
from api.core.routing import TrafficRouter
from api.core.types import Backend, ModelSettings
from api.core.workflow import Workflows
from api.encoding import encode_prediction
from api.model_loader import ArchiveBackendLoader, ModelLoader
from api.observability.access_lines import AccessLines
from api.observability.compose import access_log_setting, build_observability
from api.observability.handler_metrics import HandlerMetrics
from api.observability.metrics import PrometheusObserver
from api.rest.apps import build_inference_app, build_management_app, build_metrics_app
from api.rest.asgi import ASGIApp
from api.rest.cors import with_cors
from api.rest.origin import BrowserGuard, HostPolicy
from api.snapshot import Snapshotter, load_startup_state
from api.tls import KeyMaterial
from api.workers.pool import WorkerPool
from api.workflow_loader import WorkflowLoader

log = logging.getLogger(__name__)


def worker_backend_loader(
    pool: WorkerPool, config: Config, metrics: HandlerMetrics | None
) -> ArchiveBackendLoader:
    """Archives become `WorkerBackend`s whose workers the pool forks; one GPU round robin for
    every model's workers, as TorchServe's (number_of_gpu capped at the GPUs present). Each
    loaded version reports its handler metrics as a source of its own (`metrics.for_source`:
    it keeps a share of the series while it is loaded)."""
    limits = ArchiveLimits.of(config)
    gpus = gpu_round_robin(config.number_of_gpu)
    loads = itertools.count(1)

    async def load(
        path: Path,
        settings: ModelSettings,
        work_dir: Path,
        name: str | None = None,
        handler: str | None = None,
    ) -> Backend:
        source = f"{path.name} (load {next(loads)})"
        on_metric = None if metrics is None else metrics.for_source(source)
        try:
            backend = await load_worker_backend(
                path,
                settings,
                pool=pool,
                work_dir=work_dir,
                name=name,
                handler=handler,
                on_metric=on_metric,
                intra_op_threads=config.intra_op_threads,
                gpus=gpus,
                limits=limits,
                max_image_pixels=config.image_pixel_limit,
                max_items_per_request=config.max_items_per_request,
                declared_metrics=config.metrics_spec.model_metrics,
                service_envelope=config.service_envelope,
            )
        except BaseException:
            if metrics is not None:
                metrics.release(source)
            raise
        if metrics is not None:
            backend.on_close.append(lambda: metrics.release(source))
        return backend

    return load


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
    router: TrafficRouter | None = None
    # None when snapshots are off (no torchgate.snapshot_file, or `torchgate serve --ncs`).
    snapshotter: Snapshotter | None = None
    # Where archives were extracted, when torchgate made the folder (removed at stop).
    owned_work_dir: Path | None = None
    # Forks the worker processes; None when tests inject their own backends.
    pool: WorkerPool | None = None
    workflows: Workflows | None = None

    async def start(self) -> None:
        """Restore the snapshot, or load what config.properties asks for.

        A bad archive is logged, not fatal.
        """
        assert self.router is not None
        if self.pool is not None:
            self.pool.start()
        self.startup_errors = await load_startup_state(
            self.config, self.loader, self.router, self.snapshotter
        )
        self.registry.loaded_at_startup.update(self.registry.names())

    def grpc_servers(
        self, *, tls: KeyMaterial | None = None, access_lines: AccessLines | None = None
    ) -> tuple[Callable[[], Awaitable[None]], Callable[[float], Awaitable[None]]]:
        """(start, stop) for the gRPC servers, built from the parts the HTTP apps were.

        Built on demand, inside the running event loop grpc.aio needs.
        """
        from api.rpc.server import grpc_servers

        return grpc_servers(
            self.config,
            auth=self.auth,
            dataplane=self.dataplane,
            registry=self.registry,
            loader=self.loader,
            tls=tls,
            access_lines=access_lines,
        )

    async def stop(self) -> None:
        """Stop accepting, finish what is queued, then unload every model."""
        self.dataplane.accepting = False
        if self.workflows is not None:
            await self.workflows.close()
        await self.registry.close()
        if self.pool is not None:
            await self.pool.close()
        if self.owned_work_dir is not None:
            shutil.rmtree(self.owned_work_dir, ignore_errors=True)


def build(
    config: Config,
    *,
    work_dir: Path | None = None,
    backend_loader: ArchiveBackendLoader | None = None,
    access_log: bool | None = None,
    pool: WorkerPool | None = None,
    workflow_store: Path | None = None,
) -> Torchgate:
    """Assemble torchgate; tests pass `backend_loader` to serve fake archives. `pool`: a
    worker pool already launched, whose cleanup folder is the work dir.

    `access_log` overrides `torchgate.access_log` from config.properties
    (see api.observability.compose).
    `workflow_store` overrides `workflow_store` from config.properties (`--workflow-store`).
    """
    if workflow_store is not None:
        config.workflow_store = workflow_store
    observability = build_observability(
        access_log=access_log_setting(config.raw) if access_log is None else access_log,
        system_metrics=not config.disable_system_metrics,
    )
    observer = observability.observer
    observability.handler_metrics.spec = config.metrics_spec
    registry = Registry(observer, max_workers_per_model=config.worker_bound)
    observability.metrics.track(registry)
    router = TrafficRouter(registry)
    dataplane = DataPlane(registry, router=router, observer=observer)
    snapshot_file = config.snapshot_file
    snapshotter = None if snapshot_file is None else Snapshotter(snapshot_file, registry, router)
    if snapshotter is not None:
        try:
            snapshotter.check_folder()
        except OSError as exc:  # a read-only folder: say so in one line, before serving
            raise ConfigError(
                f"cannot write snapshots to {snapshotter.path.parent}: {exc.strerror} "
                "(torchgate.snapshot_file in config.properties, LOG_LOCATION, or --ncs)"
            ) from None
    if work_dir is None:
        remove_orphans()  # what servers killed with their zygote left in the temp dir
    if pool is not None:  # launched early, with its work dir (see `api.cli`)
        owned = pool.cleanup
    else:
        owned = None if work_dir is not None else make_work_dir()
        if backend_loader is None:
            # The zygote removes the extracted archives itself if this process is killed.
            pool = WorkerPool(
                cleanup=owned,
                preload=config.worker_preload,
                spin_us=config.spin_us,
                environment=config.worker_environment,
            )
    work = work_dir or owned
    assert work is not None
    if backend_loader is None:
        assert pool is not None
        backend_loader = worker_backend_loader(pool, config, observability.handler_metrics)
    loader = ModelLoader(config, registry, work, backend_loader)
    workflows = Workflows(
        dataplane, WorkflowLoader(loader, work), encode=lambda p: encode_prediction(p).body
    )
    auth = None
    if not config.disable_token_authorization:
        try:
            auth = TokenAuth(config.key_file, expiration_min=config.token_expiration_min)
        except OSError as exc:  # a read-only folder: say so in one line, before serving
            raise ConfigError(
                f"cannot write token authorization keys to {config.key_file}: {exc.strerror} "
                "(torchgate.key_file in config.properties, or disable_token_authorization)"
            ) from None
    if auth is not None:
        log.info("token authorization is on; keys are in %s", config.key_file)
    torchgate = Torchgate(
        config=config,
        registry=registry,
        dataplane=dataplane,
        loader=loader,
        observer=observability.metrics,
        auth=auth,
        inference_app=build_inference_app(
            dataplane,
            max_request_size=config.max_request_size,
            max_response_size=config.max_response_size,
            auth=auth,
            max_items=config.max_items_per_request,
            workflows=workflows,
            startup_models=lambda: loader.startup_models,
        ),
        management_app=build_management_app(
            registry,
            loader,
            enable_model_api=config.enable_model_api,
            auth=auth,
            max_request_size=config.max_request_size,
            router=router,
            browser_guard=lambda app: BrowserGuard(
                app,
                HostPolicy(config.management_address.host, config.allowed_hosts),
                allowed_origins=config.cors_allowed_origin,
            ),
            workflows=workflows,
        ),
        metrics_app=build_metrics_app(observability.metrics.render),
        router=router,
        snapshotter=snapshotter,
        owned_work_dir=owned,
        pool=pool,
        workflows=workflows,
    )
    _add_cors(torchgate)
    return torchgate


def _add_cors(torchgate: Torchgate) -> None:
    """TorchServe's CORS keys, on every port (api.rest.cors)."""
    config = torchgate.config
    for name in ("inference_app", "management_app", "metrics_app"):
        app = getattr(torchgate, name)
        setattr(
            torchgate,
            name,
            with_cors(
                app,
                origin=",".join(config.cors_allowed_origin),
                methods=config.cors_allowed_methods,
                headers=config.cors_allowed_headers,
            ),
        )
