"""`/ping`: TorchServe's health check, as plain ASGI.

TorchServe 0.12 answers it for every method (GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH), with
or without a trailing slash, and load balancers and probes call it several times a second, some
with HEAD: so it goes past FastAPI's routing, as the prediction paths do, and answers them all.
It needs no token, as in TorchServe. Healthy is `DataPlane.ready()`.
"""

from __future__ import annotations

from api.core.dataplane import DataPlane
from api.encoding import JSON, dumps
from api.request_ids import request_id
from api.rest.asgi import Receive, Scope, Send, header_dict, send_response

PATHS = frozenset({"/ping", "/ping/"})
HEALTHY = dumps({"status": "Healthy"})
UNHEALTHY = dumps({"status": "Unhealthy"})


def is_ping_path(path: str) -> bool:
    return path in PATHS


class PingEndpoint:
    """200 `{"status": "Healthy"}`, or 500 `{"status": "Unhealthy"}` while the server is not.

    A body sent with it is not read: the server discards it once the answer is complete.
    """

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        healthy = self.dataplane.ready()
        headers = [("content-type", JSON), ("x-request-id", request_id(header_dict(scope)))]
        await send_response(
            send, 200 if healthy else 500, HEALTHY if healthy else UNHEALTHY, headers
        )
