"""Bind every port before start-up goes further, so a port in use is one clear error line.

The HTTP sockets bound here are the ones uvicorn serves on (`api.server.serve(sockets=...)`).
gRPC binds its own ports (grpcio takes no ready socket), so those are only tried here: bound
and closed at once, which catches the common case (another server holds the port).
"""

from __future__ import annotations

import errno
import socket
from contextlib import suppress

from api.config import Address, Config


class StartupError(RuntimeError):
    """torchgate cannot start; the message is the one line the command line prints."""


def bind_listeners(config: Config) -> dict[Address, socket.socket]:
    """One listening socket per distinct HTTP address: APIs that share an address (KServe's
    layout puts inference and management on one port) share its socket, as
    `api.rest.apps.listeners` serves them."""
    bound: dict[Address, socket.socket] = {}
    try:
        for api, address in config.http_addresses():
            if address not in bound:
                bound[address] = _bind(f"{api}_address", address)
        for what, host, port in (
            ("grpc_inference_port", config.grpc_inference_address, config.grpc_inference_port),
            ("grpc_management_port", config.grpc_management_address, config.grpc_management_port),
        ):
            _bind(what, Address(host, port)).close()
    except StartupError:
        for sock in bound.values():
            sock.close()
        raise
    return bound


def _bind(what: str, address: Address) -> socket.socket:
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise StartupError(f"{what} {address}: cannot resolve {address.host!r}: {exc}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT ok
        sock.bind(sockaddr)
        sock.listen(4096)
    except OSError as exc:
        with suppress(OSError):
            sock.close()
        reason = "port in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise StartupError(f"cannot listen on {what} {address}: {reason}") from None
    return sock
