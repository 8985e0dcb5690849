"""What a handler starts ends with its worker, and nothing it starts outlives the server.

Handlers start helper processes: a `subprocess` for a tokenizer or a converter, a
`multiprocessing` pool, now and then a daemon in a session of its own. Killing a worker does not
kill them, so a worker killed at its `responseTimeout` or crashed would leave them running,
one more set at every restart, and after the server stopped. Two mechanisms, both Linux's:

- Each worker leads its own process group, and the zygote signals the group, not the worker
  alone: whatever the handler started and left in that group (`subprocess` and
  `multiprocessing` children do, by default) ends with the worker, whichever way it ends.
- The zygote is a child subreaper (PR_SET_CHILD_SUBREAPER): a process orphaned below it, such
  as a daemon that left the group with `setsid` and whose worker has gone, becomes the
  zygote's child instead of init's. The zygote reaps those that exit while it serves, and ends
  every one left when it shuts down. It cannot tell which worker started such a process, so
  while the server runs it leaves them alone: they may still serve a live worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Collection

PR_SET_CHILD_SUBREAPER = 36
SHUTDOWN_S = 2.0  # at most this long ending adopted processes when the zygote stops


def become_subreaper() -> bool:
    """Adopt this process's orphaned descendants (Linux >= 3.4); False where it cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def lead_own_group() -> None:
    """In a new worker: start a process group that the worker's helpers inherit."""
    with contextlib.suppress(OSError):  # already a group leader
        os.setpgid(0, 0)


def kill_group(leader: int) -> None:
    """SIGKILL the process group `leader` leads: a worker and the helpers it left in it.

    Safe while `leader` is not yet reaped (alive or a zombie): its pid, hence the group's id,
    cannot be reused until then.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(leader, signal.SIGKILL)


def adopted(known: Collection[int]) -> list[int]:
    """This process's children other than `known` (the workers it forked itself)."""
    me = os.getpid()
    children = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in known:
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == me:
            children.append(int(entry.name))
    return children


def reap_adopted(known: Collection[int]) -> None:
    """Collect the exit status of every adopted process that has ended (no zombies stay)."""
    for pid in adopted(known):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def end_adopted(known: Collection[int]) -> None:
    """SIGKILL and reap every adopted process, and those that their deaths orphan in turn.

    Gives up after a few seconds (a process stuck in the kernel dies when it leaves it; if
    the zygote has exited by then, init reaps it).
    """
    deadline = time.monotonic() + SHUTDOWN_S
    while orphans := adopted(known):
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        if time.monotonic() >= deadline:
            return
        time.sleep(0.01)
