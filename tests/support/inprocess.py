"""torchgate in the test's own event loop: built from a raw config, started, and stopped again.

    async with started_torchgate(tmp_path, {"load_models": "m.mar"}, loader, grpc=True) as run:
        run.tg.inference_app, run.grpc_inference_port, run.grpc_management_port

Defaults for tests: token authorization off, no snapshot, no access log, `model_store` under
`tmp_path` unless the config names one. With `grpc=True` both gRPC servers listen on free
loopback ports.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from api.app import Torchgate, build
from api.config import parse_config
from api.model_loader import ArchiveBackendLoader
from tests.support.torchserve import free_ports


@dataclass(frozen=True)
class InProcess:
    tg: Torchgate
    grpc_inference_port: int = 0
    grpc_management_port: int = 0


@asynccontextmanager
async def started_torchgate(
    tmp_path: Path,
    config: Mapping[str, str],
    backend_loader: ArchiveBackendLoader,
    *,
    grpc: bool = False,
) -> AsyncIterator[InProcess]:
    inference_port, management_port = free_ports(2) if grpc else (0, 0)
    raw = {
        "model_store": str(tmp_path / "model_store"),
        "disable_token_authorization": "true",
        "torchgate.snapshot_file": "",
        "grpc_inference_port": str(inference_port),
        "grpc_management_port": str(management_port),
        **config,
    }
    tg = build(
        parse_config(raw, base_dir=tmp_path),
        work_dir=tmp_path / "work",
        backend_loader=backend_loader,
        access_log=False,
    )
    await tg.start()
    assert tg.startup_errors == []
    stop_grpc = None
    if grpc:
        start, stop_grpc = tg.grpc_servers()
        await start()
    try:
        yield InProcess(tg, inference_port, management_port)
    finally:
        if stop_grpc is not None:
            await stop_grpc(0)
        await tg.stop()


@asynccontextmanager
async def asgi_clients(tg: Torchgate) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """Clients of `tg`'s inference and management apps, in process (no sockets)."""
    inference = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=tg.inference_app), base_url="http://inference"
    )
    management = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=tg.management_app), base_url="http://localhost"
    )
    try:
        yield inference, management
    finally:
        await inference.aclose()
        await management.aclose()
