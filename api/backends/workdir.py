"""The temporary folder a server extracts its archives into, and the ones killed servers left.

Each server extracts into `<tmp>/torchgate-models-<pid>-<random>`, named after its own
process. Its zygote removes the folder when the server exits, even by `kill -9`; if the zygote
was killed too (a `kill -9` of the process group, the OOM killer, a reboot of a container
without a fresh /tmp) the extracted archives stay, tens to hundreds of MB per model.

So at start a server removes the folders whose owner is dead, and only those: a folder whose
pid is alive belongs to another server on the same machine (or to this one). A pid reused by
a later process is told apart by its start time: the owner started before it last wrote its
folder, a process that reused the pid started after. Anything unsure (no /proc, a folder of
another user) is left alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "torchgate-models-"
_OWNED = re.compile(rf"{PREFIX}(\d+)-[^/]+")
# /proc's start times are in clock ticks after a boot time in whole seconds.
_CLOCK_SLACK_S = 1.0


def make_work_dir(parent: Path | None = None) -> Path:
    """A new private folder for this server's extracted archives, named after its pid."""
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent))


def remove_orphans(parent: Path | None = None) -> list[Path]:
    """Remove the work folders of servers that are no longer running; the ones removed."""
    root = Path(parent or tempfile.gettempdir())
    removed = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return []
    for entry in entries:
        match = _OWNED.fullmatch(entry.name)
        if match is None:
            continue
        try:
            info = entry.lstat()
        except OSError:
            continue
        if not entry.is_dir() or entry.is_symlink() or info.st_uid != os.getuid():
            continue
        if _owner_alive(int(match.group(1)), info.st_mtime):
            continue
        size = _size(entry)
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            log.info("removed %s (%d MB) left by a server that is gone", entry, size >> 20)
            removed.append(entry)
    return removed


def _owner_alive(pid: int, written_at: float) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's: not ours to judge
    started = _start_time(pid)
    if started is None:
        return True  # cannot tell a reused pid apart: keep the folder
    return started <= written_at + _CLOCK_SLACK_S


def _start_time(pid: int) -> float | None:
    """When process `pid` started (epoch seconds), from /proc; None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, IndexError, StopIteration, ValueError):
        return None
    # Field 22 of /proc/PID/stat, the 20th after the ")" that closes the command name.
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _size(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):  # removed meanwhile
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total
