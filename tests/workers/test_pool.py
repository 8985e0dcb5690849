"""The worker pool's reading of its zygote's reports, against a stand-in for the zygote: the
order of reports tested here cannot be produced on demand by a real one."""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
from typing import Any

import pytest

from api.workers.pool import WorkerPool, WorkerProcess
from tests.support import aio


def test_a_worker_reported_exited_with_its_spawn_still_knows_how_it_ended() -> None:
    """A worker that dies at once can be reported spawned and exited in one turn of the loop,
    before `spawn` registers it: its exit status was dropped, and its death was noticed only
    seconds later, as "exit status unknown"."""

    async def scenario() -> None:
        ours, zygote = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        pool = WorkerPool()
        pool._control = ours  # the stand-in takes the zygote's place: `launch` starts none
        pool.start()
        try:
            spawning = asyncio.ensure_future(pool.spawn({"spec": None}, label="m/1.0"))
            message, fds, _, _ = await asyncio.to_thread(socket.recv_fds, zygote, 65536, 2)
            for fd in fds:
                socket.close(fd)  # the worker's socket and log: it is gone at once
            _, request_id, _ = pickle.loads(message)
            # Both reports before the loop reads either: no await between the two sends.
            zygote.send(pickle.dumps(("spawned", request_id, 4242)))
            zygote.send(pickle.dumps(("exited", 4242, 3)))
            process = await spawning
            assert await asyncio.wait_for(process.exited, 1) == "exit code 3"
        finally:
            pool._detach()
            ours.close()
            zygote.close()

    aio.run(scenario(), timeout=10)


@pytest.mark.parametrize("how", ["cancelled", "failed"])
def test_a_spawn_given_up_while_connecting_kills_its_worker(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while it connects to the forked worker (its slot scaled away mid-start, a
    DELETE, a gRPC deadline), or failing there, `spawn` kills the worker: it ran, holding its
    memory and maybe a GPU, until the pool closed."""
    connecting = asyncio.Event()

    async def connect(self: WorkerProcess, sock: socket.socket, log_fd: int) -> None:
        sock.close()
        os.close(log_fd)
        connecting.set()
        if how == "failed":
            raise OSError("connection refused")
        await asyncio.Event().wait()

    monkeypatch.setattr(WorkerProcess, "connect", connect)

    async def scenario() -> None:
        ours, zygote = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        zygote.settimeout(2.0)
        pool = WorkerPool()
        pool._control = ours  # the stand-in takes the zygote's place: `launch` starts none
        pool.start()
        try:
            spawning = asyncio.ensure_future(pool.spawn({"spec": None}, label="m/1.0"))
            message, fds, _, _ = await asyncio.to_thread(socket.recv_fds, zygote, 65536, 2)
            for fd in fds:
                socket.close(fd)
            _, request_id, _ = pickle.loads(message)
            zygote.send(pickle.dumps(("spawned", request_id, 4242)))
            await connecting.wait()
            spawning.cancel()
            with pytest.raises((asyncio.CancelledError, OSError)):
                await spawning
            said: Any = pickle.loads(await asyncio.to_thread(zygote.recv, 65536))
            assert said == ("kill", 4242)
        finally:
            pool._detach()
            ours.close()
            zygote.close()

    aio.run(scenario(), timeout=10)


def test_a_connection_that_fails_closes_both_descriptors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The socket to the worker and its log pipe are the connection's to close until their
    transports own them: a cancel or failure there left them open until collected."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()

        async def refuse(*args: Any, **kwargs: Any) -> Any:
            raise OSError("refused")

        monkeypatch.setattr(loop, "create_unix_connection", refuse)
        control, zygote = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        control.setblocking(False)
        pool = WorkerPool()
        pool._control = control  # a stand-in for the zygote, as above: `launch` starts none
        pool.start()
        ours, theirs = socket.socketpair()
        log_read, log_write = os.pipe()
        try:
            process = WorkerProcess(4242, "m/1.0", pool)
            with pytest.raises(OSError, match="refused"):
                await process.connect(ours, log_read)
            assert ours.fileno() == -1
            with pytest.raises(OSError):
                os.fstat(log_read)
        finally:
            pool._detach()
            for sock in (control, zygote, theirs):
                sock.close()
            os.close(log_write)

    aio.run(scenario(), timeout=10)
