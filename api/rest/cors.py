"""TorchServe's CORS headers on every HTTP answer, on all three ports.

TorchServe (NettyUtils.sendHttpResponse) adds, to every response it sends and unless the
response already has them:

    Access-Control-Allow-Origin   cors_allowed_origin, as written
    Access-Control-Allow-Methods  cors_allowed_methods, as written
    Access-Control-Allow-Headers  cors_allowed_headers, as written

whatever the request's `Origin` (none included), each only when its key is set. Preflight
requests get no answer of their own: an `OPTIONS` is routed as any other method (TorchServe
answers `OPTIONS /` with the API description, and 405 where a path has no OPTIONS).

One difference: a comma-separated list of origins in `cors_allowed_origin` is sent verbatim by
TorchServe, which no browser accepts (the header takes one origin or `*`). torchgate sends the
request's own `Origin` when the list holds it (with `Vary: Origin`), and no origin header
otherwise. On the management port with token authorization off, an `Origin` the key does not
allow is refused before this runs (api.rest.origin).
"""

from __future__ import annotations

from api.rest.asgi import ASGIApp, Message, Receive, Scope, Send, header_dict


class CorsHeaders:
    """ASGI middleware adding the three headers (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, origin: str, methods: str = "", headers: str = "") -> None:
        self.app = app
        origins = [o.strip() for o in origin.split(",") if o.strip()]
        # One value (an origin or "*"): sent as written, as TorchServe does.
        self.single = origin.strip() if len(origins) == 1 else None
        self.listed = (
            frozenset(o.rstrip("/").lower() for o in origins) if len(origins) > 1 else None
        )
        self.fixed: list[tuple[bytes, bytes]] = []
        if methods.strip():
            self.fixed.append((b"access-control-allow-methods", methods.strip().encode("latin-1")))
        if headers.strip():
            self.fixed.append((b"access-control-allow-headers", headers.strip().encode("latin-1")))

    @property
    def active(self) -> bool:
        return bool(self.single or self.listed or self.fixed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        added = list(self.fixed)
        if self.single is not None:
            added.append((b"access-control-allow-origin", self.single.encode("latin-1")))
        elif self.listed is not None:
            origin = header_dict(scope).get("origin")
            if origin is not None and origin.rstrip("/").lower() in self.listed:
                added.append((b"access-control-allow-origin", origin.encode("latin-1")))
            added.append((b"vary", b"Origin"))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend(h for h in added if h[0] not in present)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def with_cors(app: ASGIApp, *, origin: str, methods: str, headers: str) -> ASGIApp:
    """`app` wrapped when any of the three keys is set, else `app` itself."""
    cors = CorsHeaders(app, origin=origin, methods=methods, headers=headers)
    return cors if cors.active else app
