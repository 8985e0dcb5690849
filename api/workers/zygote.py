"""The zygote: imports torch once, then forks every worker process the frontend asks for.

    python -m api.workers.zygote --control-fd FD [--cleanup DIR] [--preload torch,numpy,...]

Importing torch costs a worker 1-2 s and a few hundred MiB; forked from a parent that imported
it, every worker shares those pages copy-on-write and starts in milliseconds. The zygote only
imports: it never runs a torch operation or touches CUDA (a forked child cannot use a CUDA
context its parent created, and OpenMP pools do not survive a fork), and it freezes the garbage
collector's view of the preloaded objects so collections in the workers do not dirty the shared
pages.

Control protocol, over a SOCK_SEQPACKET socket (one message per packet, pickled):

    frontend -> zygote   ("spawn", request_id, WorkerSpec)  + fds [worker socket, stdout
                                                            pipe, stderr pipe (optional)]
                         ("kill", pid)
    zygote -> frontend   ("hello", pid)                    once preloading is done
                         ("spawned", request_id, pid)
                         ("exited", pid, returncode)       once its process group is gone
                                                            too; negative: killed by that signal

Lifetime: nothing outlives the frontend. When the control socket ends (the frontend exited or
was killed, even with SIGKILL), or the zygote gets SIGTERM (`pkill`, systemd stopping the
service's cgroup), it kills every worker, waits for them, ends what they started, removes the
`--cleanup` directory (the extracted archives) and exits; each worker also dies with the
zygote whatever it is doing. The processes a handler starts end with its worker or at the
latest with the zygote (`descendants`).

`sys.path`: `python -m` puts the directory the server was started from first on it; the zygote
drops that entry (its own root is importable through PYTHONPATH), as TorchServe's worker drops
its script's directory, so a `foo.py` there does not shadow an installed `foo` for handlers.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import logging
import os
import pickle
import select
import selectors
import shutil
import signal
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

from api.workers import descendants
from api.workers.spin import DEFAULT_SPIN_US

log = logging.getLogger("torchgate.zygote")

WORKER_EXIT_S = 5.0  # at shutdown; the frontend SIGKILLs a zygote that takes 10 s
GROUP_POLL_S = 0.05  # while an exited worker's group ends, how often it is looked at
DEFAULT_PRELOAD = ("torch", "numpy", "ts.torch_handler.base_handler", "onnxruntime", "PIL.Image")
# Modules that ask the GPU something when imported: TorchServe's base_handler reads the device's
# compute capability (and turns TF32 on) at import. One CUDA call here poisons every fork (torch
# refuses CUDA in the child of a process that used it), so with a GPU build of torch each worker
# imports these itself, as TorchServe's workers do.
QUERIES_GPU_AT_IMPORT = frozenset({"ts.torch_handler.base_handler"})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="torchgate-zygote")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--cleanup", default=None)
    parser.add_argument("--preload", default=",".join(DEFAULT_PRELOAD))
    parser.add_argument("--spin-us", type=int, default=DEFAULT_SPIN_US)
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ctrl-C reaches the whole foreground group: the frontend drains, then stops the workers.
    # SIGTERM (see `Zygote.run`) stops the zygote in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control = socket.socket(fileno=args.control_fd)
    control.setblocking(True)
    gc.disable()
    # Python >= 3.12 warns at every fork of a process with threads. The zygote's are idle ones
    # that numpy's OpenBLAS (which re-creates its pool in a forked child) and onnxruntime start
    # at import; the zygote runs no computation, so none holds a lock a child would inherit.
    warnings.filterwarnings(
        "ignore", r"This process \(pid=\d+\) is multi-threaded", DeprecationWarning
    )
    # TorchServe's base_handler logs what it does not find (OpenVINO, TensorRT) at import: that
    # is every worker's business, not a warning at every start.
    logging.getLogger().setLevel(logging.ERROR)
    for name in filter(None, args.preload.split(",")):
        if name in QUERIES_GPU_AT_IMPORT and gpu_build():
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:  # a missing optional package only costs its workers the import
            log.info("not preloading %s: %s", name, exc)
    logging.getLogger().setLevel(logging.INFO)
    if gpu_build() and sys.modules["torch"].cuda.is_initialized():
        log.warning("a preloaded module initialised CUDA: workers will fail to use the GPU")
    gc.freeze()
    Zygote(control, args.cleanup, spin=args.spin_us / 1e6).run()


def forget_launch_directory() -> None:
    """Drop the entry `python -m` put first on `sys.path`: the directory the server was started
    from (a Docker WORKDIR), whose modules would otherwise shadow installed packages in every
    worker. The zygote's own root comes from PYTHONPATH (`api.workers.pool`)."""
    if sys.flags.safe_path or not sys.path:
        return
    try:
        launched_from = os.getcwd()
    except OSError:  # removed since: nothing to import from it either
        launched_from = ""
    if sys.path[0] in ("", launched_from):
        del sys.path[0]


