"""The worker pool's reading of its zygote's reports, against a stand-in for the zygote: the
order of reports tested here cannot be produced on demand by a real one."""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

import api.workers.output as output_module
import api.workers.pool as pool_module
from api.workers.pool import WorkerPool, WorkerProcess
from tests.support import aio


@asynccontextmanager
async def stand_in_zygote() -> AsyncIterator[tuple[WorkerPool, socket.socket]]:
    """A started pool whose zygote is the socket given: `launch` starts none, and the test
    reads the pool's requests from it and sends the zygote's reports on it."""
    ours, zygote = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    zygote.settimeout(2.0)
    pool = WorkerPool()
    pool._control = ours
    pool.start()
    try:
        yield pool, zygote
    finally:
        pool._detach()
        ours.close()
        zygote.close()


async def spawn_asked(zygote: socket.socket) -> int:
    """The request id of the spawn the pool asked for; the worker's socket and log it sent
    are closed, as a worker gone at once."""
    message, fds, _, _ = await asyncio.to_thread(socket.recv_fds, zygote, 65536, 2)
    for fd in fds:
        socket.close(fd)
    _, request_id, _ = pickle.loads(message)
    return int(request_id)


def test_a_worker_reported_exited_with_its_spawn_still_knows_how_it_ended() -> None:
    """A worker that dies at once can be reported spawned and exited in one turn of the loop,
    before `spawn` registers it: its exit status was dropped, and its death was noticed only
    seconds later, as "exit status unknown"."""

    async def scenario() -> None:
        async with stand_in_zygote() as (pool, zygote):
            spawning = asyncio.ensure_future(pool.spawn({"spec": None}, label="m/1.0"))
            request_id = await spawn_asked(zygote)
            # Both reports before the loop reads either: no await between the two sends.
            zygote.send(pickle.dumps(("spawned", request_id, 4242)))
            zygote.send(pickle.dumps(("exited", 4242, 3)))
            process = await spawning
            assert await asyncio.wait_for(process.exited, 1) == "exit code 3"

    aio.run(scenario(), timeout=10)


