"""TorchServe's log files under `$LOG_LOCATION` (./logs): `ts_log.log` and `model_log.log`
(`access_log.log` is `api.observability.access_lines`').

TorchServe 0.12 (its log4j2.xml) writes every frontend line to `ts_log.log` and its workers'
stdout and stderr lines to `model_log.log` (and to `ts_log.log` too), in the layout

    2026-12-08T00:00:29,343 [INFO ] main org.pytorch.serve.ModelServer - Torchserve version: ...
    2026-12-08T00:00:37,403 [INFO ] W-9001-digits_1.0-stdout MODEL_LOG - a handler's print
    2026-12-08T00:00:37,404 [WARN ] W-9001-digits_1.0-stderr MODEL_LOG - a handler's warning

Operators' log shippers and scripts read those files, so a server started from the command line
(`install`, called by `api.server.run` when `api.commands.launch` asks) writes them too, beside
its console output, which keeps its own format. A worker's output record is told apart by two
attributes the worker pool sets on it (`extra=`): `WORKER_STREAM`, TorchServe's thread name for
the pipe (`worker_stream`), and `WORKER_LINE`, the line as the worker printed it.

Not written: the metric logs `ts_metrics.log`/`model_metrics.log` (metrics are on the metrics
API). Files roll
at 100 MB with 5 kept, as TorchServe's, but as `ts_log.log.1` ... `.5` rather than log4j's dated
`.gz` files.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from collections.abc import Sequence
from logging.handlers import RotatingFileHandler
from pathlib import Path

TS_LOG = "ts_log.log"
MODEL_LOG = "model_log.log"
ACCESS_LOG = "access_log.log"
MAX_BYTES = 100 * 1024 * 1024  # log4j's SizeBasedTriggeringPolicy "100 MB" is in MiB
BACKUPS = 5  # DefaultRolloverStrategy max="5"

# Record attributes the worker pool sets on a worker's output line (`logging`'s `extra=`).
WORKER_STREAM = "torchserve_worker_stream"
WORKER_LINE = "torchserve_worker_line"

# log4j's names where Python's differ; DEBUG, INFO and ERROR are the same.
_LOG4J_LEVELS = {"WARNING": "WARN", "CRITICAL": "FATAL"}


def log_folder() -> Path:
    """`$LOG_LOCATION`, else `logs` in the working directory, as TorchServe's log4j2.xml."""
    return Path(os.environ.get("LOG_LOCATION") or "logs")


def worker_name(worker_id: int, model: str, version: str) -> str:
    """TorchServe's name for a worker, `W-9000-digits_1.0` (`worker_id`: describe's id, as
    TorchServe's port): the label of its WorkerLoadTime metric and, with `-stdout` or
    `-stderr`, the thread name of its output lines (`worker_stream`)."""
    return f"W-{worker_id}-{model}_{version}"


def worker_stream(worker_name: str, *, stderr: bool) -> str:
    """TorchServe's thread name for a worker's pipe: `W-9000-digits_1.0-stdout`."""
    return f"{worker_name}-{'stderr' if stderr else 'stdout'}"


def check_folder(folder: Path) -> None:
    """Make `folder` and open both files for appending; the folder itself must be writable
    too (rolling a file over renames it). Raises OSError (`describe_failure` words it)."""
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))
    for name in (TS_LOG, MODEL_LOG, ACCESS_LOG):
        with open(folder / name, "a", encoding="utf-8"):
            pass


def describe_failure(folder: Path, exc: OSError) -> str:
    """The one line for log files that cannot be written: a background start stops with it,
    a foreground one warns with it and serves on."""
    return f"cannot write logs to {folder}: {exc.strerror or exc} (LOG_LOCATION)"


