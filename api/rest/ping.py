"""`/ping`: TorchServe's health check, as plain ASGI.

TorchServe 0.12 answers it for every method (GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH), and
below it too (`/ping/`, `/ping/anything`: it looks at the first path segment only). Load
balancers and probes call it several times a second, some with HEAD: so it goes past FastAPI's
routing, as the prediction paths do, and answers them all. It needs no token, as in TorchServe.
Healthy is `DataPlane.ready()`.
"""

from __future__ import annotations

from api.core.dataplane import DataPlane
from api.encoding import JSON, dumps
from api.request_ids import request_id
from api.rest.asgi import Receive, Scope, Send, header_dict, send_response

HEALTHY = dumps({"status": "Healthy"})
UNHEALTHY = dumps({"status": "Unhealthy"})


def is_ping_path(path: str) -> bool:
    return path == "/ping" or path.startswith("/ping/")


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
