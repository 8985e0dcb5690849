"""One worker zygote for the whole test session, and a loader of archives into worker processes.

Starting a zygote imports torch (1-2 s); every test that forks workers shares this one. The pool
follows each test's event loop (`WorkerPool.start` re-attaches), so tests keep using
`asyncio.run` through `tests.support.aio.run`::

    def test_x(worker_pool: WorkerPool, build_archive: BuildArchive) -> None:
        backend = run(load_worker_backend(path, settings(), pool=worker_pool, work_dir=...))
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api.backends.workers import WorkerBackend, load_worker_backend
from api.core.types import Backend, ModelSettings
from api.model_loader import ArchiveBackendLoader
from api.workers.pool import WorkerPool


@pytest.fixture(scope="session")
def worker_pool() -> Iterator[WorkerPool]:
    pool = WorkerPool()

    async def start() -> None:
        pool.start()

    asyncio.run(start())
    yield pool

    async def close() -> None:
        pool.start()  # attach to this loop, so close can wait here
        await pool.close()

    asyncio.run(close())


def worker_loader(pool: WorkerPool, **options: Any) -> ArchiveBackendLoader:
    """A `ArchiveBackendLoader` (what `api.app.build` takes) forking workers from `pool`."""

    async def load(
        path: Path, settings: ModelSettings, work_dir: Path, name: str | None = None
    ) -> Backend:
        backend: WorkerBackend = await load_worker_backend(
            path, settings, pool=pool, work_dir=work_dir, name=name, **options
        )
        return backend

    return load
