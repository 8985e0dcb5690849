"""HTTP edge limits (api/rest/edge.py) against the real `torchgate serve` serving digits.

Good traffic runs beside each attack (a keep-alive client posting digits in a loop) and must see
no error. Attackers are raw sockets, since an HTTP client would not send what they send.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from api.config import ConfigError, parse_config
from api.rest.edge import JOIN_BYTES, Outbox, TurnWriter
from tests.support.archives import build_archive
from tests.support.server import TorchgateServer, running_torchgate

ROOT = Path(__file__).resolve().parents[2]
DIGIT = json.dumps([0.0] * 64).encode()
JSON_TYPE = {"content-type": "application/json"}


def config(**extra: str) -> str:
    lines = {
        "model_store": str(ROOT / "model_store"),
        "load_models": "digits.mar",
        **{f"torchgate.{k}": v for k, v in extra.items()},
    }
    return "".join(f"{k}={v}\n" for k, v in lines.items())


@pytest.fixture(scope="module")
def bounded() -> Iterator[TorchgateServer]:
    """Default header size; 20 connections per listener; timeouts far beyond any test."""
    with running_torchgate(config(max_connections="20", header_timeout="120")) as tg:
        yield tg


@pytest.fixture(scope="module")
def hasty() -> Iterator[TorchgateServer]:
    """Short timeouts: half a second for headers (and body pauses), 1 s idle."""
    with running_torchgate(config(header_timeout="0.5", keep_alive_timeout="1")) as tg:
        yield tg


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def connect(url: str) -> socket.socket:
    return socket.create_connection(address(url), timeout=30)


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (a reset after its answer counts as a close)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer.split(b" ", 2)[1])


@dataclass
class GoodTraffic:
    """A client posting digits over one keep-alive connection until stopped."""

    url: str
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        host, port = address(self.url)
        conn = http.client.HTTPConnection(host, port, timeout=30)
        while not self.stop.is_set():
            started = time.perf_counter()
            try:
                conn.request("POST", "/predictions/digits", DIGIT, JSON_TYPE)
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    self.errors.append(f"status {response.status}")
            except (OSError, http.client.HTTPException) as exc:
                self.errors.append(repr(exc))
                conn.close()
            self.latencies.append(time.perf_counter() - started)
            time.sleep(0.01)
        conn.close()


@contextmanager
def good_traffic(url: str, clients: int = 2) -> Iterator[list[GoodTraffic]]:
    traffic = [GoodTraffic(url) for _ in range(clients)]
    threads = [threading.Thread(target=t.run, daemon=True) for t in traffic]
    for thread in threads:
        thread.start()
    time.sleep(0.3)  # it is flowing before the attack starts
    try:
        yield traffic
    finally:
        for t in traffic:
            t.stop.set()
        for thread in threads:
            thread.join(timeout=60)


def test_huge_header_gets_431_quickly_and_others_keep_being_served(
    bounded: TorchgateServer,
) -> None:
    with good_traffic(bounded.inference_url) as traffic:
        sock = connect(bounded.inference_url)

        def send_huge_header() -> None:
            # Up to 256 MiB of one header: the unbounded server parsed it for over 55 s.
            try:
                sock.sendall(b"GET /ping HTTP/1.1\r\nhost: x\r\nx-big: ")
                chunk = b"a" * (1 << 20)
                for _ in range(256):
                    sock.sendall(chunk)
            except OSError:
                pass  # the server answered 431 and closed

        sender = threading.Thread(target=send_huge_header, daemon=True)
        started = time.perf_counter()
        sender.start()
        answer = sock.recv(65536)
        elapsed = time.perf_counter() - started
        sock.close()
        sender.join(timeout=60)
    assert status_of(answer) == 431, answer[:200]
    assert b"RequestHeaderFieldsTooLargeException" in answer
    assert elapsed < 10
    latencies = [s for t in traffic for s in t.latencies]
    assert [e for t in traffic for e in t.errors] == []
    assert len(latencies) > 10
    assert max(latencies) < 5  # the unbounded server froze every API for 3.6 s at 64 MiB


def test_header_just_under_the_limit_is_served(bounded: TorchgateServer) -> None:
    host, port = address(bounded.inference_url)
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/ping", headers={"x-pad": "a" * 60_000})
    assert conn.getresponse().status == 200
    conn.close()


def test_pipelined_requests_are_all_answered(bounded: TorchgateServer) -> None:
    sock = connect(bounded.inference_url)
    sock.sendall(
        b"GET /ping HTTP/1.1\r\nhost: x\r\n\r\n" * 3
        + b"GET /ping HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    answer = read_all(sock)
    sock.close()
    assert answer.count(b"HTTP/1.1 200 OK") == 4


def answers_of(stream: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each answer in a stream of Content-Length framed answers."""
    answers = []
    while stream:
        head, _, rest = stream.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        answers.append((status_of(head), rest[:length]))
        stream = rest[length:]
    return answers


