"""A real zygote and its workers: what a worker leaves behind when it ends, the zygote's own
stop, and what a handler sees of its environment (`sys.path`, PYTHONPATH, its output).

Handlers here start real processes (`sh`, `sleep`, Python's multiprocessing resource tracker)
and report their pids or names; every test ends what it may have left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import api.workers.output as output_module
import api.workers.pool as pool_module
from api.backends.workers import ProcessWorker, WorkerBackend, load_worker_backend
from api.core.types import InferenceRequest, ModelSettings
from api.errors import DeadlineExceeded
from api.workers.pool import WorkerPool
from tests.support import aio
from tests.support.archives import build_archive
from tests.support.processes import alive, wait_until

# Does what its request body says, and answers with what it found out.
HANDLER = """
    import importlib.util
    import os
    import subprocess
    import sys
    import time
    from multiprocessing import shared_memory

    kept = []
    LISTENER = (
        "import signal, socket, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "server = socket.create_server(('127.0.0.1', 0)); "
        "print(server.getsockname()[1], flush=True); time.sleep(600)"
    )

    def handle(data, context):
        if data is None:
            return None
        body = data[0].get("body") or data[0].get("data")
        command = bytes(body).decode()
        if command == "shm":  # a segment the handler never unlinks
            segment = shared_memory.SharedMemory(create=True, size=4096)
            kept.append(segment)
            return [segment.name]
        if command == "hang":
            time.sleep(3600)
        if command == "helpers":  # one in the worker's group (deaf to SIGTERM), one daemon
            deaf = subprocess.Popen(["sh", "-c", "trap '' TERM; exec sleep 600"])
            daemon = subprocess.Popen(["sleep", "600"], start_new_session=True)
            return [[deaf.pid, daemon.pid]]
        if command == "listen":  # a server in the worker's group, deaf to SIGTERM
            command = [sys.executable, "-I", "-c", LISTENER]
            server = subprocess.Popen(command, stdout=subprocess.PIPE)
            return [[server.pid, int(server.stdout.readline())]]
        if command == "exit":
            os._exit(3)
        if command == "late":  # a daemon that prints, on the worker's stdout, once it is gone
            script = "sleep 1; echo late-line-from-daemon; exec sleep 600"
            return [subprocess.Popen(["sh", "-c", script], start_new_session=True).pid]
        if command == "stderr":
            print("Traceback-like line on stderr", file=sys.stderr, flush=True)
            return ["ok"]
        if command == "launch":
            return [importlib.util.find_spec("tg_launch_dir_probe") is not None]
        if command == "pythonpath":
            done = subprocess.run(
                [sys.executable, "-c", "import archive_helper; print(archive_helper.VALUE)"],
                cwd="/",
                capture_output=True,
                text=True,
            )
            return [[done.stdout.strip(), os.environ["PYTHONPATH"], os.getcwd()]]
        return ["?"]
"""


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    files = {"probe.py": HANDLER, "archive_helper.py": "VALUE = 'from the archive'\n"}
    return build_archive(tmp_path, "probe", "probe.py", files)


@asynccontextmanager
async def own_pool() -> AsyncIterator[WorkerPool]:
    """A zygote of this test's own, started from the current working directory."""
    pool = WorkerPool()
    pool.start()
    try:
        yield pool
    finally:
        await pool.close()


@asynccontextmanager
async def backend(
    pool: WorkerPool, path: Path, **model: Any
) -> AsyncIterator[tuple[WorkerBackend, ProcessWorker]]:
    loaded = await load_worker_backend(
        path, ModelSettings(**model), pool=pool, work_dir=path.parent / "work"
    )
    try:
        yield loaded, await loaded.start_worker(0)
    finally:
        await loaded.close()


async def ask(worker: ProcessWorker, command: str) -> Any:
    [prediction] = await worker.predict([InferenceRequest({"body": command.encode()}, {}, "r")])
    return prediction.body  # what the handler returned, as the worker sent it


@pytest.fixture
def leftovers() -> Iterator[list[int]]:
    """Pids a test's handler started: killed at the end, whatever the test found."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def segments() -> Iterator[list[str]]:
    """Shared memory a test's handler made: unlinked at the end if it leaked."""
    names: list[str] = []
    yield names
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/dev/shm/{name.lstrip('/')}")


def shm_exists(name: str) -> bool:
    return Path(f"/dev/shm/{name.lstrip('/')}").exists()


