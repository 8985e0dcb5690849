"""Process output as log records: a worker's stdout and stderr, and the zygote's own.

Each line becomes a record of the logger `torchgate.worker` under the process's label (stdout
at INFO, stderr at WARNING, as TorchServe logs them, unless a line starts with a level name),
within a budget of lines a second, so that a handler printing in a loop cannot take the event
loop from every model. `api.workers.pool` reads the pipes into these.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import IO

from api.observability import log_files

worker_log = logging.getLogger("torchgate.worker")

_MAX_LOG_LINE = 64 * 1024
# A worker's output lines are logged by the event loop, some µs each: a handler printing in a
# loop took seconds of it per second from every model. Past this many lines a second (a
# burst of LOG_BURST first), its lines are dropped and counted, and the count logged.
LOG_LINES_PER_S = 5000
LOG_BURST = 20_000


class ZygoteOutput:
    """The zygote's own stdout and stderr (its log lines, a preloaded module's warnings),
    logged as a worker's output is, and so in TorchServe's ts_log.log too. Read with the
    loop's readers, as the control socket is, not with pipe transports: the pipes outlive an
    event loop (a test suite's next `asyncio.run`)."""

    def __init__(self, stdout: IO[bytes], stderr: IO[bytes]) -> None:
        budget = LogBudget("zygote")
        self._pipes = [
            (stdout, LogLines("zygote", budget)),
            (stderr, LogLines("zygote", budget, stderr=True)),
        ]
        for pipe, _ in self._pipes:
            os.set_blocking(pipe.fileno(), False)
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.detach()
        for pipe, lines in self._pipes:
            loop.add_reader(pipe.fileno(), self._read, pipe, lines)
        self._loop = loop

    def detach(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            for pipe, _ in self._pipes:
                if not pipe.closed:
                    loop.remove_reader(pipe.fileno())

    def finish(self) -> None:
        """The zygote has exited: log what it left in the pipes, and close them."""
        self.detach()
        for pipe, lines in self._pipes:
            if not pipe.closed:
                while self._read(pipe, lines):
                    pass
                pipe.close()
                lines.connection_lost(None)

    def _read(self, pipe: IO[bytes], lines: LogLines) -> bool:
        """One read (a flood does not hold the loop); False once nothing more is there now.
        At its end a pipe is no longer watched: an ended pipe is always readable, and the loop
        would call this at every turn (a preloaded module that closes or redirects the
        zygote's stdout ends it while the zygote lives). `finish` closes it."""
        try:
            data = os.read(pipe.fileno(), 65536)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(pipe.fileno())
            return False
        lines.data_received(data)
        return True


class LogBudget:
    """The lines of a worker's output (both pipes) that may be logged now: LOG_LINES_PER_S a
    second, in bursts of LOG_BURST; the rest are counted."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.allowance = float(LOG_BURST)  # lines that may be logged now
        self._refilled = time.monotonic()
        self.dropped = 0

    def refill(self) -> float:
        now = time.monotonic()
        self.allowance = min(LOG_BURST, self.allowance + (now - self._refilled) * LOG_LINES_PER_S)
        self._refilled = now
        return self.allowance

    def report_dropped(self) -> None:
        if self.dropped:
            worker_log.warning(
                "[%s] %d lines of its output dropped: over %d lines a second",
                self.label,
                self.dropped,
                LOG_LINES_PER_S,
            )
            self.dropped = 0


_LEVELS_STDOUT = ("WARNING", "ERROR", "CRITICAL")
_LEVELS_STDERR = ("DEBUG", "INFO", *_LEVELS_STDOUT)  # the worker's own logging writes there


class LogLines(asyncio.Protocol):
    """A worker's stdout or stderr, one log record per line, under the worker's label: at INFO
    (stdout) or WARNING (stderr), as TorchServe logs them, unless the line starts with a level
    name (the worker's logging writes `LEVEL name: message` to stderr). With `worker_name`,
    each record also carries the pipe's TorchServe thread name and the bare line, which
    TorchServe's log files write as its frontend does (`api.observability.log_files`)."""

    def __init__(
        self,
        label: str,
        budget: LogBudget | None = None,
        *,
        stderr: bool = False,
        on_closed: Callable[[LogLines], None] | None = None,
        worker_name: str | None = None,
    ) -> None:
        self.label = label
        self._stream = (
            None if worker_name is None else log_files.worker_stream(worker_name, stderr=stderr)
        )
        self._budget = budget or LogBudget(label)
        self._default = logging.WARNING if stderr else logging.INFO
        self._levels = _LEVELS_STDERR if stderr else _LEVELS_STDOUT
        self._on_closed = on_closed  # told when the pipe ends (`WorkerPool.drained`)
        self._partial = b""
        self._transport: asyncio.BaseTransport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self.loop = asyncio.get_running_loop()

    def close(self) -> None:
        """Stop reading (the pipe is held by a process that may never end)."""
        transport, self._transport = self._transport, None
        if transport is not None and not self.closed:
            try:
                transport.close()
            except RuntimeError:  # its event loop is closed: close the pipe itself
                pipe = transport.get_extra_info("pipe")
                if pipe is not None:
                    pipe.close()
        self._closed()

    def _closed(self) -> None:
        self.closed = True
        if self._on_closed is not None:
            self._on_closed(self)

    def data_received(self, data: bytes) -> None:
        budget = self._budget
        if budget.refill() < 1:  # not even split: counting the lines is all they cost
            budget.dropped += data.count(b"\n")
            self._partial = (self._partial + data).rpartition(b"\n")[2][-_MAX_LOG_LINE:]
            return
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > _MAX_LOG_LINE:
            lines.append(self._partial)
            self._partial = b""
        budget.report_dropped()
        kept = lines[: int(budget.allowance)]
        budget.dropped += len(lines) - len(kept)
        budget.allowance -= len(kept)
        for line in kept:
            self._emit(line)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial = b""
        self._closed()

    def _emit(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        if not line:
            return
        level = self._default
        first = line.split(" ", 1)[0]
        if first in self._levels:
            level = logging.getLevelName(first)
        if self._stream is None:
            worker_log.log(level, "[%s] %s", self.label, line)
        else:
            extra = {log_files.WORKER_STREAM: self._stream, log_files.WORKER_LINE: line}
            worker_log.log(level, "[%s] %s", self.label, line, extra=extra)
