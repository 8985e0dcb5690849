"""Runs torchgate: HTTP on the inference, management and metrics addresses, gRPC beside them.

All servers share one event loop (uvloop when installed). SIGTERM or SIGINT starts a graceful
shutdown: /ping turns unhealthy, the listeners close, requests already accepted are answered
(queued ones included), then models are unloaded and the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import ssl
from collections.abc import Callable, Generator, Mapping
from pathlib import Path
from typing import Any

import uvicorn

from api.app import Torchgate, build
from api.config import Address, Config, EdgeLimits
from api.config_keys import report as report_config
from api.observability import log_files
from api.observability.access_lines import AccessLines
from api.observability.compose import access_log_setting
from api.rest.apps import listeners
from api.rest.asgi import AccessLogged, ASGIApp, StatusTold
from api.rest.edge import edge_protocol
from api.tls import KeyMaterial, load_tls, server_ssl_context
from api.workers.pool import WorkerPool

log = logging.getLogger("torchgate")

# TorchServe (NettyUtils.sendHttpResponse) marks every REST answer uncacheable, so a cache or
# proxy between client and server never serves a stored prediction, health or model list.
# uvicorn adds these to every response it sends, at no cost per request in Python.
NO_CACHE_HEADERS = [
    ("cache-control", "no-cache; no-store, must-revalidate, private"),
    ("expires", "Thu, 01 Jan 1970 00:00:00 UTC"),
    ("pragma", "no-cache"),
]

# Allocations (net of frees) between two young-generation collections; Python's default is 700.
YOUNG_COLLECTION_THRESHOLD = 20_000


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to `serve()`, which runs several."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _http_server(
    app: ASGIApp,
    address: Address,
    limits: EdgeLimits,
    *,
    log_level: str,
    grace_s: float,
    ssl_context: ssl.SSLContext | None = None,
    answered: Callable[[int], None] | None = None,
    access_lines: AccessLines | None = None,
) -> _Server:
    if address.scheme not in ("http", "https"):
        raise ValueError(f"{address}: the scheme must be http or https")
    context = ssl_context if address.scheme == "https" else None
    if answered is not None:
        if access_lines is not None:
            app = AccessLogged(app, answered, access_lines)
        else:
            app = StatusTold(app, answered)
    config = uvicorn.Config(
        app,
        host=address.host,
        port=address.port,
        # httptools with header, timeout and connection limits, each answer's status told,
        # and TLS: the edge's own, so that handshakes count against its bound and deadline
        http=edge_protocol(limits, answered, context),
        ws="none",  # no WebSocket: an Upgrade is answered as a plain request (api.rest.edge)
        loop="none",
        lifespan="off",
        access_log=False,
        # uvicorn's own log config gives its loggers handlers of their own, whose lines
        # ("INFO:     Started server process") have no time and miss the log files: None
        # leaves them to the root logger's handlers, as every other line.
        log_config=None,
        log_level=log_level,
        server_header=False,
        date_header=False,
        headers=NO_CACHE_HEADERS,
        backlog=4096,
        proxy_headers=False,  # no X-Forwarded-* rewriting layer on every request
        timeout_graceful_shutdown=int(grace_s),
        timeout_keep_alive=limits.keep_alive_timeout_s,
    )
    return _Server(config)


def https_context(tls: KeyMaterial | None) -> ssl.SSLContext | None:
    """One server context for every https:// address (`load_tls(config)` gives `tls`)."""
    return None if tls is None else server_ssl_context(tls)


