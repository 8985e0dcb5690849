"""Refuses browser-made management requests when no token protects the management API.

With `disable_token_authorization=true` a web page the operator visits can still reach the
management port: a cross-origin "simple" POST needs no preflight, so `POST /models?url=...`
would register an archive (running its handler) on the page's behalf. DNS rebinding goes
further: a name the attacker controls resolves to 127.0.0.1, and the browser treats the
request as same-origin. Two checks close both, and neither affects clients that are not
browsers (curl, httpx, TorchServe's clients send no Origin and the listener's address as Host):

- `Host` must be the listener's address, a loopback address, `localhost`, or a name in
  `torchgate.allowed_hosts`. Listening on a wildcard address, any IP literal is the listener's
  own: rebinding always needs a DNS name, and names are what this refuses.
- `Origin`, when sent, must be the request's own origin or one `cors_allowed_origin` allows
  (TorchServe's key; `*` allows every origin). An allowed cross origin gets TorchServe's
  `Access-Control-Allow-Origin` header on the answer from api.rest.cors, as on every port.

Both answer 403 with TorchServe's error body; the server keeps serving everyone else.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from api.encoding import encode_error
from api.errors import Forbidden
from api.rest.asgi import ASGIApp, Receive, Scope, Send, header_dict, send_response

WILDCARDS = frozenset({"0.0.0.0", "::", ""})
LOCAL_NAMES = frozenset({"localhost"})


class HostPolicy:
    """Which `Host` header values a listener bound to `bound_host` answers."""

    def __init__(self, bound_host: str, names: Iterable[str] = ()) -> None:
        bound = bound_host.strip("[]").lower()
        self.wildcard = bound in WILDCARDS
        self.bound_ip = _ip(bound)
        self.names = LOCAL_NAMES | {name.lower() for name in names}
        if not self.wildcard and self.bound_ip is None:
            self.names |= {bound}  # bound by name: that name is the server's own

    def allows(self, host_header: str) -> bool:
        host = _host_name(host_header)
        if host in self.names:
            return True
        ip = _ip(host)
        if ip is None:
            return False  # a DNS name nobody configured: what rebinding uses
        return self.wildcard or ip.is_loopback or ip == self.bound_ip


class BrowserGuard:
    """ASGI middleware applying the module's two checks to every HTTP request."""

    def __init__(
        self, app: ASGIApp, hosts: HostPolicy, *, allowed_origins: Iterable[str] = ()
    ) -> None:
        self.app = app
        self.hosts = hosts
        self.allowed_origins = frozenset(o.rstrip("/").lower() for o in allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = header_dict(scope)
        host = headers.get("host")
        origin = headers.get("origin")
        if host is not None and not self.hosts.allows(host):
            await _refuse(send, f"Host {host!r} is not this server's address")
            return
        if origin is None or _same_origin(origin, host):
            await self.app(scope, receive, send)
            return
        if "*" not in self.allowed_origins and origin.rstrip("/").lower() not in (
            self.allowed_origins
        ):
            await _refuse(
                send,
                f"Cross-origin management request from {origin!r} refused: allow the origin "
                f"with cors_allowed_origin, or turn token authorization on",
            )
            return
        await self.app(scope, receive, send)


async def _refuse(send: Send, reason: str) -> None:
    refusal = encode_error(Forbidden(reason))
    await send_response(send, refusal.status, refusal.body, refusal.headers)


def _same_origin(origin: str, host: str | None) -> bool:
    """A page served from this very address (the API's own /docs) may call it."""
    return host is not None and urlsplit(origin).netloc.lower() == host.lower()


def _host_name(host_header: str) -> str:
    """`name`, `name:port`, `[::1]:port` -> the name or address, lower case."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host  # a bare IPv6 address, or a name


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None