@pytest.mark.parametrize(
    "upgrade",
    [
        # curl --http2 to an http:// URL
        b"connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\n"
        b"http2-settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n",
        b"connection: upgrade\r\nupgrade: websocket\r\nsec-websocket-key: dGhlIHNhbXBsZQ==\r\n",
    ],
    ids=["h2c", "websocket"],
)  # fmt: skip
def test_a_request_asking_to_upgrade_is_answered_as_a_plain_one(
    bounded: TorchgateServer, upgrade: bytes
) -> None:
    """As TorchServe answers it: the body reaches the handler, the connection stays HTTP/1.1
    (the request after it is answered too). llhttp alone skipped the body and read it as the
    next request: the handler saw none, then the client got a 400 and a closed connection."""
    body = json.dumps([[0.0] * 64] * 2000).encode()  # more than one read
    sock = connect(bounded.inference_url)
    for payload in (DIGIT, body):
        sock.sendall(
            b"POST /predictions/digits HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + upgrade
            + b"content-length: %d\r\n\r\n" % len(payload)
            + payload
        )
    sock.sendall(b"GET /ping HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    [(one, digit), (many, refused), (ping, healthy)] = answers_of(read_all(sock))
    sock.close()
    assert (one, many, ping) == (200, 400, 200)
    assert json.loads(digit) and b"got 128000" in refused  # the handler saw every byte
    assert json.loads(healthy) == {"status": "Healthy"}


def test_a_malformed_chunk_in_the_body_being_read_is_refused_at_once(
    bounded: TorchgateServer,
) -> None:
    """The request in progress is the malformed one: its app waits for the rest of the body,
    so there is nothing to answer first (deferring the 400 would hang the connection)."""
    sock = connect(bounded.inference_url)
    sock.sendall(
        b"POST /predictions/digits HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\n\r\n5\r\n[0.0,\r\n"
    )
    time.sleep(0.3)  # the app is reading the body by now
    sock.sendall(b"ZZZ\r\n")
    sock.settimeout(10)  # bounded's header timeout is 120 s: a hang fails here
    answer = read_all(sock)
    sock.close()
    assert status_of(answer) == 400


def test_many_pipelined_upgrade_requests_are_all_answered(bounded: TorchgateServer) -> None:
    count = 1500  # past Python's recursion limit, were each re-parse a call deeper
    sock = connect(bounded.inference_url)
    sock.sendall(
        b"GET /ping HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n" * count
        + b"GET /ping HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    answers = answers_of(read_all(sock))
    sock.close()
    assert [status for status, _ in answers] == [200] * (count + 1)


def test_a_malformed_request_behind_a_good_one_is_refused_after_its_answer(
    bounded: TorchgateServer,
) -> None:
    """The good requests read in the same bytes are answered first, as TorchServe does, then
    the 400 and the close; uvicorn alone sent only the 400."""
    sock = connect(bounded.inference_url)
    sock.sendall(
        b"POST /predictions/digits HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%sGET /ping HTTP/1.1\r\nhost: x\r\n\r\nXYZ\r\n\r\n"
        % (len(DIGIT), DIGIT)
    )
    answers = answers_of(read_all(sock))
    sock.close()
    assert [status for status, _ in answers] == [200, 200, 400]
    assert answers[2][1] == b"Invalid HTTP request received."


def test_a_head_request_gets_its_head_and_no_body(bounded: TorchgateServer) -> None:
    # uvicorn writes no body for HEAD: the held head must still go out on its own.
    sock = connect(bounded.inference_url)
    sock.sendall(
        b"HEAD /predictions/digits HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(DIGIT), DIGIT)
    )
    answer = read_all(sock)
    sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert status_of(answer) == 200
    assert b"x-model-version: 1.0" in head
    assert body == b""


def test_expect_100_continue_is_answered_before_the_body_is_sent(
    bounded: TorchgateServer,
) -> None:
    sock = connect(bounded.inference_url)
    sock.sendall(
        b"POST /predictions/digits HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"expect: 100-continue\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(DIGIT)
    )
    sock.settimeout(5)  # a held "100 Continue" would leave the client waiting here
    interim = sock.recv(65536)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    sock.sendall(DIGIT)
    answer = read_all(sock)
    sock.close()
    assert status_of(answer) == 200
    assert json.loads(answer.partition(b"\r\n\r\n")[2])


def test_an_http_1_0_request_gets_no_100_continue(bounded: TorchgateServer) -> None:
    """HTTP/1.0 has no interim answers: the body is expected without one, as TorchServe does."""
    sock = connect(bounded.inference_url)
    sock.sendall(
        b"POST /predictions/digits HTTP/1.0\r\ncontent-type: application/json\r\n"
        b"expect: 100-continue\r\ncontent-length: %d\r\n\r\n%s" % (len(DIGIT), DIGIT)
    )
    answer = read_all(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:100]
    assert b"100 Continue" not in answer


def gc_collected(metrics_url: str) -> float:
    """Objects the server's cycle collector has freed so far (prometheus_client's counter)."""
    text = http_get(f"{metrics_url}/metrics")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("python_gc_objects_collected_total{")
    )


def http_get(url: str) -> str:
    host, port = address(url)
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", urlsplit(url).path)
    text = conn.getresponse().read().decode()
    conn.close()
    return text


def test_answering_predictions_leaves_no_reference_cycles(bounded: TorchgateServer) -> None:
    # Each request's objects must be freed by reference counting. A cycle per request (a
    # request and its stream callback, a transport and its response) made the cycle collector
    # walk every request in flight every few requests: about a quarter of the serving
    # process's CPU at 32 connections. Garbage that only the collector frees piles up between
    # collections and is counted when it runs, so 2,000 requests leaving cycles behind show
    # up here as tens of thousands of collected objects.
    host, port = address(bounded.inference_url)
    before = gc_collected(bounded.metrics_url)
    conn = http.client.HTTPConnection(host, port, timeout=30)
    for _ in range(2000):
        conn.request("POST", "/predictions/digits", DIGIT, JSON_TYPE)
        response = conn.getresponse()
        response.read()
        assert response.status == 200
    conn.close()
    collected = gc_collected(bounded.metrics_url) - before
    assert collected < 2000, f"{collected:.0f} objects left in reference cycles by 2000 requests"


def test_huge_header_pipelined_behind_a_request_is_refused(bounded: TorchgateServer) -> None:
    sock = connect(bounded.inference_url)
    try:
        sock.sendall(b"GET /ping HTTP/1.1\r\nhost: x\r\n\r\nGET /ping HTTP/1.1\r\nx-big: ")
        sock.sendall(b"a" * (1 << 20))
    except OSError:
        pass  # refused before it was all sent
    answer = read_all(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert b"HTTP/1.1 431" in answer or answer.count(b"HTTP/1.1") == 1


def test_half_sent_headers_are_answered_408_and_closed(hasty: TorchgateServer) -> None:
    with good_traffic(hasty.inference_url, clients=1) as traffic:
        sock = connect(hasty.inference_url)
        sock.sendall(b"POST /predictions/digits HTTP/1.1\r\nhost: x\r\ncontent-")
        started = time.perf_counter()
        answer = read_all(sock)
        elapsed = time.perf_counter() - started
        sock.close()
    assert status_of(answer) == 408
    assert 0.25 < elapsed < 30  # configured: 0.5 s
    assert [e for t in traffic for e in t.errors] == []


def test_half_sent_headers_pipelined_behind_a_request_get_the_header_timeout(
    hasty: TorchgateServer,
) -> None:
    """Not the idle timeout (620 s by default): the head began, so it must end in time."""
    sock = connect(hasty.inference_url)
    sock.sendall(b"GET /ping HTTP/1.1\r\nhost: x\r\n\r\nGET /ping HTTP/1.1\r\nhost: ")
    started = time.perf_counter()
    answers = answers_of(read_all(sock))
    elapsed = time.perf_counter() - started
    sock.close()
    assert [status for status, _ in answers] == [200, 408]
    assert elapsed < 30  # configured: 0.5 s; hasty's idle timeout is 1 s, so check the 408


@pytest.fixture(scope="module")
def hasty_and_slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchgateServer]:
    """`hasty`'s timeouts, serving a model that takes 1.5 s per request."""
    work = tmp_path_factory.mktemp("slow")
    store = work / "store"
    store.mkdir()
    build_archive(work, "slow", "slow.py", {"slow.py": SLOW_HANDLER}, export_dir=store)
    settings = {"header_timeout": "0.5", "keep_alive_timeout": "1"}
    lines = [f"model_store={store}", "load_models=slow.mar"]
    lines += [f"torchgate.{key}={value}" for key, value in settings.items()]
    with running_torchgate("\n".join(lines) + "\n") as tg:
        yield tg


SLOW_HANDLER = """
    import time

    def handle(data, context):
        if data is None:
            return None
        time.sleep(1.5)
        return ["slept" for _ in data]
"""
SLOW_REQUEST = b"POST /predictions/slow HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi"


@pytest.mark.parametrize(
    "stalled",
    [
        b"POST /predictions/slow HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nab",
        b"POST /predictions/slow HTTP/1.1\r\nhost: x\r\ncontent-",
    ],
    ids=["body", "headers"],
)
def test_a_request_stalled_behind_a_slow_one_gets_its_408_after_that_answer(
    hasty_and_slow: TorchgateServer, stalled: bytes
) -> None:
    """The 408 went out at the timeout, before the slow answer: the client read it as that
    request's answer, and the answer itself was lost."""
    sock = connect(hasty_and_slow.inference_url)
    sock.sendall(SLOW_REQUEST + stalled)
    answers = answers_of(read_all(sock))
    sock.close()
    assert answers == [(200, b"slept"), (408, answers[-1][1])], answers
    assert b"not received in time" in answers[-1][1]


def test_a_body_sent_slowly_behind_a_slow_request_is_served(
    hasty_and_slow: TorchgateServer,
) -> None:
    """Pauses shorter than the timeout, while queued behind the slow one, are no stall."""
    sock = connect(hasty_and_slow.inference_url)
    head = b"POST /predictions/slow HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\n"
    sock.sendall(SLOW_REQUEST + head)
    for piece in (b"a", b"b", b"c", b"d"):  # 1.2 s in all, within the slow one's 1.5 s
        time.sleep(0.3)
        sock.sendall(piece)
    answers = answers_of(read_all(sock))
    sock.close()
    assert answers == [(200, b"slept"), (200, b"slept")]


def test_what_the_edge_refuses_is_logged_as_a_summary(hasty: TorchgateServer) -> None:
    sock = connect(hasty.inference_url)
    sock.sendall(b"GET /ping HTTP/1.1\r\n")
    assert status_of(read_all(sock)) == 408
    sock.close()
    deadline = time.monotonic() + 30
    while "408 request not received in time" not in hasty.log_text():
        assert time.monotonic() < deadline, hasty.log_text()[-2000:]
        time.sleep(0.05)
    assert "refused or dropped connections" in hasty.log_text()


def test_a_body_that_stops_is_answered_408_and_closed(hasty: TorchgateServer) -> None:
    sock = connect(hasty.inference_url)
    sock.sendall(
        b"POST /predictions/digits HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 1000\r\n\r\n[0.0, 0.0"
    )
    answer = read_all(sock)
    sock.close()
    assert status_of(answer) == 408


def answered_before_its_body(url: str, length: int) -> socket.socket:
    """A connection whose POST /ping (which reads no body) is answered before its body of
    `length` bytes is sent."""
    sock = connect(url)
    sock.sendall(b"POST /ping HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % length)
    answer = b""
    while not answer.endswith(b"}"):  # the answer's JSON body: all of it, and nothing after
        chunk = sock.recv(65536)
        assert chunk, answer[:200]
        answer += chunk
    assert status_of(answer) == 200, answer[:200]
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sends until it closes, which it must do within `seconds`."""
    sock.settimeout(seconds)
    try:
        return read_all(sock)
    except TimeoutError:
        raise AssertionError(f"still open after {seconds} s") from None


def test_a_body_that_stops_after_its_answer_is_closed_without_a_408(
    hasty: TorchgateServer,
) -> None:
    """A 408 after the 200 would be read as the answer to the client's next request."""
    with answered_before_its_body(hasty.inference_url, 1) as sock:
        assert closed_within(sock, 10) == b""


def test_an_answered_connection_whose_body_then_ends_is_closed_when_idle(
    hasty: TorchgateServer,
) -> None:
    """The body's byte cancels uvicorn's keep-alive timer: the connection was kept for ever."""
    with answered_before_its_body(hasty.inference_url, 1) as sock:
        sock.sendall(b"x")
        started = time.perf_counter()
        assert closed_within(sock, 10) == b""
        assert time.perf_counter() - started > 0.5  # idle, not stalled: 1 s, not 0.5 s


def test_the_body_of_an_answered_request_has_one_timeout_in_all(hasty: TorchgateServer) -> None:
    """A byte every 0.3 s keeps within a 0.5 s pause but not within 0.5 s in all."""
    closed = False
    with answered_before_its_body(hasty.inference_url, 100) as sock:
        sock.settimeout(0.3)
        started = time.perf_counter()
        while not closed and time.perf_counter() - started < 5:
            try:
                closed = sock.recv(65536) == b""
            except TimeoutError:
                try:
                    sock.sendall(b"x")
                except OSError:  # reset, broken pipe
                    closed = True
            except ConnectionResetError:
                closed = True
    assert closed, "a body sent a byte at a time after its answer held the connection 5 s"


@pytest.mark.parametrize("rest", [b"xx", b"x"], ids=["body-ended", "body-arriving"])
def test_answered_connections_beyond_the_bound_make_way_for_good_clients(
    bounded: TorchgateServer, rest: bytes
) -> None:
    """Answered, their bodies ended or still arriving: none is a request in progress."""
    with ExitStack() as answered:
        for _ in range(20):
            answered.enter_context(answered_before_its_body(bounded.inference_url, 2)).sendall(rest)
        time.sleep(0.2)  # the server has read what they sent
        host, port = address(bounded.inference_url)
        for _ in range(3):
            conn = http.client.HTTPConnection(host, port, timeout=30)
            conn.request("GET", "/ping")
            assert conn.getresponse().status == 200
            conn.close()


def test_a_client_that_stops_reading_its_answers_is_disconnected(hasty: TorchgateServer) -> None:
    """Pipelined requests whose answers are never read fill the socket's buffers and pause
    the server's writes: past the read timeout (0.5 s here) the connection is cut, rather
    than held, with its request and unsent answer, for as long as the client likes. Until
    then at most MAX_PIPELINED requests wait to be answered: uvicorn kept reading and
    queueing them (1.2 GB of them in 5 s)."""
    memory_before = rss_mib(hasty.process.pid)
    with good_traffic(hasty.inference_url, clients=1) as traffic:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(address(hasty.inference_url))
        sock.settimeout(0.2)
        requests = b"OPTIONS / HTTP/1.1\r\nhost: x\r\n\r\n" * 50  # each answer: the API
        deadline = time.monotonic() + 15
        cut = False
        while not cut and time.monotonic() < deadline:
            try:
                sock.send(requests)
            except TimeoutError:  # the server stopped reading as well
                time.sleep(0.1)
            except OSError:  # reset, broken pipe
                cut = True
        sock.close()
    assert cut, "the connection was still open after 15 s of unread answers"
    assert [e for t in traffic for e in t.errors] == []
    assert rss_mib(hasty.process.pid) - memory_before < 100


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_connection_that_sends_nothing_is_closed_after_the_idle_timeout(
    hasty: TorchgateServer,
) -> None:
    sock = connect(hasty.management_url)
    started = time.perf_counter()
    assert read_all(sock) == b""
    assert 0.5 < time.perf_counter() - started < 30  # configured: 1 s
    sock.close()


def test_a_request_sent_in_pieces_is_answered(bounded: TorchgateServer) -> None:
    sock = connect(bounded.inference_url)
    request = (
        b"POST /predictions/digits HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n" % len(DIGIT)
    ) + DIGIT
    for piece in (request[:20], request[20:90], request[90:]):
        sock.sendall(piece)
        time.sleep(0.01)
    assert status_of(read_all(sock)) == 200
    sock.close()


def test_a_large_body_in_the_same_reads_as_its_headers_reaches_the_handler(
    bounded: TorchgateServer,
) -> None:
    body = json.dumps([[0.0] * 64] * 2000).encode()  # about 1 MiB, well past 64 KiB
    sock = connect(bounded.inference_url)
    sock.sendall(
        b"POST /predictions/digits HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body
    )
    answer = read_all(sock)
    # The handler saw the whole body (and refused its shape): nothing was cut at the edge.
    assert status_of(answer) == 400
    assert b"got 128000" in answer
    sock.close()


def test_stalled_connections_beyond_the_bound_make_way_for_good_clients(
    bounded: TorchgateServer,
) -> None:
    stalled = [connect(bounded.inference_url) for _ in range(200)]
    for sock in stalled:
        sock.sendall(b"GET /ping HTTP/1.1\r\nhost: x\r\n")  # and nothing more
    with good_traffic(bounded.inference_url) as traffic:
        time.sleep(0.5)
    for sock in stalled:
        sock.close()
    assert [e for t in traffic for e in t.errors] == []
    assert sum(len(t.latencies) for t in traffic) > 10


def test_connections_over_the_bound_with_requests_in_progress_get_503(
    bounded: TorchgateServer,
) -> None:
    # Headers complete, body still coming: a request in progress, which is never evicted.
    busy = [connect(bounded.management_url) for _ in range(20)]
    for sock in busy:
        sock.sendall(b"POST /models HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n")
    time.sleep(0.5)  # the server has read every header
    refused = connect(bounded.management_url)
    answer = read_all(refused)
    refused.close()
    assert status_of(answer) == 503
    assert b"Too many open connections" in answer
    # Other listeners are not affected.
    host, port = address(bounded.inference_url)
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/ping")
    assert conn.getresponse().status == 200
    conn.close()
    for sock in busy:
        sock.close()
    # Once they are gone the listener serves again.
    deadline = time.monotonic() + 30
    while True:
        host, port = address(bounded.management_url)
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request("GET", "/models")
        status = conn.getresponse().status
        conn.close()
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert status == 200


def test_a_flood_of_half_sent_requests_does_not_use_up_descriptors(
    bounded: TorchgateServer,
) -> None:
    fds = Path(f"/proc/{bounded.process.pid}/fd")
    before = len(os.listdir(fds))
    flood: list[socket.socket] = []
    with good_traffic(bounded.inference_url) as traffic:
        for _ in range(2000):
            sock = connect(bounded.metrics_url)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nhost: x\r\n")
            flood.append(sock)
        during = len(os.listdir(fds))
    for sock in flood:
        sock.close()
    assert [e for t in traffic for e in t.errors] == []
    # 20 per listener, plus connections closed a moment ago that the loop has not reaped yet.
    assert during - before < 200


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_header_size", "12"),
        ("max_header_size", "lots"),
        ("header_timeout", "0"),
        ("header_timeout", "inf"),
        ("keep_alive_timeout", "0.5"),
        ("max_connections", "0"),
    ],
)
def test_invalid_limits_are_refused(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"torchgate.{key}"):
        parse_config({f"torchgate.{key}": value}, base_dir=ROOT)


