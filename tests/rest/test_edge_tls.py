"""The HTTP edge's limits on an https:// listener (api/rest/edge.py), against the real
`torchgate serve` with its self-signed certificate: a TLS handshake counts against the
connection bound and must end within the header timeout, as a request's headers must.

Attackers are raw TCP sockets that never start, or never finish, a handshake.

The tests at the end run the edge in the test's own event loop, on asyncio's loop (api/server.py
falls back to it without uvloop) and on uvloop's: their TLS protocols read at different times.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import http.client
import logging
import socket
import ssl
import struct
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import uvicorn
import uvloop
from uvicorn.server import ServerState

from api.config import EdgeLimits
from api.rest.edge import TLS_SHUTDOWN_S, EdgeProtocol, edge_protocol
from api.tls import self_signed, server_ssl_context
from tests.rest.test_edge import DIGIT, JSON_TYPE, address, config, connect
from tests.support.server import TorchgateServer, running_torchgate

T = TypeVar("T")


@pytest.fixture(scope="module")
def hasty_tls() -> Iterator[TorchgateServer]:
    with running_torchgate(config(header_timeout="0.5"), scheme="https") as tg:
        yield tg


@pytest.fixture(scope="module")
def bounded_tls() -> Iterator[TorchgateServer]:
    """8 connections per listener; timeouts far beyond any test."""
    with running_torchgate(config(max_connections="8", header_timeout="120"), scheme="https") as tg:
        yield tg


def https(url: str) -> http.client.HTTPSConnection:
    host, port = address(url)
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    return http.client.HTTPSConnection(host, port, timeout=30, context=unverified)


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def predict(url: str) -> int:
    conn = https(url)
    conn.request("POST", "/predictions/digits", DIGIT, JSON_TYPE)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status


def test_a_handshake_never_begun_is_closed_after_the_header_timeout(
    hasty_tls: TorchgateServer,
) -> None:
    # asyncio's own handshake timeout is 60 s; the edge's is the header timeout.
    silent = connect(hasty_tls.inference_url)
    started = time.monotonic()
    assert closed_by_server(silent, within_s=20)
    assert time.monotonic() - started < 10
    silent.close()
    assert predict(hasty_tls.inference_url) == 200


def test_a_handshake_stopped_half_way_is_closed_after_the_header_timeout(
    hasty_tls: TorchgateServer,
) -> None:
    # A TLS record header promising 512 bytes of ClientHello, then nothing more.
    stalled = connect(hasty_tls.inference_url)
    stalled.sendall(b"\x16\x03\x01\x02\x00\x01")
    started = time.monotonic()
    assert closed_by_server(stalled, within_s=20)
    assert time.monotonic() - started < 10
    stalled.close()


def test_handshakes_in_progress_make_way_for_good_clients_at_the_bound(
    bounded_tls: TorchgateServer,
) -> None:
    silent = [connect(bounded_tls.inference_url) for _ in range(30)]
    # Each connection past the bound closed the one that had waited longest: at most 8 are
    # open, and the oldest are the ones closed.
    closed = [closed_by_server(sock, within_s=5) for sock in silent[:20]]
    assert all(closed), closed
    for _ in range(3):
        assert predict(bounded_tls.inference_url) == 200
    for sock in silent:
        sock.close()


def test_plain_http_to_an_https_port_is_closed_and_others_are_served() -> None:
    # A server of its own: what the edge refused is logged once a minute at most, so another
    # test's refusals could hold this one's back.
    with running_torchgate(config(), scheme="https") as tg:
        plain = connect(tg.inference_url)
        plain.sendall(b"GET /ping HTTP/1.1\r\nhost: x\r\n\r\n")
        assert closed_by_server(plain, within_s=20)
        plain.close()
        assert predict(tg.inference_url) == 200
        deadline = time.monotonic() + 30
        while "TLS handshake failed" not in tg.log_text():
            assert time.monotonic() < deadline, tg.log_text()[-2000:]
            time.sleep(0.05)


# In the test's own event loop


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
REQUEST = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Runs a scenario on a new loop of the kind the test is parametrized with."""

    def run_on_loop(scenario: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            return runner.run(asyncio.wait_for(scenario, 30))

    return run_on_loop


def limits(header_timeout_s: float = 120.0, keep_alive_s: int = 120, bound: int = 8) -> EdgeLimits:
    return EdgeLimits(
        max_header_bytes=8192,
        header_timeout_s=header_timeout_s,
        keep_alive_timeout_s=keep_alive_s,
        max_connections=bound,
    )


async def answer_ok(scope: Any, receive: Any, send: Any) -> None:
    headers = [(b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


@functools.cache
def server_context() -> ssl.SSLContext:
    return server_ssl_context(self_signed())


@dataclass
class Edge:
    port: int
    protocol: type[EdgeProtocol]
    connections: set[Any]  # uvicorn's: every connection counted against the bound


@contextlib.asynccontextmanager
async def tls_edge(
    edge_limits: EdgeLimits, loop: Any = None, *, tls: bool = True
) -> AsyncIterator[Edge]:
    """An https:// listener (http:// without `tls`) on 127.0.0.1 in the running loop,
    answering 200; its protocol sees `loop` as its loop when given (a stand-in wrapping the
    running one)."""
    app_config = uvicorn.Config(answer_ok, lifespan="off", log_config=None)
    app_config.load()
    state = ServerState()
    protocol = edge_protocol(edge_limits, tls=server_context() if tls else None)
    running = asyncio.get_running_loop()
    server = await running.create_server(
        lambda: protocol(
            config=app_config, server_state=state, app_state={}, _loop=loop or running
        ),
        "127.0.0.1",
        0,
    )
    try:
        yield Edge(server.sockets[0].getsockname()[1], protocol, state.connections)
    finally:
        server.close()
        for conn in list(state.connections):
            conn.transport.abort()
        if protocol.listener.sweep is not None:
            protocol.listener.sweep.cancel()
        await server.wait_closed()


@dataclass
class TlsClient:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    incoming: ssl.MemoryBIO
    tls: ssl.SSLObject

    async def answer(self) -> bytes:
        """What the server sends up to the end of an answer's head, or until it closes."""
        data = b""
        while b"\r\n\r\n" not in data:
            received = await self.reader.read(65536)
            if not received:
                break
            self.incoming.write(received)
            with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                while True:
                    data += self.tls.read(65536)
        return data


async def tls_client(port: int, first: bytes = b"") -> TlsClient:
    """A TLS client that sends `first` in the same write as its handshake's last bytes, as one
    whose request is ready does; then only what the test makes it: left alone, it never
    answers the server's close_notify."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = unverified.wrap_bio(incoming, outgoing)
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            writer.write(outgoing.read())
            received = await reader.read(65536)
            if not received:
                raise ConnectionError("closed during the handshake") from None
            incoming.write(received)
    if first:
        tls.write(first)
    writer.write(outgoing.read())
    return TlsClient(reader, writer, incoming, tls)


async def until(condition: Callable[[], bool], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def test_a_request_sent_with_the_end_of_its_handshake_is_answered(
    run: Callable[[Awaitable[bytes]], bytes],
) -> None:
    # asyncio's TLS reads the request as the handshake ends, before `start_tls` returns.
    async def scenario() -> bytes:
        async with tls_edge(limits()) as edge:
            client = await tls_client(edge.port, first=REQUEST)
            return await asyncio.wait_for(client.answer(), 5)

    assert run(scenario()).startswith(b"HTTP/1.1 200 OK")


def test_silent_clients_closed_to_admit_new_ones_are_closed_at_once(
    run: Callable[[Awaitable[int]], int],
) -> None:
    # Handshakes done, then silence: a graceful close would wait for their close_notify, and
    # keep them open and counted beyond the bound meanwhile.
    async def scenario() -> int:
        async with tls_edge(limits(bound=2)) as edge:
            clients = []  # kept: a client collected would close its socket
            for _ in range(6):
                clients.append(await tls_client(edge.port))
                assert await until(lambda: all(c.server for c in edge.connections), 5)
            await until(lambda: len(edge.connections) <= 2, TLS_SHUTDOWN_S / 2)
            for client in clients:
                client.writer.close()
            return len(edge.connections)

    assert run(scenario()) <= 2


def test_a_client_that_never_answers_close_notify_is_not_kept_open(
    run: Callable[[Awaitable[bool]], bool],
) -> None:
    # Half-sent headers get 408 and a graceful close, whose wait for the client's close_notify
    # (asyncio's 30 s) is the header timeout here.
    async def scenario() -> bool:
        async with tls_edge(limits(header_timeout_s=0.5, keep_alive_s=1)) as edge:
            client = await tls_client(edge.port, first=b"GET / HTTP/1.1\r\n")
            assert await until(lambda: bool(edge.connections), 5)
            closed = await until(lambda: not edge.connections, 5)
            client.writer.close()
            return closed

    assert run(scenario())


class DropAfterHandshake:
    """The loop, as the edge's protocol sees it, with a sweep or an eviction dropping the
    connection between the end of its handshake and the edge's resuming: its TLS transport
    does not know yet."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.dropped: list[EdgeProtocol] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)

    async def start_tls(self, transport: Any, protocol: Any, *args: Any, **kwargs: Any) -> Any:
        secured = await self._loop.start_tls(transport, protocol, *args, **kwargs)
        protocol._drop()
        self.dropped.append(protocol)
        return secured


def test_a_connection_dropped_as_its_handshake_ends_is_not_opened(
    run: Callable[[Awaitable[None]], None],
) -> None:
    loop: DropAfterHandshake | None = None

    async def scenario() -> None:
        nonlocal loop
        loop = DropAfterHandshake(asyncio.get_running_loop())
        async with tls_edge(limits(), loop=loop) as edge:
            client = await tls_client(edge.port)
            assert await until(lambda: not edge.connections, 2)
            client.writer.close()

    run(scenario())
    assert loop is not None
    (dropped,) = loop.dropped
    # Opened, it would have been put back among the waiting, for a new client to "make way"
    # by closing it again. uvicorn's connection_made is what tells its address.
    assert dropped.server is None


def test_the_summary_names_the_listener_when_its_first_client_failed_its_handshake(
    run: Callable[[Awaitable[str]], str],
) -> None:
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    edge_log = logging.getLogger("torchgate.edge")

    async def scenario() -> str:
        async with tls_edge(limits(header_timeout_s=0.2, keep_alive_s=1)) as edge:
            reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
            writer.write(REQUEST)  # plain HTTP to an https:// port
            await reader.read()
            writer.close()
            assert await until(lambda: any("TLS handshake failed" in m for m in messages), 5)
            return f"127.0.0.1:{edge.port}"

    edge_log.addHandler(handler)
    try:
        where = run(scenario())
    finally:
        edge_log.removeHandler(handler)
    assert any(where in message for message in messages), messages


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_a_connection_reset_after_its_answer_is_freed_at_once(
    run: Callable[[Awaitable[int]], int], tls: bool
) -> None:
    """A client that resets its keep-alive connection once answered (killed, or closing with
    unread data) left it held by its keep-alive timer until that fired: 8 KB each for
    `keep_alive_timeout` (620 s by default)."""

    async def scenario() -> int:
        async with tls_edge(limits(keep_alive_s=600), tls=tls) as edge:
            served: list[weakref.ref[Any]] = []
            for _ in range(20):
                if tls:
                    client = await tls_client(edge.port, first=REQUEST)
                    answer = await asyncio.wait_for(client.answer(), 5)
                    sock = client.writer.get_extra_info("socket")
                else:
                    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
                    writer.write(REQUEST)
                    answer = await asyncio.wait_for(reader.readuntil(b"ok"), 5)
                    sock = writer.get_extra_info("socket")
                assert answer.startswith(b"HTTP/1.1 200 OK")
                served.extend(weakref.ref(conn) for conn in edge.connections)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                (client.writer if tls else writer).transport.abort()  # RST, not FIN
            assert await until(lambda: not edge.connections, 5)
            await asyncio.sleep(0.05)
            gc.collect()
            return sum(1 for conn in served if conn() is not None)

    assert run(scenario()) == 0
