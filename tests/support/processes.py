"""Watching processes from a test: liveness (zombies count as gone), parents, descendants,
the process table, polling."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def _fields(stat: Path) -> list[str]:
    """A /proc/<pid>/stat after the command name (which may hold spaces and parentheses):
    state, parent, process group, ..."""
    return stat.read_text().rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return _fields(Path(f"/proc/{pid}/stat"))[0] != "Z"
    except OSError:  # gone, or reaped between the kill above and this read
        return False


def parent_of(pid: int) -> int:
    return int(_fields(Path(f"/proc/{pid}/stat"))[1])


def process_table() -> Iterator[tuple[int, list[str]]]:
    """(pid, stat fields after the command name) of every process; one that ends while the
    table is read is left out."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            yield int(stat.parent.name), _fields(stat)
        except OSError:
            continue


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`."""
    children: dict[int, list[int]] = {}
    for child, fields in process_table():
        children.setdefault(int(fields[1]), []).append(child)
    found: set[int] = set()
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            if child not in found:
                found.add(child)
                pending.append(child)
    return {pid for pid in found if alive(pid)}


def wait_until(condition: Callable[..., object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
