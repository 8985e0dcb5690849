"""The three HTTP apps, one per TorchServe port: inference, management, metrics."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response

from api.core.dataplane import DataPlane
from api.core.registry import Registry
from api.core.routing import TrafficRouter
from api.errors import Unauthenticated
from api.loader import ModelLoader
from api.observability.metrics import filter_samples
from api.rest.asgi import ASGIApp, Receive, Scope, Send, header_dict, send_response
from api.rest.errors import install_error_handlers
from api.rest.inference import inference_router
from api.rest.management import management_router
from api.rest.predictions import PredictionsEndpoint
from api.rest.responses import JsonResponse, error_parts
from api.rest.security import MANAGEMENT, TokenAuth
from api.rest.traffic import traffic_router
from api.rest.v2 import V2InferEndpoint, is_infer_path, v2_router


class InferenceApp:
    """Sends `POST /predictions/...` (and other registered hot paths) past FastAPI.

    Hot paths are matched by prefix and method only; all else is FastAPI's.
    """

    def __init__(self, fastapi_app: FastAPI) -> None:
        self.fastapi_app = fastapi_app
        self._hot: list[tuple[str, Callable[[str], bool], ASGIApp]] = []

    def add_hot_path(self, method: str, matches: Callable[[str], bool], app: ASGIApp) -> None:
        self._hot.append((method, matches, app))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            for hot_method, matches, app in self._hot:
                if method == hot_method and matches(path):
                    await app(scope, receive, send)
                    return
        await self.fastapi_app(scope, receive, send)


def build_inference_app(
    dataplane: DataPlane,
    *,
    max_request_size: int,
    auth: TokenAuth | None,
    max_items: int,
) -> InferenceApp:
    fastapi_app = FastAPI(
        title="torchgate inference API",
        description="TorchServe-compatible inference API (and KServe v2) served by torchgate",
        version="0.1.0",
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(fastapi_app)
    fastapi_app.include_router(inference_router(dataplane, fastapi_app))
    fastapi_app.include_router(v2_router(dataplane))
    app = InferenceApp(fastapi_app)
    predictions = PredictionsEndpoint(dataplane, max_request_size=max_request_size, auth=auth)
    app.add_hot_path("POST", lambda path: path.startswith("/predictions/"), predictions)
    v2_infer = V2InferEndpoint(
        dataplane, max_request_size=max_request_size, max_items=max_items, auth=auth
    )
    app.add_hot_path("POST", is_infer_path, v2_infer)
    return app


class RequireKey:
    """ASGI middleware: every request needs the given TorchServe key."""

    def __init__(self, app: ASGIApp, auth: TokenAuth, kind: str, *, exempt: tuple[str, ...]):
        self.app, self.auth, self.kind, self.exempt = app, auth, kind, exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.exempt:
            try:
                self.auth.check(self.kind, header_dict(scope).get("authorization"))
            except Unauthenticated as exc:
                status, body, headers = error_parts(exc)
                await send_response(send, status, body, headers)
                return
        await self.app(scope, receive, send)


def build_management_app(
    registry: Registry,
    loader: ModelLoader,
    *,
    enable_model_api: bool,
    auth: TokenAuth | None,
    router: TrafficRouter | None = None,
    browser_guard: Callable[[ASGIApp], ASGIApp] | None = None,
) -> ASGIApp:
    """`browser_guard` wraps the app when token auth is off (see api.rest.origin)."""
    app = FastAPI(
        title="torchgate management API",
        description="TorchServe-compatible management API served by torchgate",
        version="0.1.0",
    )
    install_error_handlers(app)
    if router is not None:
        # Before TorchServe's routes: /models/{m}/{version} would take "traffic" as a version.
        app.include_router(traffic_router(router))
    app.include_router(
        management_router(registry, loader, enable_model_api=enable_model_api, auth=auth)
    )

    # TorchServe's API description on this port too: `OPTIONS /` (a CORS preflight's answer)
    # and `GET /api-description`.
    @app.options("/", include_in_schema=False)
    @app.get("/api-description", include_in_schema=False)
    async def api_description() -> JsonResponse:
        return JsonResponse(app.openapi())

    if auth is None:
        return app if browser_guard is None else browser_guard(app)
    # /token is authorized by the API key inside its handler.
    return RequireKey(app, auth, MANAGEMENT, exempt=("/token",))


def build_metrics_app(render: Callable[[], bytes]) -> FastAPI:
    app = FastAPI(title="torchgate metrics API", docs_url=None, redoc_url=None)
    install_error_handlers(app)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        # TorchServe's name filter: /metrics?name[]=ts_inference_requests_total&name[]=...
        body = filter_samples(render(), request.query_params.getlist("name[]"))
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
