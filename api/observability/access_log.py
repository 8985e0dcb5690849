"""The access log: one JSON line per answered inference request, on stdout.

    {"time":"2025-06-01T12:00:00.123Z","request_id":"3f2a...","model":"digits","version":"1.0",
     "api":"torchserve-rest","status":200,"latency_ms":0.842,"queue_ms":0.113,"batch_size":4,
     "shadow":false}

`request_id` is the client's `X-Request-Id` or the id torchgate generated and returned in that
header; `latency_ms` is the time inside torchgate (routing, queue, inference), `queue_ms` the
part spent waiting for a worker, `batch_size` the size of the batch the request ran in (these
two are `null` when the request failed before a batch answered it). Shadow copies get their own
line with `"shadow":true`.

Lines cover requests that reached a model version; requests refused before that (unknown model,
bad token, body too large) are counted in `torchgate_rejected_total` instead.

It is an `Observer`, composed with the metrics through `api.core.types.Observers`, and is cheap
on purpose: no `logging` records or formatters, one orjson call per line, one `write()` per
turn of the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable

import orjson

from api.core.types import InferenceRequest, Prediction

log = logging.getLogger(__name__)

# Its level switches the access log like any logger: lines are written at INFO.
ACCESS_LOGGER = "torchgate.access"

Write = Callable[[bytes], object]


def stdout_writer() -> Write:
    """Write lines with `os.write` on stdout's descriptor, bypassing Python's buffer.

    On an event loop, lines finished in one turn of the loop go out in one system call at the
    end of that turn: under load a batch of requests finishes together, and a write per line
    was a system call per request. Lines stay whole and appear within the same loop turn,
    which a buffered stream would not guarantee. Off a loop, each line is written at once.
    """
    fd = sys.stdout.fileno()
    pending: list[bytes] = []
    # A flush runs from the loop, not from `AccessLog.request_finished`: its failure is kept
    # here and raised by the next write, where the caller turns the log off.
    failed: list[OSError] = []

    def flush() -> None:
        data = b"".join(pending)
        pending.clear()
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:
            failed.append(exc)

    def write(line: bytes) -> None:
        if failed:
            raise failed[0]
        pending.append(line)
        if len(pending) > 1:
            return  # a flush is already scheduled for this turn
        try:
            asyncio.get_running_loop().call_soon(flush)
        except RuntimeError:  # no running loop
            flush()

    return write


class AccessLog:
    """Implements `api.core.types.Observer`: writes a line for every finished request."""

    def __init__(self, write: Write | None = None, *, clock: Callable[[], float] = time.time):
        self._write = write or stdout_writer()
        self._clock = clock
        self._millisecond = -1
        self._stamp = ""
        self.enabled = True

    @staticmethod
    def wanted(enabled: bool) -> bool:
        """Whether to log: switched on and the `torchgate.access` logger takes INFO records."""
        return enabled and logging.getLogger(ACCESS_LOGGER).isEnabledFor(logging.INFO)

    def request_finished(
        self,
        request: InferenceRequest,
        model: str,
        version: str,
        status: int,
        latency_s: float,
        prediction: Prediction | None,
        shadow: bool = False,
    ) -> None:
        if not self.enabled:
            return
        line = orjson.dumps(
            {
                "time": self._timestamp(),
                "request_id": request.request_id,
                "model": model,
                "version": version,
                "api": request.api,
                "status": status,
                # Whole microseconds, in ms; int() then / costs a tenth of round(x, 3).
                "latency_ms": int(latency_s * 1e6) / 1000.0,
                "queue_ms": (
                    None if prediction is None else int(prediction.queue_seconds * 1e6) / 1000.0
                ),
                "batch_size": None if prediction is None else prediction.batch_size,
                "shadow": shadow,
            },
            option=orjson.OPT_APPEND_NEWLINE,
        )
        try:
            self._write(line)
        except OSError as exc:
            # stdout is gone (closed pipe, full disk): stop logging rather than fail requests.
            self.enabled = False
            log.error("access log disabled: cannot write to stdout: %s", exc)

    def request_rejected(self, model: str, version: str, reason: str) -> None:
        pass

    def batch_finished(self, model: str, version: str, size: int, inference_s: float) -> None:
        pass

    def queue_changed(self, model: str, version: str, depth: int) -> None:
        pass

    def _timestamp(self) -> str:
        """ISO 8601 UTC with milliseconds, formatted once per millisecond (busy servers answer
        many requests in one)."""
        millisecond = int(self._clock() * 1000)
        if millisecond != self._millisecond:
            self._millisecond = millisecond
            second, fraction = divmod(millisecond, 1000)
            self._stamp = (
                f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(second))}.{fraction:03d}Z"
            )
        return self._stamp