def gpu_build() -> bool:
    """Whether the torch imported so far is a CUDA or ROCm build (asks no device anything)."""
    torch = sys.modules.get("torch")
    return torch is not None and bool(torch.version.cuda or torch.version.hip)


class Zygote:
    def __init__(self, control: socket.socket, cleanup: str | None, *, spin: float) -> None:
        self._control = control
        self._cleanup = cleanup
        self._spin = spin  # what each worker polls for its next batch (wire.FrameReader)
        self._selector = selectors.DefaultSelector()
        self._children: dict[int, int] = {}  # pid -> pidfd
        # Workers that exited, left unreaped (their pids hold their groups' ids) and unreported
        # while the rest of their process groups end.
        self._ending: dict[int, _Ending] = {}
        self._stopping = False  # SIGTERM arrived
        # SIGCHLD wakes the selector: an adopted process (see `descendants`) that ends is
        # reaped then. Workers are not: each has its pidfd.
        self._sigchld_reader, self._sigchld_writer = socket.socketpair()
        self._sigchld_writer.setblocking(False)

    def run(self) -> None:
        descendants.become_subreaper()
        signal.set_wakeup_fd(self._sigchld_writer.fileno(), warn_on_full_buffer=False)
        # A handler that does nothing: SIGCHLD is ignored by default, and the wakeup fd only
        # hears of signals that have a Python handler.
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        # SIGTERM (`kill`, `pkill -f torchgate`, systemd stopping every process of the
        # service) runs the same shutdown as the end of the control socket: without it the
        # zygote died at once, and the daemons its workers started went to init.
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self._send(("hello", os.getpid()))
        self._selector.register(self._control, selectors.EVENT_READ)
        self._selector.register(self._sigchld_reader, selectors.EVENT_READ)
        try:
            while not self._stopping and self._serve_once():
                pass
        finally:
            self._shutdown()

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._stopping = True  # the wakeup fd ends the select under way

    def _known(self) -> set[int]:
        """The zygote's own children: workers alive, and exited ones not reaped yet."""
        return {*self._children, *self._ending}

    def _serve_once(self) -> bool:
        for key, _ in self._selector.select(GROUP_POLL_S if self._ending else None):
            if key.fileobj is self._control:
                if not self._on_control():
                    return False
            elif key.fileobj is self._sigchld_reader:
                self._sigchld_reader.recv(4096)
                descendants.reap_adopted(self._known())
            else:
                self._reap(key.data)
        self._end_groups()
        return True

    def _on_control(self) -> bool:
        try:
            data, fds, _, _ = socket.recv_fds(self._control, 1 << 20, 4)
        except ConnectionError:
            return False
        if not data:
            return False  # the frontend is gone
        message = pickle.loads(data)
        if message[0] == "spawn":
            _, request_id, spec = message
            pid = self._fork(spec, fds)
            self._send(("spawned", request_id, pid))
        elif message[0] == "kill":
            self._kill(message[1])
        for fd in fds if message[0] != "spawn" else ():
            os.close(fd)
        return True

    def _fork(self, spec: Any, fds: list[int]) -> int:
        data_fd, log_fd, *more = fds
        err_fd = more[0] if more else log_fd  # stderr in a pipe of its own: logged as WARNING
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                self._become_worker(spec, data_fd, log_fd, err_fd)
                code = 0
            except BaseException as exc:
                import traceback

                traceback.print_exc()  # also for sys.exit(): who ended the worker is worth a line
                if isinstance(exc, SystemExit):
                    code = _exit_status(exc)
            finally:
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(Exception):
                        stream.flush()
                os._exit(code)
        # Also here, not only in the child: the group must exist before a kill can target it.
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        self._children[pid] = pidfd
        self._selector.register(pidfd, selectors.EVENT_READ, pid)
        return pid

    def _become_worker(self, spec: Any, data_fd: int, log_fd: int, err_fd: int) -> None:
        """Runs in the forked child: detach from the zygote's state, then serve."""
        parent = os.getppid()
        descendants.die_with_parent(signal.SIGKILL)
        if os.getppid() != parent:  # the zygote died before the line above
            os._exit(1)
        descendants.lead_own_group()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self._selector.close()
        self._control.close()
        self._sigchld_reader.close()
        self._sigchld_writer.close()
        for pidfd in self._children.values():
            os.close(pidfd)
        os.dup2(log_fd, 1)
        os.dup2(err_fd, 2)
        for fd in {log_fd, err_fd}:
            os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        # A worker's signals are a Python process's defaults, as in TorchServe's worker; the
        # zygote's session keeps a terminal's Ctrl-C away from it.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        gc.enable()
        logging.basicConfig(
            level="INFO",
            stream=sys.stderr,
            format="%(levelname)s %(name)s: %(message)s",
            force=True,
        )
        from api.workers.main import run

        run(spec, socket.socket(fileno=data_fd), spin=self._spin)

    def _reap(self, pid: int) -> None:
        """The worker `pid` exited: start ending what it left in its group (`_end_groups`
        reports the exit once that is gone).

        The worker is reaped only once its group is gone: until then its zombie keeps its pid,
        the group's id, from being reused, so the group's SIGKILL cannot hit another process.
        The group gets SIGTERM first: a SIGKILL of the whole group at once also killed Python's
        multiprocessing resource tracker, which unlinks the shared memory a handler left
        (in /dev/shm) once its pipe ends, when the worker and its children are gone.
        """
        pidfd = self._children.pop(pid)
        self._selector.unregister(pidfd)
        os.close(pidfd)
        deadline = time.monotonic() + descendants.GROUP_GRACE_S
        self._ending[pid] = _Ending(descendants.exit_code(pid), deadline)
        descendants.signal_group(pid, signal.SIGTERM)

    def _end_groups(self, *, now: bool = False) -> None:
        """Reap and report the exited workers whose groups are gone: empty, or (`now`) killed.

        A group left past its grace period gets SIGKILL, and its worker is reported once the
        group is empty: the frontend starts a replacement on the report, which must not meet
        a port, a file lock or GPU memory still held by the old worker's helpers. A helper
        stuck in the kernel past `GROUP_KILLED_WAIT_S` holds the report up no longer.
        """
        if not self._ending:
            return
        clock = time.monotonic()
        known = self._known()
        for pid, ending in list(self._ending.items()):
            if not now and descendants.group_left(pid, known):
                if clock < ending.deadline:
                    continue
                if not ending.killed:
                    descendants.kill_group(pid)
                    ending.killed = True
                    continue  # dying: looked at again at the next turn
                if clock < ending.deadline + descendants.GROUP_KILLED_WAIT_S:
                    continue
            # One that joined the group from elsewhere (not seen by `group_left`) goes too.
            descendants.kill_group(pid)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            del self._ending[pid]
            self._send(("exited", pid, ending.code))

    def _kill(self, pid: int) -> None:
        """SIGKILL the worker, and SIGTERM the rest of its group: its helpers end with it, also
        while it is stuck in the kernel (Python's resource tracker ignores SIGTERM, and outlives
        it long enough to unlink its shared memory). Once it is gone, the group is ended and
        the exit reported (`_reap`, `_end_groups`)."""
        pidfd = self._children.get(pid)
        if pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            descendants.signal_group(pid, signal.SIGTERM)  # not reaped: its pid is its group's

    def _send(self, message: tuple[Any, ...]) -> None:
        # OSError: the frontend is gone; the loop sees the end of the socket next.
        with contextlib.suppress(OSError):
            self._control.send(pickle.dumps(message))

    def _shutdown(self) -> None:
        try:
            for pid in list(self._children):
                self._kill(pid)
            self._wait_for_workers(WORKER_EXIT_S)
            # What the workers left is adopted by now: their groups' members and daemons get
            # SIGTERM, then SIGKILL. The workers stay known (unreaped, or stuck in the kernel),
            # so they are not signalled again.
            descendants.end_adopted(self._known())
            self._end_groups(now=True)
            for pid in self._children:  # stuck in the kernel: its pid still names its group
                descendants.kill_group(pid)
        finally:
            if self._cleanup:
                shutil.rmtree(self._cleanup, ignore_errors=True)

    def _wait_for_workers(self, seconds: float) -> None:
        """Wait for the killed workers to exit, at most `seconds` in all: a SIGKILLed process
        stuck in the kernel (a driver's teardown, NFS) must not hold up the rest. Each that
        exits has its group SIGTERMed (`_reap`), and is reported once that ends."""
        deadline = time.monotonic() + seconds
        for pid, pidfd in list(self._children.items()):
            exited = select.poll()
            exited.register(pidfd, select.POLLIN)
            if exited.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                self._reap(pid)


@dataclass(slots=True)
class _Ending:
    """An exited worker whose process group is ending."""

    code: int  # how it exited (`descendants.exit_code`), reported once the group is gone
    deadline: float  # when the group gets SIGKILL, if anything is left in it
    killed: bool = False  # the group has had its SIGKILL


def _exit_status(exc: SystemExit) -> int:
    """The status Python itself exits with for `exc`: its code when an int, 0 for None, else 1
    (sys.exit("message"))."""
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 1


if __name__ == "__main__":
    forget_launch_directory()
    main()
