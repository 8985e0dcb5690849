"""The processes below the zygote: workers die with it, and what handlers start dies too.

Handlers start helper processes: a `subprocess` for a tokenizer or a converter, a
`multiprocessing` pool, now and then a daemon in a session of its own. Killing a worker does not
kill them, so a worker killed at its `responseTimeout` or crashed would leave them running,
one more set at every restart, and after the server stopped. Three mechanisms, all Linux's:

- Each worker has PR_SET_PDEATHSIG=SIGKILL: it dies with the zygote whatever it is doing.
- Each worker leads its own process group, and once the worker is gone the zygote ends the
  rest of the group: whatever the handler started and left in it (`subprocess` and
  `multiprocessing` children do, by default) ends with the worker, whichever way it ends. The
  group gets SIGTERM (with the worker's SIGKILL, when it is killed; once it exited, when it
  crashed) and, once the worker is gone, SIGKILL after at most `GROUP_GRACE_S`: Python's
  multiprocessing resource tracker, which ignores SIGTERM, unlinks the shared memory a handler
  left once the worker and its children are gone (its pipe ends), instead of leaking it in
  /dev/shm. The worker's exit is reported only once its group is empty (or, if a process in
  it is stuck in the kernel, `GROUP_KILLED_WAIT_S` after the SIGKILL), so the replacement the
  frontend starts then does not meet a port, a file lock or GPU memory its helpers still held.
- The zygote is a child subreaper (PR_SET_CHILD_SUBREAPER): a process orphaned below it, such
  as a daemon that left the group with `setsid` and whose worker has gone, becomes the
  zygote's child instead of init's. The zygote reaps those that exit while it serves, and ends
  every one left when it shuts down. It cannot tell which worker started such a process, so
  while the server runs it leaves them alone: they may still serve a live worker.

If the zygote itself is killed (SIGKILL, the OOM killer), its workers still die, but the
helpers they started do not; the frontend then kills the workers' process groups
(`api.workers.pool`), which ends those left in them. Daemons in a session of their own are
then handed to init.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import time
from collections.abc import Collection

log = logging.getLogger("torchgate.zygote")

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
TERM_GRACE_S = 1.0  # adopted processes get SIGTERM first, then SIGKILL after this long
# After a worker is gone, the rest of its group gets SIGTERM, then SIGKILL at the latest after
# this long (earlier once the group is empty).
GROUP_GRACE_S = 1.5
# After that SIGKILL, how long the worker's exit report waits for the group to be gone: a
# process stuck in the kernel (a driver's teardown) dies only when it leaves it.
GROUP_KILLED_WAIT_S = 1.5
SHUTDOWN_S = 3.0  # at most this long ending adopted processes when the zygote stops


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, value, 0, 0, 0)) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def become_subreaper() -> None:
    """Adopt this process's orphaned descendants (Linux >= 3.4)."""
    if not _prctl(PR_SET_CHILD_SUBREAPER, 1):
        log.warning(
            "cannot become a child subreaper: daemons that handlers start in a session of "
            "their own may outlive the server"
        )


def die_with_parent(sig: signal.Signals) -> None:
    """Deliver `sig` to this process when its parent exits (a no-op outside Linux, where the
    zygote's shutdown still kills its workers)."""
    _prctl(PR_SET_PDEATHSIG, int(sig))


def lead_own_group() -> None:
    """In a new worker: start a process group that the worker's helpers inherit."""
    with contextlib.suppress(PermissionError):  # only a session leader cannot; no worker is
        os.setpgid(0, 0)


def kill_group(leader: int) -> None:
    """SIGKILL the process group `leader` leads: a worker and the helpers it left in it.

    Safe while `leader` is not yet reaped (alive or a zombie), and while any process is left
    in its group: until then its pid, hence the group's id, cannot be reused.
    """
    signal_group(leader, signal.SIGKILL)


def signal_group(leader: int, sig: signal.Signals) -> None:
    """Send `sig` to the process group `leader` leads (see `kill_group` for when it is safe)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(leader, sig)


def exit_code(pid: int) -> int:
    """How the exited child `pid` ended, as `os.waitstatus_to_exitcode` says it (negative: the
    signal that killed it), without reaping it: its zombie keeps its pid, hence its process
    group's id, from being reused."""
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    if info is None:  # not exited after all (waitid without WNOHANG does not return so)
        raise ChildProcessError(pid)
    if info.si_code == os.CLD_EXITED:
        return int(info.si_status)
    return -int(info.si_status)


def group_left(leader: int, known: Collection[int]) -> bool:
    """Whether a live process is left in the group of the exited worker `leader`.

    Looks at the adopted processes only: when the worker died, what it started was handed to
    this subreaper, and what those started in turn is below them (it dies, or is adopted, with
    them). A process that joined the group from elsewhere is missed here, and still killed with
    the group when the grace period ends."""
    for pid in adopted(known):
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if fields[0] != b"Z" and int(fields[2]) == leader:
            return True
    return False


def adopted(known: Collection[int]) -> list[int]:
    """This process's children other than `known` (the workers it forked itself): the
    zygote starts nothing else, so the rest were adopted."""
    try:
        return [pid for pid in _children() if pid not in known]
    except OSError:  # no procfs (a sandbox): nothing to adopt from either
        return []


def _children() -> list[int]:
    children: list[int] = []
    try:  # the kernel's own list (CONFIG_PROC_CHILDREN): cheap however busy the host
        for task in os.scandir("/proc/self/task"):
            with open(os.path.join(task.path, "children"), "rb") as listed:
                children += map(int, listed.read().split())
        return children
    except FileNotFoundError:
        pass
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
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
    """SIGTERM every adopted process, SIGKILL what is left after `TERM_GRACE_S`, and reap
    them all, also those that their deaths orphan in turn.

    Gives up after `SHUTDOWN_S`: a process stuck in the kernel dies when it leaves it, and
    init (or the nearest subreaper) reaps it if the zygote has exited by then.
    """
    started = time.monotonic()
    asked: set[int] = set()
    while orphans := adopted(known):
        waited = time.monotonic() - started
        for pid in orphans:
            if waited >= TERM_GRACE_S:
                _signal(pid, signal.SIGKILL)
            elif pid not in asked:  # a daemon may want to remove its shared memory, its files
                _signal(pid, signal.SIGTERM)
                asked.add(pid)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        if waited >= SHUTDOWN_S:
            return
        time.sleep(0.01)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