@pytest.mark.parametrize("how", ["timed out", "stopped"])
def test_a_handlers_shared_memory_is_unlinked_when_its_worker_ends(
    how: str, worker_pool: WorkerPool, archive: Path, segments: list[str]
) -> None:
    """The zygote SIGKILLed the worker's whole process group at once, Python's multiprocessing
    resource tracker included, which unlinks the segments a handler left once the worker is
    gone: every timeout, crash, scale-down and stop leaked them in /dev/shm (64 MB in Docker).
    The worker dies first; the rest of its group gets SIGTERM, then SIGKILL after a grace."""

    async def scenario() -> None:
        async with backend(worker_pool, archive, response_timeout_s=1.0) as (_, worker):
            segments.append(await ask(worker, "shm"))
            assert shm_exists(segments[0])
            if how == "timed out":
                with pytest.raises(DeadlineExceeded):
                    await ask(worker, "hang")
                await asyncio.wait_for(asyncio.shield(worker.exited), 10)

    aio.run(scenario(), timeout=60)
    wait_until(lambda: not shm_exists(segments[0]), timeout=10)


def test_what_a_dead_worker_left_in_its_group_ends_within_a_grace_period(
    worker_pool: WorkerPool, archive: Path, leftovers: list[int]
) -> None:
    """SIGTERM first: a helper that ignores it is SIGKILLed after the grace period. A daemon
    in a session of its own is left alone while the server runs."""

    async def scenario() -> None:
        async with backend(worker_pool, archive) as (_, worker):
            leftovers.extend(await ask(worker, "helpers"))

    aio.run(scenario(), timeout=60)
    deaf, daemon = leftovers
    wait_until(lambda: not alive(deaf), timeout=5)
    assert alive(daemon)


@pytest.mark.parametrize("how", ["timed out", "crashed"])
def test_a_dead_workers_group_is_gone_before_its_exit_is_reported(
    how: str, worker_pool: WorkerPool, archive: Path, leftovers: list[int]
) -> None:
    """The zygote reported a worker's exit at once, and only then ended the rest of its group:
    the frontend's first restart (no backoff) forked the replacement while the old worker's
    helpers still held their port (EADDRINUSE in its `initialize`), a file lock or GPU
    memory, for up to the group's grace period. The exit is reported once they are gone."""

    timeout = 1.0 if how == "timed out" else 30.0

    async def scenario() -> None:
        async with backend(worker_pool, archive, response_timeout_s=timeout) as (_, worker):
            helper, port = await ask(worker, "listen")
            leftovers.append(helper)
            if how == "timed out":
                with pytest.raises(DeadlineExceeded):
                    await ask(worker, "hang")
            else:
                with pytest.raises(Exception, match="exit code 3"):
                    await ask(worker, "exit")
            await asyncio.wait_for(asyncio.shield(worker.exited), 10)
            assert not alive(helper)
            with socket.create_server(("127.0.0.1", port)):  # EADDRINUSE while it listens
                pass

    aio.run(scenario(), timeout=60)


def test_sigterm_stops_the_zygote_in_order(
    archive: Path, leftovers: list[int], tmp_path: Path
) -> None:
    """`kill -TERM` of the zygote (`pkill -f torchgate`, systemd stopping every process of
    the service) killed it outright: its shutdown never ran, and the daemons its workers had
    started went to init. It stops as when the frontend goes."""

    async def scenario() -> None:
        async with own_pool() as pool, backend(pool, archive) as (_, worker):
            leftovers.extend(await ask(worker, "helpers"))
            zygote = pool._zygote
            assert zygote is not None
            zygote.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(asyncio.to_thread(zygote.wait), 15) == 0
            await asyncio.wait_for(asyncio.shield(worker.exited), 5)

    aio.run(scenario(), timeout=60)
    for pid in leftovers:
        wait_until(lambda pid=pid: not alive(pid), timeout=5)