async def serve(
    config: Config,
    *,
    log_level: str = "info",
    ready: asyncio.Event | None = None,
    access_log: bool | None = None,
    pool: WorkerPool | None = None,
    sockets: Mapping[Address, socket.socket] | None = None,
    on_ready: Callable[[], None] | None = None,
    access_lines: AccessLines | None = None,
) -> None:
    """`sockets`: the listener of each HTTP address, bound beforehand
    (`api.commands.listen`); `on_ready` is called once the start-up models serve;
    `access_lines`: TorchServe's access_log.log, written for every HTTP answer and gRPC call."""
    report_config(config)  # unknown and unsupported keys, then the effective configuration
    tls = load_tls(config)  # a bad key or certificate stops the start here, before any work
    torchgate = build(config, access_log=access_log, pool=pool)
    if torchgate.pool is not None:
        torchgate.pool.start()  # the zygote imports torch while the ports are bound
    # Accepted requests are answered on shutdown, so the grace period covers a response
    # timeout (a model's own responseTimeout is capped by it; a second signal exits at once).
    grace_s = config.default_response_timeout + 5.0
    torchgate.dataplane.accepting = False  # /ping stays unhealthy until models are loaded
    ssl_context = https_context(tls)
    apps = {
        "inference": torchgate.inference_app,
        "management": torchgate.management_app,
        "metrics": torchgate.metrics_app,
    }
    http_servers = [
        (
            _http_server(
                app,
                address,
                config.http_limits,
                log_level=log_level,
                grace_s=grace_s,
                ssl_context=ssl_context,
                answered=torchgate.observer.http_answered,  # TorchServe's Requests2XX...
                access_lines=access_lines,
            ),
            address,
        )
        for app, address in listeners(
            [(api, apps[api], address) for api, address in config.http_addresses()]
        )
    ]
    extras = [torchgate.grpc_servers(tls=tls, access_lines=access_lines)]

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stopping.is_set():
            log.error("second signal during shutdown: exiting without finishing requests")
            os._exit(1)
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)

    tasks = [
        asyncio.create_task(server.serve(sockets=[sockets[address]] if sockets else None))
        for server, address in http_servers
    ]
    for start, _ in extras:
        await start()
    signalled = asyncio.create_task(stopping.wait())
    if await _started(torchgate, signalled):
        # Models are loaded: move everything alive now out of the garbage collector's
        # generations, so collections on the hot path only walk what requests allocate.
        gc.freeze()
        # Requests leave no reference cycles (docs/architecture.md), so young collections find
        # next to nothing, and at the default threshold (700) they came every few requests:
        # with 200 connections in flight, what each scanned was alive, got promoted and was
        # scanned again, 12 % of the frontend's CPU (10,400 -> 11,900 req/s with 20,000).
        gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])
        torchgate.dataplane.accepting = True
        log.info(
            "torchgate serving %d model version(s): inference %s, management %s, metrics %s",
            sum(1 for _ in torchgate.registry),
            config.inference_address,
            config.management_address,
            config.metrics_address
            if config.enable_metrics_api
            else "off (enable_metrics_api=false)",
        )
        if ready is not None:
            ready.set()
        if on_ready is not None:
            on_ready()

    done, _ = await asyncio.wait([signalled, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if task in tasks and task.exception() is not None:
            log.error("an HTTP server failed: %s", task.exception())
    log.info("shutting down: finishing accepted requests")
    torchgate.dataplane.accepting = False
    for server, _ in http_servers:
        server.should_exit = True
    for _, stop in extras:
        await stop(grace_s)
    await asyncio.gather(*tasks, return_exceptions=True)
    await torchgate.stop()
    log.info("torchgate stopped")


async def _started(torchgate: Torchgate, signalled: asyncio.Task[Any]) -> bool:
    """Load the start-up models; False if a signal came first. Loading is then abandoned: a
    stop must not wait out every model's startupTimeout, nor report the server ready."""
    starting = asyncio.create_task(torchgate.start())
    await asyncio.wait([starting, signalled], return_when=asyncio.FIRST_COMPLETED)
    if starting.done():
        starting.result()
        return True
    log.info("signalled while loading the start-up models: loading no more")
    starting.cancel()
    (outcome,) = await asyncio.gather(starting, return_exceptions=True)
    if not isinstance(outcome, asyncio.CancelledError | None):
        log.error("abandoning the start-up models failed: %r", outcome)
    return False


def run(
    config: Config,
    *,
    log_level: str = "info",
    access_log: bool | None = None,
    pool: WorkerPool | None = None,
    sockets: Mapping[Address, socket.socket] | None = None,
    on_ready: Callable[[], None] | None = None,
    log_folder: Path | None = None,
) -> None:
    """Serve until signalled (see `serve`), logging to stderr and, with `log_folder`,
    to TorchServe's log files there (`api.observability.log_files`; the command line's
    starts pass it, tests that run the server in process do not)."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if access_log is None:  # one switch for both access logs: the JSON lines and the file
        access_log = access_log_setting(config.raw)
    files: list[log_files.LogFile] = []
    access_lines: AccessLines | None = None
    if log_folder is not None:
        try:
            files = log_files.install(log_folder)
            if access_log:
                access_lines = AccessLines(log_folder, ts_log=files[0])  # ts_log.log's file
        except OSError as exc:
            log_files.uninstall(files)
            files = []
            # As TorchServe, whose log4j reports a file it cannot write and serves on: a
            # read-only working directory (a container's root) must not stop the server.
            log.warning(
                "%s: serving without TorchServe's log files",
                log_files.describe_failure(log_folder, exc),
            )
    runner: Any
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        runner = asyncio.run
    try:
        runner(
            serve(
                config,
                log_level=log_level,
                access_log=access_log,
                pool=pool,
                sockets=sockets,
                on_ready=on_ready,
                access_lines=access_lines,
            )
        )
    finally:
        if access_lines is not None:
            access_lines.close()
        log_files.uninstall(files)