class TorchServeFormatter(logging.Formatter):
    """log4j's `%d{ISO8601} [%-5p] %t %c - %m%n`, TorchServe's layout for both files.

    A worker's output line is written as TorchServe's frontend writes it: its pipe's thread
    name, logger `MODEL_LOG`, and the line alone, without the console's `[model/version wN]`
    prefix. Its level is the record's: INFO for stdout and WARN for stderr, as TorchServe's,
    except the worker's own log lines (`INFO api.workers.main: ...` on stderr), which keep
    theirs rather than read as warnings."""

    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s,%03d"

    def format(self, record: logging.LogRecord) -> str:
        level = _LOG4J_LEVELS.get(record.levelname, record.levelname)
        stream: str | None = getattr(record, WORKER_STREAM, None)
        if stream is None:
            thread, logger, message = record.threadName, record.name, record.getMessage()
        else:
            thread, logger, message = stream, "MODEL_LOG", getattr(record, WORKER_LINE, "")
        text = f"{self.formatTime(record)} [{level:<5}] {thread} {logger} - {message}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text}\n{record.exc_text}"
        if record.stack_info:
            text = f"{text}\n{self.formatStack(record.stack_info)}"
        return text


class LogFile(RotatingFileHandler):
    """A rolling file that costs little per record and fails quietly.

    The standard handler formats each record twice and stats the file to decide whether to
    roll over, and on a failed write (a full disk) prints a traceback to stderr for every
    record, on the event loop. Here the decision is the file's position alone (a file may
    pass `MAX_BYTES` by one record), and a failing file says so in one line on stderr, and
    again when it writes again.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path, maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8")
        self.failing = False
        self._failed_now = False

    def shouldRollover(self, record: logging.LogRecord | None) -> bool:
        if self.stream is None:  # closed by a failed rollover: opened again here
            self.stream = self._open()
        return self.stream.tell() >= self.maxBytes

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self.write_text(text)

    def write_text(self, text: str) -> None:
        """Write lines formatted already: a record's (`emit`), or the access lines of 0.1 s
        together (`api.observability.access_lines`)."""
        self.acquire()
        try:
            self._failed_now = False
            try:
                if self.shouldRollover(None):
                    self.doRollover()
                assert self.stream is not None  # opened by shouldRollover or doRollover
                self.stream.write(text)
                self.stream.flush()
            except Exception:
                self.handleError(None)
            self._note_recovery()
        finally:
            self.release()

    def _note_recovery(self) -> None:
        if self.failing and not self._failed_now:
            self.failing = False
            _tell(f"torchgate: writing {self.baseFilename} again")

    def handleError(self, record: logging.LogRecord | None) -> None:
        self._failed_now = True
        if not self.failing:
            self.failing = True
            error = sys.exc_info()[1]
            _tell(f"torchgate: cannot write {self.baseFilename}: {error} (lines are lost)")


def _tell(line: str) -> None:
    with contextlib.suppress(Exception):
        print(line, file=sys.__stderr__, flush=True)


def is_worker_output(record: logging.LogRecord) -> bool:
    """`model_log.log`'s filter: only what workers printed."""
    return hasattr(record, WORKER_STREAM)


def install(folder: Path) -> list[LogFile]:
    """Add `ts_log.log` (every record) and `model_log.log` (worker output) under `folder` to
    the root logger, after the console's handler; returns them, in that order (`uninstall`
    takes them away). Raises OSError."""
    check_folder(folder)
    formatter = TorchServeFormatter()
    handlers: list[LogFile] = []
    try:
        for name in (TS_LOG, MODEL_LOG):
            rotating = LogFile(folder / name)
            rotating.setFormatter(formatter)
            handlers.append(rotating)
    except OSError:
        uninstall(handlers)
        raise
    handlers[1].addFilter(is_worker_output)
    root = logging.getLogger()
    for handler in handlers:
        root.addHandler(handler)
    return handlers


def uninstall(handlers: Sequence[logging.Handler]) -> None:
    root = logging.getLogger()
    for handler in handlers:
        root.removeHandler(handler)
        handler.close()