def test_a_daemon_printing_after_its_worker_exited_lives_on_and_is_logged(
    archive: Path,
    leftovers: list[int],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The frontend closed a worker's output pipe LOG_DRAIN_S after the worker's exit: a
    daemon the handler started (left alone while the server runs) died of SIGPIPE at its next
    line. The pipe is read until it ends; the zygote's stop ends the daemon, and the pipe."""
    monkeypatch.setattr(pool_module, "LOG_DRAIN_S", 0.1)

    async def scenario() -> None:
        async with own_pool() as pool:
            async with backend(pool, archive) as (_, worker):
                leftovers.append(await ask(worker, "late"))
            await asyncio.sleep(1.5)  # the worker is gone; the daemon has printed since
            assert alive(leftovers[0])
            assert pool._draining
        assert not pool._draining  # its pipe ended with it

    with caplog.at_level(logging.INFO, logger=output_module.worker_log.name):
        aio.run(scenario(), timeout=60)
    assert "[probe/1.0 w0] late-line-from-daemon" in [r.getMessage() for r in caplog.records]
    assert not alive(leftovers[0])


def test_a_handlers_stderr_is_logged_as_a_warning(
    worker_pool: WorkerPool, archive: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """TorchServe logs a worker's stderr at WARN: a traceback a handler printed there was
    logged at INFO, and dropped with --log-level warning."""

    async def scenario() -> None:
        async with backend(worker_pool, archive) as (_, worker):
            assert await ask(worker, "stderr") == "ok"

    with caplog.at_level(logging.INFO, logger=output_module.worker_log.name):
        aio.run(scenario(), timeout=60)
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert ("WARNING", "[probe/1.0 w0] Traceback-like line on stderr") in said


def test_the_directory_the_server_started_from_is_not_on_a_workers_path(
    archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m api.workers.zygote` put the launch directory (a Docker WORKDIR) first on
    `sys.path`, so its modules shadowed installed packages for every handler; TorchServe's
    worker drops its script's directory."""
    launch = tmp_path / "launch"
    launch.mkdir()
    (launch / "tg_launch_dir_probe.py").write_text("")
    monkeypatch.chdir(launch)

    async def scenario() -> bool:
        async with own_pool() as pool, backend(pool, archive) as (_, worker):
            found: bool = await ask(worker, "launch")
            return found

    assert aio.run(scenario(), timeout=60) is False


def test_a_workers_pythonpath_ends_with_the_model_directory(
    worker_pool: WorkerPool, archive: Path
) -> None:
    """TorchServe sets its workers' PYTHONPATH to `$PYTHONPATH:<model dir>:...`: a `python`
    the handler runs from another directory imports the archive's modules. Here the model
    directory was on the worker's `sys.path` only."""

    async def scenario() -> list[str]:
        async with backend(worker_pool, archive) as (_, worker):
            answer: list[str] = await ask(worker, "pythonpath")
            return answer

    value, pythonpath, model_dir = aio.run(scenario(), timeout=60)
    assert value == "from the archive"
    entries = pythonpath.split(os.pathsep)
    assert entries[-1] == model_dir
    assert entries[0] == str(Path(__file__).resolve().parents[2])  # torchgate's root first


def test_what_the_zygote_itself_prints_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The zygote wrote to the console's stdout and stderr directly, so its warnings (a
    preloaded module's, its own) missed the log handlers, TorchServe's ts_log.log among them.
    Its output is logged as a worker's is, to its last line at its stop."""
    (tmp_path / "noisy_preload.py").write_text(
        "import sys\n"
        "print('NOISY-PRELOAD on stdout', flush=True)\n"
        "print('WARNING noisy_preload: NOISY-PRELOAD on stderr', file=sys.stderr, flush=True)\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))

    async def scenario() -> None:
        pool = WorkerPool(preload=["noisy_preload"])
        pool.start()
        try:
            await asyncio.to_thread(
                wait_until,
                lambda: sum("NOISY-PRELOAD" in r.getMessage() for r in caplog.records) == 2,
            )
        finally:
            await pool.close()

    with caplog.at_level(logging.INFO, logger=output_module.worker_log.name):
        aio.run(scenario(), timeout=60)
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "NOISY" in r.getMessage()]
    assert sorted(said) == [
        ("INFO", "[zygote] NOISY-PRELOAD on stdout"),
        ("WARNING", "[zygote] WARNING noisy_preload: NOISY-PRELOAD on stderr"),
    ]


def test_a_zygote_output_pipe_that_ends_early_is_not_watched_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A preloaded module that points the zygote's stdout elsewhere ends that pipe while the
    zygote lives: an ended pipe is always readable, and the loop spun on it (one core)."""
    (tmp_path / "quiet_preload.py").write_text(
        "import os\nos.dup2(os.open(os.devnull, os.O_WRONLY), 1)\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))

    async def scenario() -> float:
        pool = WorkerPool(preload=["quiet_preload"])
        pool.start()
        try:
            await asyncio.sleep(1.0)  # the zygote is up, its stdout ended
            before = time.process_time()
            await asyncio.sleep(1.0)
            return time.process_time() - before
        finally:
            await pool.close()

    assert aio.run(scenario(), timeout=60) < 0.5  # spinning, it was the whole second
