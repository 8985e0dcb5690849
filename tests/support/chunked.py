"""A minimal HTTP/1.1 client that keeps a chunked response's chunk boundaries.

httpx (like any client) joins chunks as the network delivers them; a streaming handler's
contract is one chunk per intermediate response, so the differential tests read the framing.

    reply = request_chunks("http://127.0.0.1:8080", "POST", "/predictions/m", b"body")
    reply.status, reply.headers, reply.chunks, reply.complete
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class ChunkedReply:
    status: int
    headers: dict[str, str]  # lower-case names
    chunks: list[bytes]  # one per chunk; a plain body is one chunk
    complete: bool  # False: the connection ended before the closing chunk


def request_chunks(
    base_url: str,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> ChunkedReply:
    url = urlsplit(base_url)
    assert url.hostname is not None and url.port is not None
    lines = [f"{method} {path} HTTP/1.1", f"Host: {url.hostname}:{url.port}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    with socket.create_connection((url.hostname, url.port), timeout=timeout) as sock:
        sock.sendall("\r\n".join(lines).encode("latin-1") + body)
        reader = _Reader(sock)
        status_line = reader.line()
        if status_line is None:
            raise ConnectionError(f"{method} {path}: the server closed without answering")
        status = int(status_line.split(b" ", 2)[1])
        reply_headers: dict[str, str] = {}
        while line := reader.line():
            name, _, value = line.decode("latin-1").partition(":")
            reply_headers[name.strip().lower()] = value.strip()
        if reply_headers.get("transfer-encoding", "").lower() != "chunked":
            length = int(reply_headers.get("content-length", "0"))
            data = b"" if method == "HEAD" else reader.exactly(length)
            return ChunkedReply(status, reply_headers, [data or b""], data is not None)
        chunks: list[bytes] = []
        while True:
            size_line = reader.line()
            if size_line is None or not size_line.strip():
                return ChunkedReply(status, reply_headers, chunks, False)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                return ChunkedReply(status, reply_headers, chunks, True)
            chunk = reader.exactly(size)
            if chunk is None or reader.line() is None:
                return ChunkedReply(status, reply_headers, chunks, False)
            chunks.append(chunk)


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.closed = False

    def _fill(self) -> bool:
        if self.closed:
            return False
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            data = b""
        if not data:
            self.closed = True
            return False
        self.buffer += data
        return True

    def line(self) -> bytes | None:
        """The next line without its CRLF; None at the end of the connection."""
        while b"\r\n" not in self.buffer:
            if not self._fill():
                return None
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def exactly(self, size: int) -> bytes | None:
        while len(self.buffer) < size:
            if not self._fill():
                return None
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data
