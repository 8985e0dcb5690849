"""TorchServe's `access_log.log`: one line per answered HTTP request and gRPC call.

TorchServe 0.12 writes, for every answer on every port (inference, management, metrics; /ping
and 404s too), a line in its log4j layout `%d{ISO8601} - %m%n`:

    2026-12-08T01:59:52,031 - /127.0.0.1:53422 "POST /predictions/nope HTTP/1.1" 404 1
    2026-12-08T02:00:14,033 - /127.0.0.1:36204 "gRPC inference.GRPCInferenceService/ServerLive
    HTTP/2.0" 0 1   (one line)

(the client's address, the request line with its query, the status, or a gRPC call's status
code, and the milliseconds it took), and the same message in `ts_log.log` as an INFO record of
the logger `ACCESS_LOG`. Log shippers and scripts read that file, so a server started from the
command line writes it too (`api.server.run` opens it beside the other log files).

It is written on the hot path, so it is built cheaply: no `logging` records, a line formatted
with one f-string, its timestamp formatted once per millisecond, and the lines of `FLUSH_S`
written together, to both files, with one write each. (Written at the end of each turn of the
event loop, as the JSON lines are, the writes were three quarters of the cost: py-spy on the
2-core VM at c=32 found 3.6 % of the frontend's samples in this module, 2.6 % of them in
`flush`.) A line is in the files within `FLUSH_S` of its answer; a server killed outright
loses what it had not written yet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from api.observability.log_files import ACCESS_LOG, LogFile

# Lines wait this long at most before they are written (log4j writes each at once).
FLUSH_S = 0.1

# What `ts_log.log`'s copy of a line says in place of a logger and a thread (TorchServe's
# thread is a netty one; torchgate answers on the main thread's event loop).
_TS_LOG_PREFIX = " [INFO ] MainThread ACCESS_LOG - "


class AccessLines:
    """The access lines of a server started from the command line: `http` and `grpc` add one,
    written within `FLUSH_S` to `access_log.log` and, when given, to `ts_log.log`'s file
    (`ts_log`, which holds the records of the root logger)."""

    def __init__(self, folder: Path, ts_log: LogFile | None = None) -> None:
        self._file = LogFile(folder / ACCESS_LOG)
        self._ts_log = ts_log
        self._pending: list[tuple[str, str]] = []  # (timestamp, message)
        self._loop: asyncio.AbstractEventLoop | None = None  # where a flush is due, if one is
        self._millisecond = -1
        self._stamp = ""

    def http(
        self,
        client: tuple[str, int] | None,
        method: str,
        target: str,
        version: str,
        status: int,
        started: float,
    ) -> None:
        """An HTTP answer: `target` is the path and query as the client sent them, `started`
        the request's `time.monotonic()` when it arrived."""
        self._add(f'{_address(client)} "{method} {target} HTTP/{version}" {status}', started)

    def grpc(self, peer: str, method: str, code: int, started: float) -> None:
        """A finished gRPC call: `peer` as grpc gives it (`ipv4:127.0.0.1:36204`), `method`
        its full name (`/inference.GRPCInferenceService/ModelInfer`), `code` its status code's
        number (0 for OK)."""
        self._add(f'{_peer_address(peer)} "gRPC {method.lstrip("/")} HTTP/2.0" {code}', started)

    def _add(self, message: str, started: float) -> None:
        """`message` and the whole milliseconds since `started`, stamped now."""
        milliseconds = int((time.monotonic() - started) * 1000)
        self._pending.append((self._timestamp(), f"{message} {milliseconds}"))
        loop = self._loop
        if loop is not None and not loop.is_closed():
            return  # a flush is due (one due on a loop that closed never comes)
        try:
            loop = self._loop = asyncio.get_running_loop()
        except RuntimeError:  # no running loop: at once
            self.flush()
            return
        loop.call_later(FLUSH_S, self.flush)

    def flush(self) -> None:
        """Write what is pending (called `FLUSH_S` after the first of it, and at close)."""
        pending, self._pending = self._pending, []
        self._loop = None  # the next line schedules the next flush
        if not pending:
            return
        self._file.write_text("".join(f"{stamp} - {message}\n" for stamp, message in pending))
        ts_log = self._ts_log
        if ts_log is not None and logging.getLogger().isEnabledFor(logging.INFO):
            ts_log.write_text(
                "".join(f"{stamp}{_TS_LOG_PREFIX}{message}\n" for stamp, message in pending)
            )

    def close(self) -> None:
        self.flush()
        self._file.close()

    def _timestamp(self) -> str:
        """log4j's ISO8601 in local time, as ts_log.log's (`2026-12-08T01:59:52,031`),
        formatted once per millisecond: a busy server answers many requests in one."""
        millisecond = int(time.time() * 1000)
        if millisecond != self._millisecond:
            self._millisecond = millisecond
            second, fraction = divmod(millisecond, 1000)
            self._stamp = (
                f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(second))},{fraction:03d}"
            )
        return self._stamp


def _address(client: tuple[str, int] | None) -> str:
    """Java's InetSocketAddress.toString, as TorchServe writes the client: `/127.0.0.1:53422`."""
    if client is None:
        return "/unknown"
    return f"/{client[0]}:{client[1]}"


def _peer_address(peer: str) -> str:
    """grpc's `ipv4:127.0.0.1:36204` or `ipv6:[::1]:36204` as TorchServe writes a client."""
    kind, _, address = peer.partition(":")
    if kind == "ipv6" and address.startswith("["):
        host, _, port = address[1:].partition("]:")
        return f"/{host}:{port}"
    return f"/{address}" if kind == "ipv4" else f"/{peer}"
