"""Running instances: one pid file per config, locked with flock while its server runs.

TorchServe keeps one pid file (`$TMPDIR/.model_server.pid`), so a second server on the same
machine cannot start even with another config and other ports. Here the pid file is named
after the config the instance runs (`$TMPDIR/torchgate-<hash>.pid`), and the serving process
holds an exclusive flock on it for its whole life: the kernel drops the lock when the process
dies, however it dies, so a stale file is recognised by taking the lock, never by guessing
from a pid that may have been reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PREFIX = "torchgate-"


def instance_key(config_path: Path | None) -> str:
    """What names an instance: its config file, or the working directory without one."""
    return str(config_path.resolve()) if config_path is not None else f"cwd:{Path.cwd()}"


def pid_file(key: str) -> Path:
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"{PREFIX}{digest}.pid"


class AlreadyRunning(RuntimeError):
    def __init__(self, pid: int | None) -> None:
        super().__init__(
            f"already running with this config (pid {pid}); stop it with `torchgate stop`"
        )


@dataclass
class Instance:
    path: Path
    pid: int
    key: str


class InstanceLock:
    """Held by the serving process; `acquire` fails while another process serves `key`."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.path = pid_file(key)
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read(fd)[0]
            os.close(fd)
            raise AlreadyRunning(pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n{self.key}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self._fd)
            self._fd = None


def is_running(key: str) -> int | None:
    """The pid serving `key`, or None."""
    found = running(key)
    return found[0].pid if found else None


def running(key: str | None = None) -> list[Instance]:
    """Instances alive now (all of this machine's when `key` is None); stale files go."""
    paths = [pid_file(key)] if key is not None else sorted(_all_files())
    return list(_locked([p for p in paths if p.exists()]))


def stop(instance: Instance, timeout_s: float) -> bool:
    """SIGTERM (the server finishes accepted requests), then wait for the lock to drop."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(instance.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _held(instance.path):
            with contextlib.suppress(OSError):
                instance.path.unlink()
            return True
        time.sleep(0.05)
    return False


def _all_files() -> Iterator[Path]:
    return Path(tempfile.gettempdir()).glob(f"{PREFIX}*.pid")


def _locked(paths: list[Path]) -> Iterator[Instance]:
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, key = _read(fd)
            if pid:
                yield Instance(path, pid, key)
        else:  # nobody holds it: the server died without cleaning up
            with contextlib.suppress(OSError):
                path.unlink()
        finally:
            os.close(fd)


def _held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _read(fd: int) -> tuple[int, str]:
    lines = os.pread(fd, 4096, 0).decode(errors="replace").splitlines()
    pid = int(lines[0]) if lines and lines[0].strip().isdigit() else 0
    return pid, lines[1] if len(lines) > 1 else ""
