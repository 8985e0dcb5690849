"""The HTTP edge's limits on an https:// listener (api/rest/edge.py), against the real
`torchgate serve` with its self-signed certificate: a TLS handshake counts against the
connection bound and must end within the header timeout, as a request's headers must.

Attackers are raw TCP sockets that never start, or never finish, a handshake.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import time
from collections.abc import Iterator

import pytest

from tests.rest.test_edge import DIGIT, JSON_TYPE, address, config, connect
from tests.support.server import TorchgateServer, running_torchgate


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
