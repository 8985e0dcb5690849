"""The worker pool's reading of its zygote's reports, against a stand-in for the zygote: the
order of reports tested here cannot be produced on demand by a real one."""

from __future__ import annotations

import asyncio
import pickle
import socket

from api.workers.pool import WorkerPool
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
