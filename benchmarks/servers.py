"""The two servers under comparison, started on the same archives and the same config.

Both get a copy of config.properties with the five ports rewritten to free ones on 127.0.0.1,
``disable_token_authorization=true`` and an absolute ``model_store``; nothing else changes
(models, batchSize, maxBatchDelay, workers, queue sizes). The launchers are the tests' own:
`tests.support.torchserve` (real TorchServe) and `tests.support.server` (`torchgate serve` as
a subprocess, stopped with SIGTERM).

Memory is the resident set of a process tree, summed (psutil): torchgate's process and any
children; TorchServe's Java frontend and every Python worker it started (the
``torchserve --foreground`` launcher above them is left out: without --foreground it is not
there at all). PSS, which splits shared pages between the processes mapping them, is recorded
beside it, because summing RSS counts libraries shared by TorchServe's workers once per worker.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from api.backends.workers import DEFAULT_INTRA_OP_THREADS
from tests.support.server import running_torchgate
from tests.support.torchserve import running_torchserve


@dataclass(frozen=True, slots=True)
class ProcessMemory:
    role: str  # "frontend", "zygote", "worker", or the process name (java, ...)
    pid: int
    rss: int
    pss: int


@dataclass(frozen=True, slots=True)
class Memory:
    """Summed over the processes of a server; bytes."""

    rss: int
    pss: int
    processes: list[ProcessMemory] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Server:
    name: str
    inference_url: str  # no trailing slash
    root_pid: int
    count_root: bool = True  # False: the root is a launcher, not part of the footprint

    def memory(self) -> Memory:
        return tree_memory(self.root_pid, include_root=self.count_root)


def tree_memory(pid: int, *, include_root: bool = True) -> Memory:
    """RSS and PSS of `pid` and all its descendants (processes gone meanwhile are skipped)."""
    root = psutil.Process(pid)
    processes = ([root] if include_root else []) + root.children(recursive=True)
    rss = pss = 0
    measured: list[ProcessMemory] = []
    for process in processes:
        try:
            info = process.memory_full_info()
            role = _role(process, root)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
        measured.append(ProcessMemory(role, process.pid, info.rss, getattr(info, "pss", info.rss)))
    return Memory(rss=rss, pss=pss, processes=measured)


def _role(process: psutil.Process, root: psutil.Process) -> str:
    """torchgate's frontend, zygote and workers (forked from the zygote, so with its command
    line), TorchServe's Python workers; else the process name (java)."""
    command = " ".join(process.cmdline())
    if "api.workers.zygote" in command:
        parent = process.parent()
        forked = parent is not None and "api.workers.zygote" in " ".join(parent.cmdline())
        return "worker" if forked else "zygote"
    if "model_service_worker" in command:
        return "worker"
    if process.pid == root.pid and "api.cli" in command:
        return "frontend"
    return process.name()


def torchserve_threads(omp_threads: int | None) -> str:
    """What `torchserve(..., omp_threads=...)` gives TorchServe's workers, in words."""
    if omp_threads:
        return f"OMP_NUM_THREADS={omp_threads}"
    inherited = os.environ.get("OMP_NUM_THREADS")
    if inherited:
        return f"OMP_NUM_THREADS={inherited} (from the environment)"
    return "torch's default threads (OMP_NUM_THREADS unset)"


def torchgate_threads(intra_op_threads: int | None) -> str:
    """What torchgate's CPU workers use, in words, given the config's
    `torchgate.intra_op_threads`; the rule is `ModelBackend`'s in api.backends.workers (the
    config's value, else torch following an OMP_NUM_THREADS torchgate inherits, else one)."""
    inherited = os.environ.get("OMP_NUM_THREADS")
    if intra_op_threads is None:
        intra_op_threads = 0 if inherited else DEFAULT_INTRA_OP_THREADS
    if intra_op_threads > 0:
        plural = "s" if intra_op_threads != 1 else ""
        return f"{intra_op_threads} intra-op thread{plural} each"
    if inherited:
        return f"OMP_NUM_THREADS={inherited} (from the environment)"
    return "torch's default threads"


@contextmanager
def torchserve(
    model_store: Path, config_path: Path, *, omp_threads: int | None = None
) -> Iterator[Server]:
    """Real TorchServe 0.12, every model version's workers READY.

    `omp_threads` sets OMP_NUM_THREADS for TorchServe (its Python workers inherit it, and
    torch takes its intra-op thread count from it); None leaves torch's default, a thread per
    core in every worker.
    """
    with ExitStack() as stack:
        # TorchServe copies the environment when it starts; restore ours right after.
        with _environment("OMP_NUM_THREADS", None if omp_threads is None else str(omp_threads)):
            ts = stack.enter_context(running_torchserve(model_store, config_path))
        yield Server("TorchServe", ts.inference_url, ts.pid, count_root=False)


@contextmanager
def _environment(name: str, value: str | None) -> Iterator[None]:
    """`name` set to `value` (None: unchanged) in os.environ for the duration."""
    if value is None:
        yield
        return
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


@contextmanager
def torchgate(
    model_store: Path, config_path: Path, *, startup_timeout: float = 300.0
) -> Iterator[Server]:
    """`torchgate serve` as a subprocess (`tests.support.server`); yields once /ping is healthy
    (models loaded)."""
    # Appended keys win: the same absolute store and token setting TorchServe's copy gets.
    text = (
        config_path.read_text()
        + f"\nmodel_store={model_store.resolve()}\ndisable_token_authorization=true\n"
    )
    # Default logging, as TorchServe's: each server writes one access-log line per request to
    # a file (TorchServe's logs/access_log.log; torchgate's JSON lines on stdout, which the
    # launcher sends to a file). Turning only torchgate's off would flatter it by up to ~10 %.
    with running_torchgate(text, startup_timeout=startup_timeout) as tg:
        yield Server("torchgate", tg.inference_url, tg.process.pid)
