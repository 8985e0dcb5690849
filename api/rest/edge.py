"""Limits at the HTTP edge, enforced where the bytes arrive: before FastAPI, before parsing.

uvicorn's httptools protocol has no bound on header size, no deadline for a request that
stops half-way and no bound on open connections, so one client could freeze the event loop
with a 64 MiB header (httptools joins a header's pieces as it goes, which slows sharply as it
grows) or use up the process's file descriptors with half-sent requests, and every port with
them. `edge_protocol()` subclasses that protocol, per listener, with:

- **header size**: bytes of a request up to the end of its headers (request line included)
  are counted as they arrive and never more than `max_header_bytes` reach the parser; past
  that the client gets 431 and the connection closes.
- **read timeouts**: a connection's headers must all arrive within `header_timeout_s` of their
  first byte, and a body may not pause longer than that between bytes (pauses the server asks
  for by flow control do not count); a new connection that sends nothing is closed after
  `keep_alive_timeout_s`, as uvicorn closes one idle between requests. A stalled request gets
  408 and is closed (just closed if its answer has begun: a 408 would follow the answer; after
  the answers before it if it is pipelined behind them, and it never runs). A
  request answered before its body is all in (/ping reads none, an early 401/404/413) has
  `header_timeout_s` from its answer for the rest, in all, then is idle until
  `keep_alive_timeout_s`. The other way too: a client that stops reading its answer (the socket's
  buffers full, writes paused) for longer than `header_timeout_s` is disconnected, and its
  request cancelled, rather than hold the connection, the request and the answer's unsent
  pieces (a stream's parts keep coming) for ever.
- **writes at the end of the loop's turn**: uvicorn writes a response's status line and
  headers as soon as the app starts the response, and its body in a second write; each write
  to a socket whose reader is waiting wakes that reader. A connection's writes wait in its
  listener's `Outbox` until the end of the event loop's turn, then go out in order, a
  connection's consecutive pieces joined: a small answer is one system call, and the answers
  of one batch (resolved together) leave back to back, not between stretches of Python, so a
  client reading many connections finds several ready per wake-up. At 32 connections on the
  2-core VM, wrk slept 0.6-0.8 times per answer instead of 0.95, and throughput rose by about
  15 % over one joined write per answer (docs/architecture.md).
- **disconnects**: `connection_lost` cancels what the request's endpoint asked it to
  (`api.rest.asgi.cancel_on_disconnect`), so a hot path needs no task per request waiting on
  `receive()` to learn that the client went away.
- **no protocol upgrades**: a request asking to switch protocols (`Upgrade: h2c`, which
  `curl --http2` sends to an http:// URL, or `websocket`) is answered as a plain request, as
  TorchServe answers it. llhttp would skip its body and hand the bytes after its headers over
  as another protocol; the request is parsed again without the `upgrade` token in Connection.
- **pipelined requests**: at most `MAX_PIPELINED` wait behind the one in progress before
  reading stops until one is answered. uvicorn pauses reading for each, but resumes it each
  time the request in progress reads its body, so a client sending requests faster than
  their answers (or not reading those at all) made the server parse and queue hundreds of
  thousands (1.2 GB in 5 s from one connection).
- **a malformed request behind one in progress** (pipelined, or bytes after a body) is answered
  400 after the answers before it, not in their place.
- **open connections**: at most `max_connections` per listener. A new connection over the
  bound closes the one that has waited longest without a request in progress (idle, still
  sending headers, or sending the body of a request already answered: the stalled clients a
  flood leaves behind), so a good client still gets in;
  when every connection has a request in progress the new one gets 503 and is closed. The
  descriptors in use stay bounded either way.
- **TLS** on an https:// listener is set up here (`loop.start_tls`), not by uvicorn: the
  connection is counted, and its deadline runs, from its first byte, so a handshake that never
  ends is one more stalled client (uvicorn's TLS left it outside the bound for 60 s). A TLS
  connection the edge closes is cut at once when nothing is owed to it, and otherwise waits
  `TLS_SHUTDOWN_S` at most for the client's close_notify (asyncio's 30 s), counted meanwhile.

Deadlines are checked by one sweep per listener, a few times per timeout, rather than a timer
per request: the hot path only stores a float. The sweep also logs what was refused, as one
summary a minute at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import ssl
from collections import OrderedDict
from collections.abc import Callable, Sized
from typing import Any, cast

import httptools
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.utils import get_local_addr

from api.config import EdgeLimits
from api.encoding import error_body
from api.rest.asgi import DISCONNECT_WATCH

log = logging.getLogger("torchgate.edge")

# After a 431 the server stops reading but keeps draining what the client still sends, for at
# most this long, so the client reads the answer instead of a reset (closing a socket with
# unread bytes sends RST, which can discard the response before the client reads it).
LINGER_S = 2.0
# What the edge refused is logged as one summary per listener at most this often, not per
# connection: a flood must not become a flood of log lines.
REPORT_S = 60.0
# Consecutive pieces of one connection are joined into one write up to this size; a larger
# piece (an image, a big tensor) is written on its own instead of being copied.
JOIN_BYTES = 64 * 1024
# Requests queued behind the one in progress on a connection before reading stops (what one
# read brings is still parsed: the bound is this plus one read's worth).
MAX_PIPELINED = 64
# A TLS connection being closed waits this long at most (or `header_timeout_s`, if shorter) for
# the client's close_notify, rather than asyncio's 30 s: until then it is open, and counted.
TLS_SHUTDOWN_S = 2.0


class _Phase(enum.Enum):
    HANDSHAKE = "handshake"  # https:// only: connected, TLS not yet set up
    NEW = "new"  # connected, nothing received yet
    HEADERS = "headers"  # a request's headers are arriving
    BODY = "body"  # its body is arriving
    DRAIN = "drain"  # answered, the rest of its body still arriving (skipped by uvicorn)
    BUSY = "busy"  # the request is complete and being answered
    IDLE = "idle"  # keep-alive, between requests (uvicorn's own timer closes it, or the sweep)
    # HANDSHAKE, NEW, HEADERS, DRAIN and IDLE connections are "waiting": one may be closed to
    # admit a new client.


class _Listener:
    """What the connections of one listener share: limits, the waiting queue, the sweep."""

    def __init__(
        self,
        limits: EdgeLimits,
        answered: Callable[[int], None] | None,
        tls: ssl.SSLContext | None,
    ) -> None:
        self.limits = limits
        self.tls = tls  # an https:// listener's context: the handshake is the edge's
        # Told the status of every answer on this listener (TorchServe's Requests2XX...).
        self.answered = answered
        # Connections with no request in progress, longest waiting first (insertion order).
        self.waiting: OrderedDict[EdgeProtocol, None] = OrderedDict()
        self.outbox: Outbox | None = None  # made on the loop of the first connection
        self.sweep: asyncio.TimerHandle | None = None
        self.period_s = max(0.01, min(limits.header_timeout_s, limits.keep_alive_timeout_s) / 4)
        self.refused: dict[str, int] = {}  # since the last report: "431 header too large": n
        self.reported_at = 0.0
        self.address: str | None = None  # "host:port", for the report, once a connection tells

    def count(self, what: str) -> None:
        self.refused[what] = self.refused.get(what, 0) + 1

    def start_sweep(self, loop: asyncio.AbstractEventLoop, connections: set[Any]) -> None:
        """Every `period_s` while the listener has connections (uvicorn's set of them), drop
        the ones past their deadlines. The timer holds the listener, not a connection: one
        that ended is freed at once."""
        self.sweep = loop.call_later(self.period_s, self._sweep, loop, connections)

    def _sweep(self, loop: asyncio.AbstractEventLoop, connections: set[Any]) -> None:
        now = loop.time()
        for conn in list(connections):
            if not isinstance(conn, EdgeProtocol):
                continue
            if conn._write_deadline and conn._write_deadline < now:
                conn._write_stalled(now)
            elif conn._deadline and conn._deadline < now:
                conn._expire()
        self.report(now)
        self.sweep = None
        if connections:
            self.start_sweep(loop, connections)

    def report(self, now: float) -> None:
        if self.refused and now - self.reported_at >= REPORT_S:
            summary = ", ".join(f"{n} {what}" for what, n in sorted(self.refused.items()))
            where = self.address or "listener"
            log.warning("HTTP %s refused or dropped connections: %s", where, summary)
            self.refused.clear()
            self.reported_at = now


def _response(status: int, phrase: str, kind: str, message: str) -> bytes:
    body = error_body(status, kind, message)
    return (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode("ascii") + body


class Outbox:
    """What a listener's connections wrote during the current turn of the event loop.

    The first write of a turn schedules `flush` at the end of the loop's ready queue, so every
    answer resolved in the same turn (a batch's) is written before it runs.
    """

    __slots__ = ("_pending", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: list[tuple[asyncio.Transport, bytes]] = []

    def add(self, transport: asyncio.Transport, data: bytes) -> None:
        pending = self._pending
        pending.append((transport, data))
        if len(pending) == 1:
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write everything pending, in order; a connection's consecutive pieces joined up to
        JOIN_BYTES. What a connection closed meanwhile had pending is dropped, as a write to a
        closed socket would be."""
        pending, self._pending = self._pending, []
        owner: asyncio.Transport | None = None
        run: list[bytes] = []  # consecutive pieces of `owner`, to go out in one write
        size = 0
        for transport, data in pending:
            if transport is owner and size + len(data) <= JOIN_BYTES:
                run.append(data)
                size += len(data)
                continue
            _write(owner, run)
            owner, run, size = transport, [data], len(data)
        _write(owner, run)


def _write(transport: asyncio.Transport | None, pieces: list[bytes]) -> None:
    if transport is not None and not transport.is_closing():
        transport.write(pieces[0] if len(pieces) == 1 else b"".join(pieces))


class TurnWriter:
    """The transport a connection's protocol and its requests write to: writes go through the
    listener's `Outbox`; closing and EOF first send what is pending, so nothing written before
    them is lost or overtaken. Everything else passes through to the socket's transport (abort
    too: it discards what is unsent, and the flush skips a closing connection).
    """

    __slots__ = ("_outbox", "_transport")

    def __init__(self, transport: asyncio.Transport, outbox: Outbox) -> None:
        self._transport = transport
        self._outbox = outbox

    def write(self, data: bytes) -> None:
        if data:
            self._outbox.add(self._transport, bytes(data))

    def writelines(self, lines: Any) -> None:
        self.write(b"".join(lines))

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def send_pending(self) -> None:
        """Write what waits for the end of the turn now (every connection's, in order)."""
        self._outbox.flush()

    def close(self) -> None:
        self._outbox.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self._outbox.flush()
        self._transport.write_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class PipelineFlow(FlowControl):
    """uvicorn's flow control, with reading kept paused while `MAX_PIPELINED` requests wait."""

    def __init__(self, transport: asyncio.Transport, pipeline: Sized) -> None:
        super().__init__(transport)
        self._pipeline = pipeline

    def resume_reading(self) -> None:
        # FlowControl's, inlined (it runs for every request) with the bound added.
        if self.read_paused and len(self._pipeline) < MAX_PIPELINED:
            self.read_paused = False
            self._transport.resume_reading()


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above; `edge_protocol()` makes one."""

    listener: _Listener

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _Phase.NEW
        self._deadline = 0.0  # loop time after which the sweep drops it (NEW/HEADERS/BODY)
        self._write_deadline = 0.0  # ... after which it cuts it: writes paused (pause_writing)
        self._unsent = 0  # bytes waiting to be sent when that deadline was set
        self._header_bytes = 0
        # Read on every request: kept on the instance, one attribute lookup away.
        self._waiting = self.listener.waiting
        self._timeout_s = self.listener.limits.header_timeout_s
        self._max_header_bytes = self.listener.limits.max_header_bytes
        self._refused = False  # answered 431/503 or dropped: nothing more is parsed
        # The head of a request that asked for a protocol upgrade, to parse again without it.
        self._upgrade_head: bytes | None = None
        # A refusal (400 malformed, 408 stalled) owed to a request behind one still being
        # answered: on_response_complete sends it once the answers before it are out.
        self._refusal_owed: int | None = None
        self._head_open = False  # a request's head is being parsed (begun, not complete)
        # What to call when the connection is lost (an ordered set: registered callbacks).
        self._on_lost: dict[Callable[[], object], None] = {}
        self._securing: asyncio.Task[None] | None = None  # the TLS handshake (a reference)
        self._early: list[bytes] = []  # bytes that came before TLS took the connection over
        # Decrypted bytes that came with the handshake's end, before `_open`: a request's first.
        self._before_open: list[bytes] = []
        self._tcp: asyncio.Transport | None = None  # under TLS: what TLS encrypted waits here

    # Connection life

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if not self._admitted(transport):
            return
        if self.listener.tls is None:
            self._open(transport)
        else:
            self._handshake(transport)

    def _admitted(self, transport: asyncio.Transport) -> bool:
        listener = self.listener
        if len(self.connections) < listener.limits.max_connections:
            return True
        if listener.waiting:
            oldest = next(iter(listener.waiting))
            oldest._drop()
            listener.count("closed to admit a new one at torchgate.max_connections")
            return True
        self.transport = transport  # uvicorn's connection_lost closes it
        self._refused = True
        listener.count("503 over torchgate.max_connections")
        if listener.tls is None:  # before a handshake a TLS client could not read an answer
            self._answered(503)
            transport.write(
                _response(
                    503,
                    "Service Unavailable",
                    "ServiceUnavailableException",
                    "Too many open connections; retry later",
                )
            )
        transport.close()
        return False

    def _open(self, transport: asyncio.Transport) -> None:
        listener = self.listener
        outbox = listener.outbox
        if outbox is None or outbox.loop is not self.loop:
            outbox = listener.outbox = Outbox(self.loop)
        writer = TurnWriter(transport, outbox)
        super().connection_made(cast(asyncio.Transport, writer))
        self.flow = PipelineFlow(cast(asyncio.Transport, writer), self.pipeline)
        self._deadline = self.loop.time() + listener.limits.keep_alive_timeout_s
        self._waiting[self] = None
        self._start_sweep()

    def _start_sweep(self) -> None:
        listener = self.listener
        if listener.sweep is None:
            listener.start_sweep(self.loop, self.connections)
            if listener.address is None:
                # Here, not from `self.server` in the sweep: a failed handshake never has one.
                local = get_local_addr(self.transport)
                if local is not None:
                    listener.address = f"{local[0]}:{local[1]}"

    # TLS

    def _handshake(self, transport: asyncio.Transport) -> None:
        """Count a TLS connection, and start its deadline, from its first byte: a handshake
        that never ends is a stalled client like any other (uvicorn's own TLS left it outside
        the bound for asyncio's 60 s). The sweep drops it after `header_timeout_s`, and at the
        bound it makes way for a new connection as an idle one does."""
        self.transport = transport
        self.connections.add(self)
        self._phase = _Phase.HANDSHAKE
        self._deadline = self.loop.time() + self._timeout_s
        self._waiting[self] = None
        self._start_sweep()
        self._securing = self.loop.create_task(self._secure(transport))

    async def _secure(self, raw: asyncio.Transport) -> None:
        listener = self.listener
        assert listener.tls is not None
        secured: asyncio.Transport | None = None
        if not raw.is_closing():
            if self._early:
                # Read before TLS took over (uvloop reads as soon as a connection is made): fed
                # to it first, as the socket would have, before its handshake starts.
                self.loop.call_soon(self._feed_early, raw)
            # ssl.SSLError, a reset, the handshake timeout, a drop by the sweep: all OSError.
            with contextlib.suppress(OSError):
                secured = await self.loop.start_tls(
                    raw,
                    self,
                    listener.tls,
                    server_side=True,
                    ssl_handshake_timeout=self._timeout_s,
                    ssl_shutdown_timeout=min(TLS_SHUTDOWN_S, self._timeout_s),
                )
        self._securing = None
        # Dropped (by the sweep, or to admit a new client) after the handshake ended but before
        # this resumed: `secured` does not know it yet, and must not be opened.
        if secured is None or secured.is_closing() or self._refused or raw.is_closing():
            # Plain HTTP to an https:// port ends here too: nothing a client could read.
            if not self._refused:
                listener.count("TLS handshake failed")
            self.connections.discard(self)
            self._waiting.pop(self, None)
            raw.close()
            return
        self._waiting.pop(self, None)
        self._phase = _Phase.NEW
        self._tcp = raw
        self._open(secured)
        if self._before_open:
            first, self._before_open = b"".join(self._before_open), []
            self.data_received(first)

    def _feed_early(self, raw: asyncio.Transport) -> None:
        # asyncio's and uvloop's TLS protocols are buffered ones (uvloop's not by subclass)
        tls = cast(asyncio.BufferedProtocol, raw.get_protocol())
        data = memoryview(b"".join(self._early))
        self._early = []
        if raw.is_closing() or not hasattr(tls, "buffer_updated"):
            return
        while data:
            buffer = memoryview(tls.get_buffer(len(data)))
            size = min(len(buffer), len(data))
            buffer[:size] = data[:size]
            tls.buffer_updated(size)
            data = data[size:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.waiting.pop(self, None)
        on_lost, self._on_lost = self._on_lost, {}
        for callback in on_lost:
            callback()
        if self.scope is not None:
            # The scope holds this protocol's bound method; unlinked, the connection is freed
            # by reference counting rather than by the cycle collector.
            cast(dict[str, Any], self.scope).pop(DISCONNECT_WATCH, None)
        # uvicorn cancels the keep-alive timer only for a clean close: a connection the client
        # reset once answered stayed held by it, 8 KB for each, for keep_alive_timeout.
        self._unset_keepalive_if_required()
        super().connection_lost(exc)

    def _watch_disconnect(self) -> Callable[[], None]:
        # With the loop given, current_task skips get_running_loop: in Python 3.11 that is a
        # getpid() system call, three per request were 5 % of the frontend's CPU.
        task = asyncio.current_task(self.loop)
        assert task is not None, "called from the request's task"
        callback = task.cancel
        self._on_lost[callback] = None
        return lambda: self._on_lost.pop(callback, None) and None

    def _expire(self) -> None:
        if self._phase is _Phase.BODY and self.flow.read_paused:
            # The server paused reading (the app has not taken the body yet): not the client.
            self._deadline = self.loop.time() + self._timeout_s
            return
        if self._phase is _Phase.HANDSHAKE:
            self.listener.count("TLS handshake not done in time")
        elif self._owes_408():
            self.listener.count("408 request not received in time")
            queued = self._queued() if self._phase is _Phase.BODY else None
            if queued is not None:
                # A 408 now would be read as the answer to the request before it: it is owed
                # after that answer, and the stalled request is never run.
                self.pipeline.remove(queued)
                self._owe_refusal(408)
                return
        elif self._phase is _Phase.BODY or self._phase is _Phase.DRAIN:
            self.listener.count("closed: a body not received in time after its answer began")
        # NEW and IDLE: a connection opened and never used, or idle too long, is not news.
        self._drop()

    def _owes_408(self) -> bool:
        """Whether the request being received has no answer begun, so a 408 may be its one."""
        if self._refused:
            return False
        if self._phase is _Phase.HEADERS:
            return True  # its cycle is not made yet (self.cycle is an answered one before it)
        return self._phase is _Phase.BODY and not self.cycle.response_started

    def _drop(self) -> None:
        """Close a stalled or waiting connection; a half-sent request is told why, unless its
        answer has begun (a 408 after it would be read as the answer to the next request)."""
        owes_408 = self._owes_408()
        if owes_408:
            self._send_408()
        self._refused = True
        self._deadline = 0.0
        self._waiting.pop(self, None)
        if owes_408 or self.listener.tls is None or self._answer_unsent():
            self.transport.close()  # on TLS: TLS_SHUTDOWN_S at most, waiting for close_notify
        else:
            # TLS with nothing to send: close() would keep it open, and counted, while it waits
            # for a close_notify that a silent client never sends. (Plain TCP closes at once.)
            self.transport.abort()

    def _send_408(self) -> None:
        self._answered(408)
        self.transport.write(
            _response(
                408,
                "Request Timeout",
                "RequestTimeoutException",
                "The request was not received in time",
            )
        )

    def _queued(self) -> tuple[Any, Any] | None:
        """The pipeline's entry of the request whose body is arriving, when it waits there
        behind one not yet answered; else None. (Its head cannot wait there: one pipelined
        behind a request in progress has its header timeout only from that answer on:
        on_response_complete.)"""
        return next((entry for entry in self.pipeline if entry[0] is self.cycle), None)

    def _owe_refusal(self, status: int) -> None:
        """Refuse the request being received once the answers before it are out: nothing
        more is read or parsed."""
        self._refusal_owed = status
        self._refused = True
        self._deadline = 0.0
        self._waiting.pop(self, None)
        self.flow.pause_reading()

    def _answer_unsent(self) -> bool:
        """Whether an answer is still on its way out: an idle connection closed to admit a new
        client may have been answered in this very turn, or be slow to read it."""
        transport = self.transport
        if not isinstance(transport, TurnWriter):
            return False  # a TLS handshake: nothing is owed before it ends
        transport.send_pending()
        tcp = self._tcp
        return bool(transport.get_write_buffer_size() or (tcp and tcp.get_write_buffer_size()))

    # Bytes out

    def pause_writing(self) -> None:
        super().pause_writing()
        # The client must read some of what it was sent in time, whatever the phase
        # (pipelined requests: the next may be arriving while this answer waits).
        self._write_deadline = self.loop.time() + self._timeout_s
        self._unsent = self.transport.get_write_buffer_size()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._write_deadline = 0.0

    def _write_stalled(self, now: float) -> None:
        """Writes paused for a whole timeout: cut the connection, unless the client read some
        meanwhile. Writes resume only once the buffer is nearly empty, so a slow reader of a
        large answer would otherwise be cut as one that reads nothing."""
        unsent = self.transport.get_write_buffer_size()
        if unsent < self._unsent:
            self._unsent = unsent
            self._write_deadline = now + self._timeout_s
            return
        self.listener.count("closed: the client stopped reading its answers")
        self._refused = True
        self._deadline = self._write_deadline = 0.0
        self._waiting.pop(self, None)
        self.transport.abort()  # close() would wait for the unread bytes to go out

    # Bytes in

    def data_received(self, data: bytes) -> None:
        if self._refused or self.transport.is_closing():
            return
        phase = self._phase
        if phase is _Phase.BODY:
            # Per piece, with no overall limit or minimum rate: the app is reading this body
            # (or will answer it), and a large upload on a slow link must not be cut. Once it
            # is answered the rest has one timeout in all (DRAIN).
            self._deadline = self.loop.time() + self._timeout_s
            self._feed(data)
            return
        if phase is _Phase.DRAIN:
            self._feed(data)  # the deadline set when it was answered stands
            return
        if phase is _Phase.HANDSHAKE:
            if self.transport.get_protocol() is self:
                self._early.append(data)  # TLS's first bytes, for it once it takes over (_secure)
                self.transport.pause_reading()
            else:
                # Decrypted by TLS, which has taken the socket over: asyncio's reads what came
                # with the handshake's end before `start_tls` returns. Replayed after `_open`.
                self._before_open.append(data)
            return
        if phase is _Phase.NEW or phase is _Phase.IDLE:
            # A request starts. It keeps its place among the waiting: longest waiting first.
            self._phase = _Phase.HEADERS
            self._deadline = self.loop.time() + self._timeout_s
        # Whatever arrives outside a body belongs to a request's head, the next one's when
        # pipelined behind a request in progress (BUSY); on_headers_complete resets the count.
        room = self._max_header_bytes - self._header_bytes
        if len(data) > room:
            # Feed only what fits: either the headers end inside it, or they are too big.
            self._header_bytes = self._max_header_bytes
            if room > 0:
                self._feed(data[:room])
            if self.transport.is_closing() or self._refused:
                return  # the parser refused it (400, now or after the answer in progress)
            if self._header_bytes >= self._max_header_bytes:
                self._too_large()
            else:
                self.data_received(data[room:])
            return
        self._header_bytes += len(data)
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """uvicorn's data_received, with what the module docstring says of upgrades and of
        malformed requests."""
        self._unset_keepalive_if_required()
        while True:
            try:
                self.parser.feed_data(data)
                return
            except httptools.HttpParserError:
                cycle = self.cycle
                if cycle is None or cycle.response_complete or cycle.more_body:
                    # Nothing before it to answer, or the request in progress is the one whose
                    # body is malformed (its app may be waiting for the rest): at once.
                    self.send_400_response("Invalid HTTP request received.")
                else:
                    self._owe_refusal(400)  # after the answers before it
                return
            except httptools.HttpParserUpgrade as upgrade:
                head, self._upgrade_head = self._upgrade_head, None
                if head is None:  # CONNECT: not ours to tunnel
                    self.send_400_response("Invalid HTTP request received.")
                    return
                # Again, on a fresh parser, from the head without the upgrade (a loop, not a
                # call: many such requests may come pipelined in one read).
                self.parser = httptools.HttpRequestParser(self)
                self.parser.set_dangerous_leniencies(lenient_data_after_close=True)  # as uvicorn
                data = head + data[upgrade.args[0] :]

    def send_400_response(self, msg: str) -> None:
        self._answered(400)
        super().send_400_response(msg)

    def _answered(self, status: int) -> None:
        if self.listener.answered is not None:
            self.listener.answered(status)

    def _head_without_upgrade(self) -> bytes:
        """The request line and headers just parsed, the `upgrade` token left out of
        Connection (llhttp upgrades only with it; the Upgrade header stays for the app)."""
        version = self.parser.get_http_version().encode()
        lines = [self.parser.get_method() + b" " + self.url + b" HTTP/" + version]
        for name, value in self.headers:
            if name == b"connection":
                tokens = [t.strip() for t in value.split(b",")]
                value = b", ".join(t for t in tokens if t.lower() != b"upgrade")
            lines.append(name + b": " + value)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def _too_large(self) -> None:
        self._refused = True
        self._deadline = 0.0
        self._waiting.pop(self, None)
        if self.cycle is not None and not self.cycle.response_complete:
            # Pipelined behind a request still being answered: no room for a second answer.
            self.transport.close()
            return
        self.listener.count("431 header too large")
        self._answered(431)
        self.transport.write(
            _response(
                431,
                "Request Header Fields Too Large",
                "RequestHeaderFieldsTooLargeException",
                f"Request line and headers exceed {self._max_header_bytes} bytes",
            )
        )
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
            self._waiting[self] = None  # while it lingers, a new client may evict it
        else:
            self.transport.close()

    # Parser callbacks (the parser runs inside data_received)

    def on_message_begin(self) -> None:
        self._head_open = True
        super().on_message_begin()
        cast(dict[str, Any], self.scope)[DISCONNECT_WATCH] = self._watch_disconnect

    def on_headers_complete(self) -> None:
        if self.parser.should_upgrade() and self.parser.get_method() != b"CONNECT":
            self._upgrade_head = self._head_without_upgrade()  # parsed again: _feed
            return
        self._head_open = False
        if self.expect_100_continue and self.parser.get_http_version() == "1.0":
            self.expect_100_continue = False  # HTTP/1.0 clients know no 100 (RFC 9110 10.1.1)
        self._header_bytes = 0
        self._phase = _Phase.BODY
        self._deadline = self.loop.time() + self._timeout_s
        self._waiting.pop(self, None)  # a request in progress is never evicted
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._upgrade_head is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._upgrade_head is not None:
            return  # llhttp's end of an upgrading request: it is parsed again
        if self.cycle.response_complete:
            self._answered_body_complete()
            return  # uvicorn's would ignore it too: nothing is waiting for the body
        self._phase = _Phase.BUSY
        self._deadline = 0.0  # the handler's time is bounded by the response timeout
        super().on_message_complete()

    def _answered_body_complete(self) -> None:
        """The body of a request answered before it was all in has ended: the connection is
        idle. uvicorn armed its keep-alive timer at the answer, but the body's next bytes
        cancelled it (_feed), so the sweep closes it instead, as that timer would have."""
        self._phase = _Phase.IDLE
        self._deadline = self.loop.time() + self.listener.limits.keep_alive_timeout_s
        self._waiting[self] = None  # already waiting since the answer: it keeps its place

    def on_response_complete(self) -> None:
        owed = self._refusal_owed
        if owed is not None and not self.pipeline:
            self._refusal_owed = None
            self.server_state.total_requests += 1
            if self.transport.is_closing():
                return  # the answer before it closed the connection (a shutdown): nothing after
            if owed == 400:
                self.send_400_response("Invalid HTTP request received.")
            else:
                self._send_408()
                self.transport.close()
            return
        super().on_response_complete()
        # A pipelined request may have started in its place (self.cycle is the latest one).
        if self._phase is _Phase.BUSY and self.cycle.response_complete:
            if self._head_open:
                # Part of the next request's head came in behind this one: it has the header
                # timeout from now, not the idle one.
                self._phase = _Phase.HEADERS
                self._deadline = self.loop.time() + self._timeout_s
            else:
                self._phase = _Phase.IDLE  # uvicorn's keep-alive timer closes it
            self._waiting[self] = None  # waiting again, behind every longer waiter
        elif self._phase is _Phase.BODY and self.cycle.response_complete:
            self._answered_early()

    def _answered_early(self) -> None:
        """Answered before its body is all in (/ping reads none, an early 401/404/413): the
        rest is only skipped, so it is no request in progress. It may be closed to admit a new
        client, and the rest must come within one timeout in all, not per piece: otherwise a
        byte now and then would hold the connection for ever."""
        self._phase = _Phase.DRAIN
        self._deadline = self.loop.time() + self._timeout_s
        self._waiting[self] = None


def edge_protocol(
    limits: EdgeLimits,
    answered: Callable[[int], None] | None = None,
    tls: ssl.SSLContext | None = None,
) -> type[EdgeProtocol]:
    """A protocol class for one listener (its connections share a bound and a sweep);
    `answered` is told the status of each answer the edge itself sends (431, 408, 503, 400;
    `api.rest.asgi.StatusTold` tells the app's); with `tls` the listener speaks https."""

    class ListenerProtocol(EdgeProtocol):
        listener = _Listener(limits, answered, tls)

    return ListenerProtocol