def test_limits_default_safely() -> None:
    limits = parse_config({}, base_dir=ROOT).http_limits
    assert limits.max_header_bytes == 65536
    assert limits.header_timeout_s == 20.0
    assert limits.keep_alive_timeout_s == 620  # past load balancers' idle timeouts
    assert limits.max_connections >= 16


class RecordingTransport:
    """Stands in for the socket transport only to see how the bytes are split into writes;
    the real-server tests above cover what reaches the client."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.eof = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def write_eof(self) -> None:
        self.eof = True


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


def test_a_turns_answers_go_out_at_its_end_in_order_each_in_one_write() -> None:
    loop = asyncio.new_event_loop()
    try:
        outbox = Outbox(loop)
        a, b = RecordingTransport(), RecordingTransport()
        writer_a = TurnWriter(a, outbox)  # type: ignore[arg-type]
        writer_b = TurnWriter(b, outbox)  # type: ignore[arg-type]
        writer_a.write(HEAD)
        writer_a.write(b"{}")
        writer_b.write(HEAD)
        writer_b.write(b"[]")
        assert a.writes == [] and b.writes == []  # held until the end of the turn
        loop.run_until_complete(asyncio.sleep(0))
        assert a.writes == [HEAD + b"{}"] and b.writes == [HEAD + b"[]"]
        writer_a.write(b"next")  # a stream's next chunk: the next turn's own write
        loop.run_until_complete(asyncio.sleep(0))
        assert a.writes[1:] == [b"next"]
    finally:
        loop.close()


def test_large_pieces_are_not_copied_and_closing_sends_what_is_pending_first() -> None:
    loop = asyncio.new_event_loop()
    try:
        outbox = Outbox(loop)
        sock = RecordingTransport()
        writer = TurnWriter(sock, outbox)  # type: ignore[arg-type]
        large = b"x" * (JOIN_BYTES + 1)
        writer.write(HEAD)
        writer.write(large)
        loop.run_until_complete(asyncio.sleep(0))
        assert sock.writes == [HEAD, large]

        sock = RecordingTransport()
        writer = TurnWriter(sock, outbox)  # type: ignore[arg-type]
        writer.write(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
        writer.close()
        assert sock.writes == [b"HTTP/1.1 500 Internal Server Error\r\n\r\n"] and sock.closed

        sock = RecordingTransport()
        writer = TurnWriter(sock, outbox)  # type: ignore[arg-type]
        writer.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n\r\n")
        writer.write_eof()
        assert len(sock.writes) == 1 and sock.eof

        # A connection closed before the end of the turn: its pending bytes go nowhere.
        sock = RecordingTransport()
        TurnWriter(sock, outbox).write(HEAD)  # type: ignore[arg-type]
        sock.closed = True
        loop.run_until_complete(asyncio.sleep(0))
        assert sock.writes == []
    finally:
        loop.close()