@pytest.mark.parametrize("how", ["cancelled", "failed"])
def test_a_spawn_given_up_while_connecting_kills_its_worker(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while it connects to the forked worker (its slot scaled away mid-start, a
    DELETE, a gRPC deadline), or failing there, `spawn` kills the worker: it ran, holding its
    memory and maybe a GPU, until the pool closed."""
    connecting = asyncio.Event()

    async def connect(self: WorkerProcess, sock: socket.socket, *log_fds: int) -> None:
        sock.close()
        for fd in log_fds:
            os.close(fd)
        connecting.set()
        if how == "failed":
            raise OSError("connection refused")
        await asyncio.Event().wait()

    monkeypatch.setattr(WorkerProcess, "connect", connect)

    async def scenario() -> None:
        async with stand_in_zygote() as (pool, zygote):
            spawning = asyncio.ensure_future(pool.spawn({"spec": None}, label="m/1.0"))
            zygote.send(pickle.dumps(("spawned", await spawn_asked(zygote), 4242)))
            await connecting.wait()
            spawning.cancel()
            with pytest.raises((asyncio.CancelledError, OSError)):
                await spawning
            said: Any = pickle.loads(await asyncio.to_thread(zygote.recv, 65536))
            assert said == ("kill", 4242)

    aio.run(scenario(), timeout=10)


def test_a_connection_that_fails_closes_both_descriptors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The socket to the worker and its log pipe are the connection's to close until their
    transports own them: a cancel or failure there left them open until collected."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()

        async def refuse(*args: Any, **kwargs: Any) -> Any:
            raise OSError("refused")

        monkeypatch.setattr(loop, "create_unix_connection", refuse)
        ours, theirs = socket.socketpair()
        log_read, log_write = os.pipe()
        async with stand_in_zygote() as (pool, _):
            process = WorkerProcess(4242, "m/1.0", pool)
            with pytest.raises(OSError, match="refused"):
                await process.connect(ours, log_read)
        assert ours.fileno() == -1
        with pytest.raises(OSError):
            os.fstat(log_read)
        theirs.close()
        os.close(log_write)

    aio.run(scenario(), timeout=10)


def test_a_connection_cancelled_while_connecting_its_pipes_closes_every_descriptor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cancelled while its stdout pipe connected (a scale-down or a DELETE while the worker
    starts), the connection left the stderr pipe open for good: asyncio closes the pipe it
    was connecting, but the other was a bare descriptor nothing would ever close."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        connect_read_pipe = loop.connect_read_pipe

        async def cancelled_meanwhile(*args: Any) -> Any:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()  # lands on the await inside: the loop's own clean-up runs
            return await connect_read_pipe(*args)

        monkeypatch.setattr(loop, "connect_read_pipe", cancelled_meanwhile)
        async with stand_in_zygote() as (pool, _):
            before = set(os.listdir("/proc/self/fd"))
            ours, theirs = socket.socketpair()
            out_read, out_write = os.pipe()
            err_read, err_write = os.pipe()
            process = WorkerProcess(4242, "m/1.0", pool)
            with pytest.raises(asyncio.CancelledError):
                await process.connect(ours, out_read, err_read)
            process.exit_reported(-9)  # `spawn` kills the worker: its socket closes then
            await asyncio.sleep(0.05)  # the transports' clean-up
            for fd in (out_read, err_read):
                with pytest.raises(OSError):
                    os.fstat(fd)
            for fd in (theirs.detach(), out_write, err_write):
                os.close(fd)
            assert set(os.listdir("/proc/self/fd")) == before

    aio.run(scenario(), timeout=10)


def test_a_worker_flooding_its_output_is_logged_within_a_budget(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each line is logged on the event loop: a handler printing in a loop took seconds of it
    per second from every model. Past the budget lines are counted, not logged."""
    clock = [1000.0]
    monkeypatch.setattr(output_module.time, "monotonic", lambda: clock[0])
    lines = output_module.LogLines("m/1.0 w0")
    with caplog.at_level(logging.INFO, logger=output_module.worker_log.name):
        lines.data_received(b"line\n" * (output_module.LOG_BURST + 500))
        lines.data_received(b"more\n" * 1000)  # no time has passed: not even split
        assert len(caplog.records) == output_module.LOG_BURST
        clock[0] += 1.0  # a second's allowance
        lines.data_received(b"later\n")
    said = [r.getMessage() for r in caplog.records[output_module.LOG_BURST :]]
    assert said == [
        "[m/1.0 w0] 1500 lines of its output dropped: over 5000 lines a second",
        "[m/1.0 w0] later",
    ]


def test_a_dead_workers_output_pipe_is_read_until_it_ends(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon a handler started keeps the pipe's write end after the worker died, and prints
    on: the pipe was closed LOG_DRAIN_S after the worker's exit, and the daemon died of
    SIGPIPE at its next line. It is read until it ends, as TorchServe reads it."""
    monkeypatch.setattr(pool_module, "LOG_DRAIN_S", 0.05)

    async def scenario() -> None:
        ours, theirs = socket.socketpair()
        log_read, log_write = os.pipe()  # log_write: held by the "daemon"
        async with stand_in_zygote() as (pool, _):
            process = WorkerProcess(4242, "m/1.0", pool)
            await process.connect(ours, log_read)
            process.exit_reported(0)
            await asyncio.sleep(0.2)
            os.write(log_write, b"still here\n")  # BrokenPipeError once it was closed
            await asyncio.sleep(0.1)
            os.close(log_write)  # the daemon ends: so does the pipe, and its reading
            await asyncio.sleep(0.1)
            with pytest.raises(OSError):
                os.fstat(log_read)
            assert not pool._draining
        theirs.close()

    with caplog.at_level(logging.INFO, logger=output_module.worker_log.name):
        aio.run(scenario(), timeout=10)
    assert "[m/1.0] still here" in [r.getMessage() for r in caplog.records]


def test_output_pipes_still_held_once_the_zygote_is_gone_are_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A daemon handed to init (its zygote was killed) may hold a pipe for ever: its reading
    ends LOG_DRAIN_S after the zygote is gone, not never."""
    monkeypatch.setattr(pool_module, "LOG_DRAIN_S", 0.05)

    async def scenario() -> None:
        ours, theirs = socket.socketpair()
        log_read, log_write = os.pipe()  # log_write: held by the "daemon", never closed
        async with stand_in_zygote() as (pool, zygote):
            pool._zygote = None  # no process to ask how it ended
            process = WorkerProcess(4242, "m/1.0", pool)
            pool._workers[4242] = process
            await process.connect(ours, log_read)
            zygote.close()  # the zygote is gone: its workers with it
            await asyncio.wait_for(asyncio.shield(process.exited), 5)
            await asyncio.sleep(0.01)
            os.fstat(log_read)  # still read: a line may be on its way
            await asyncio.sleep(0.2)
            with pytest.raises(OSError):
                os.fstat(log_read)
        theirs.close()
        os.close(log_write)

    aio.run(scenario(), timeout=10)


def test_a_workers_stderr_is_logged_as_warnings(caplog: pytest.LogCaptureFixture) -> None:
    """TorchServe logs a worker's stderr at WARN and its stdout at INFO: a traceback printed
    to stderr was logged at INFO (dropped with --log-level warning). The worker's own logging
    writes `LEVEL name: message` to stderr, and keeps its level."""
    out = output_module.LogLines("m/1.0 w0")
    err = output_module.LogLines("m/1.0 w0", stderr=True)
    with caplog.at_level(logging.DEBUG, logger=output_module.worker_log.name):
        out.data_received(b"printed\nWARNING from print\n")
        err.data_received(b"Traceback (most recent call last):\nINFO api.workers.main: up\n")
        err.data_received(b"ERROR x: boom\n")
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert said == [
        ("INFO", "[m/1.0 w0] printed"),
        ("WARNING", "[m/1.0 w0] WARNING from print"),
        ("WARNING", "[m/1.0 w0] Traceback (most recent call last):"),
        ("INFO", "[m/1.0 w0] INFO api.workers.main: up"),
        ("ERROR", "[m/1.0 w0] ERROR x: boom"),
    ]


def test_a_killed_worker_that_never_reports_its_exit_is_given_up_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a timeout kill, nothing bounded the wait for the zygote's exit report: a process
    that survives SIGKILL (stuck in the kernel) or a lost kill message left the call waiting
    behind the timed-out one unanswered for ever, and the worker's slot never replaced."""
    monkeypatch.setattr(pool_module, "EXIT_REPORT_WAIT_S", 0.05)
    monkeypatch.setattr(pool_module, "KILLED_EXIT_WAIT_S", 0.1)

    async def scenario() -> None:
        ours, theirs = socket.socketpair()  # theirs: a worker that never answers
        log_read, log_write = os.pipe()
        async with stand_in_zygote() as (pool, zygote):  # it reports no exit, ever
            process = WorkerProcess(4242, "m/1.0", pool)
            await process.connect(ours, log_read)
            running = asyncio.ensure_future(process.call(("batch", []), 0.05))
            waiting = asyncio.ensure_future(process.call(("batch", []), 60))
            with pytest.raises(TimeoutError):
                await running
            assert pickle.loads(await asyncio.to_thread(zygote.recv, 65536)) == ("kill", 4242)
            with pytest.raises(pool_module.NotStarted):
                await asyncio.wait_for(waiting, 5)
            assert process.exited.result() == "exit status unknown"
        theirs.close()
        os.close(log_write)

    aio.run(scenario(), timeout=10)


def test_a_killed_worker_still_dying_is_not_given_up_on_until_its_socket_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Killed, its socket still open: the process may take seconds to die (a large CUDA one),
    and declaring it gone would start its replacement beside its memory. Once the socket
    closes, its exit report is due within EXIT_REPORT_WAIT_S."""
    monkeypatch.setattr(pool_module, "EXIT_REPORT_WAIT_S", 0.05)
    monkeypatch.setattr(pool_module, "KILLED_EXIT_WAIT_S", 30.0)

    async def scenario() -> None:
        ours, theirs = socket.socketpair()
        log_read, log_write = os.pipe()
        async with stand_in_zygote() as (pool, _zygote):  # it reports no exit, ever
            process = WorkerProcess(4242, "m/1.0", pool)
            await process.connect(ours, log_read)
            process.kill()
            await asyncio.sleep(0.3)
            assert not process.exited.done()  # still dying, as far as anyone knows
            theirs.close()  # it died: its socket closed
            await asyncio.wait_for(asyncio.shield(process.exited), 5)
            assert process.exited.result() == "exit status unknown"
        os.close(log_write)

    aio.run(scenario(), timeout=10)


def test_output_pipes_of_exited_workers_are_read_on_within_a_bound(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Each restart of a handler that starts a daemon left two pipes read for as long as the
    daemon lived; now the oldest beyond `MAX_DRAINING` is closed, with a warning."""
    monkeypatch.setattr(pool_module, "MAX_DRAINING", 2)

    async def scenario() -> list[bool]:
        loop = asyncio.get_running_loop()
        pool = WorkerPool()
        pipes, writers = [], []
        for index in range(3):
            read_end, write_end = os.pipe()
            writers.append(write_end)
            lines = output_module.LogLines(f"m/1.0 w{index}", on_closed=pool.drained)
            await loop.connect_read_pipe(lambda: lines, os.fdopen(read_end, "rb", buffering=0))  # noqa: B023
            pipes.append(lines)
            pool.drain(lines)
        closed = [lines.closed for lines in pipes]
        for lines in pipes:
            lines.close()
        for write_end in writers:
            os.close(write_end)
        return closed

    with caplog.at_level(logging.WARNING, logger=pool_module.log.name):
        assert aio.run(scenario(), timeout=10) == [True, False, False]
    assert "closing the oldest (m/1.0 w0)" in caplog.text
