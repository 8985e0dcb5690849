"""What a benchmark ran on: CPU, cores, memory, software versions."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from benchmarks.load import wrk_version

PACKAGES = ("torchgate", "torch", "onnxruntime-gpu", "torchserve", "uvicorn", "fastapi")


@dataclass(frozen=True, slots=True)
class Machine:
    cpu_model: str
    cores: int  # usable by this process (what `nproc` prints)
    memory_gib: float
    kernel: str
    date: str  # ISO 8601, UTC, to the minute
    load_average: float  # 1-minute, when described: other work on the machine skews results
    versions: dict[str, str] = field(default_factory=dict)


def cpu_model(cpuinfo: str) -> str:
    """The first "model name" in /proc/cpuinfo text ("unknown" without one)."""
    match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    return match.group(1).strip() if match else "unknown"


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _memory_gib() -> float:
    match = re.search(r"^MemTotal:\s*(\d+) kB", _read("/proc/meminfo"), re.MULTILINE)
    return int(match.group(1)) / 2**20 if match else 0.0


def java_version() -> str | None:
    if shutil.which("java") is None:
        return None
    completed = subprocess.run(["java", "-version"], capture_output=True, text=True, check=False)
    first = (completed.stderr or completed.stdout).strip().splitlines()
    return first[0] if first else "unknown"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    for name, version in (("java", java_version()), ("wrk", wrk_version())):
        if version is not None:
            found[name] = version
    return found


def describe() -> Machine:
    return Machine(
        cpu_model=cpu_model(_read("/proc/cpuinfo")),
        cores=len(os.sched_getaffinity(0)),
        memory_gib=_memory_gib(),
        kernel=platform.release(),
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        load_average=os.getloadavg()[0],
        versions=versions(),
    )
