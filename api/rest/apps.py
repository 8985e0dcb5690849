"""The three HTTP apps, one per TorchServe port: inference, management, metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from api.auth import MANAGEMENT, TokenAuth
from api.core.dataplane import DataPlane
from api.core.registry import Registry
from api.core.routing import TrafficRouter
from api.core.workflow import Workflows
from api.encoding import encode_error, kserve_error_body, torchserve_error_body
from api.errors import Unauthenticated
from api.model_loader import ModelLoader
from api.observability.metrics import filter_samples
from api.rest.asgi import (
    EVERY_METHOD,
    ASGIApp,
    BodyLimit,
    Receive,
    RequestIdHeader,
    Scope,
    Send,
    TrailingSlashIgnored,
    header_dict,
    send_response,
)
from api.rest.endpoint import SizeLimits
from api.rest.errors import install_error_handlers
from api.rest.inference import inference_router, openapi_document
from api.rest.invocations import InvocationsEndpoint, is_invocation_path
from api.rest.kserve_v1 import (
    V1InferEndpoint,
    is_v1_infer_path,
    kserve_liveness_router,
    kserve_v1_router,
)
from api.rest.management import management_router
from api.rest.ping import PingEndpoint, is_ping_path
from api.rest.predictions import PREFIXES, PredictionsEndpoint
from api.rest.responses import JsonResponse
from api.rest.traffic import traffic_router
from api.rest.v2 import V2InferEndpoint, is_infer_path, v2_router
from api.rest.workflows import WfPredictEndpoint, is_wfpredict_path, workflow_router


class InferenceApp:
    """The inference port: TorchServe's API, and the other protocols served beside it.

    `POST /predictions/...` (and other registered hot paths) go past FastAPI, matched by
    method and path only. Each other protocol (KServe's) is its own app under its own path
    prefix, so its routes, 404s and error bodies are its own; all else is TorchServe's app.
    """

    def __init__(self, torchserve_app: ASGIApp) -> None:
        self.torchserve_app = torchserve_app
        self._hot: list[tuple[frozenset[str], Callable[[str], bool], ASGIApp]] = []
        self._apis: list[tuple[str, ASGIApp]] = []

    def add_hot_path(
        self, methods: Iterable[str], matches: Callable[[str], bool], app: ASGIApp
    ) -> None:
        self._hot.append((frozenset(methods), matches, app))

    def add_api(self, prefix: str, app: ASGIApp) -> None:
        """Serves `prefix` and every path below it with `app`."""
        self._apis.append((prefix, app))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            for methods, matches, app in self._hot:
                if method in methods and matches(path):
                    await app(scope, receive, send)
                    return
        if scope["type"] in ("http", "websocket"):
            path = scope["path"]
            for prefix, app in self._apis:
                if path == prefix or path.startswith(prefix + "/"):
                    await app(scope, receive, send)
                    return
        await self.torchserve_app(scope, receive, send)


def build_inference_app(
    dataplane: DataPlane,
    *,
    max_request_size: int,
    max_response_size: int,
    auth: TokenAuth | None,
    max_items: int,
    workflows: Workflows | None = None,
    startup_models: Callable[[], Collection[str]] = frozenset,
) -> InferenceApp:
    """`startup_models`: the models registered at start (where `/invocations` without a model
    name goes when there is one)."""
    fastapi_app = FastAPI(
        title="torchgate inference API",
        description="TorchServe-compatible inference API (and KServe v2) served by torchgate",
        version="0.1.0",
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(fastapi_app, torchserve_error_body)
    # KServe's protocols: each its own app with KServe's error body, under its own prefix.
    kserve_v1 = _kserve_app("KServe v1", kserve_v1_router(dataplane))
    kserve_v2 = _kserve_app("KServe v2", v2_router(dataplane))
    fastapi_app.include_router(
        inference_router(lambda: openapi_document(fastapi_app, kserve_v1, kserve_v2))
    )
    fastapi_app.include_router(kserve_liveness_router())  # KServe v1's `GET /`
    app = InferenceApp(
        RequestIdHeader(TrailingSlashIgnored(BodyLimit(fastapi_app, max_request_size)))
    )
    for prefix, kserve_app in (("/v1", kserve_v1), ("/v2", kserve_v2)):
        limited = BodyLimit(kserve_app, max_request_size, kserve_error_body)
        app.add_api(prefix, RequestIdHeader(limited))
    app.add_hot_path(EVERY_METHOD, is_ping_path, PingEndpoint(dataplane))
    limits = SizeLimits(request=max_request_size, response=max_response_size)
    predictions = PredictionsEndpoint(dataplane, limits=limits, auth=auth)
    # TorchServe runs inference for any method there (OPTIONS: the model's description).
    app.add_hot_path(EVERY_METHOD, lambda path: path.startswith(PREFIXES), predictions)
    for matches, endpoint in (
        (is_infer_path, V2InferEndpoint),
        (is_v1_infer_path, V1InferEndpoint),
    ):
        app.add_hot_path(
            ("POST",),
            matches,
            endpoint(dataplane, limits=limits, max_items=max_items, auth=auth),
        )
    if workflows is not None:
        # TorchServe runs a workflow for any method on /wfpredict/{name}; POST and GET here.
        wfpredict = WfPredictEndpoint(workflows, limits=limits, auth=auth)
        app.add_hot_path(("POST", "GET"), is_wfpredict_path, wfpredict)
    # Matched last: the paths above are the busy ones.
    invocations = InvocationsEndpoint(
        dataplane, limits=limits, startup_models=startup_models, auth=auth
    )
    app.add_hot_path(EVERY_METHOD, is_invocation_path, invocations)
    return app


def _kserve_app(title: str, router: APIRouter) -> FastAPI:
    app = FastAPI(title=title, openapi_url=None, docs_url=None, redoc_url=None)
    install_error_handlers(app, kserve_error_body)
    app.include_router(router)
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
                refusal = encode_error(exc)
                await send_response(send, refusal.status, refusal.body, refusal.headers)
                return
        await self.app(scope, receive, send)


def build_management_app(
    registry: Registry,
    loader: ModelLoader,
    *,
    enable_model_api: bool,
    auth: TokenAuth | None,
    max_request_size: int,
    router: TrafficRouter | None = None,
    browser_guard: Callable[[ASGIApp], ASGIApp] | None = None,
    workflows: Workflows | None = None,
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

    if workflows is not None:
        app.include_router(workflow_router(workflows))
    if auth is None:
        guarded = app if browser_guard is None else browser_guard(app)
        return RequestIdHeader(TrailingSlashIgnored(BodyLimit(guarded, max_request_size)))
    # /token is authorized by the API key inside its handler.
    keyed = RequireKey(app, auth, MANAGEMENT, exempt=("/token",))
    # The size first, as TorchServe's: its 413 comes before the key is looked at.
    return RequestIdHeader(TrailingSlashIgnored(BodyLimit(keyed, max_request_size)))


def build_metrics_app(render: Callable[[], bytes]) -> ASGIApp:
    app = FastAPI(title="torchgate metrics API", docs_url=None, redoc_url=None)
    install_error_handlers(app)

    @app.options("/", include_in_schema=False)
    # TorchServe describes each port's API there too, whatever the method.
    @app.api_route("/api-description", methods=list(EVERY_METHOD), include_in_schema=False)
    async def api_description() -> JsonResponse:
        return JsonResponse(app.openapi())

    @app.get("/metrics")
    # TorchServe answers /metrics whatever the method (GET is the documented one), and any
    # path below it.
    @app.api_route("/metrics", methods=list(EVERY_METHOD), include_in_schema=False)
    @app.api_route("/metrics/{rest:path}", methods=list(EVERY_METHOD), include_in_schema=False)
    async def metrics(request: Request) -> Response:
        # TorchServe's name filter: /metrics?name[]=ts_inference_requests_total&name[]=...
        names = request.query_params.getlist("name[]")
        # In a thread: a page of many series takes long enough to stall every request on the
        # loop (1.3 s with 1000 unregistered versions' series); `render` may run off the loop.
        body = await asyncio.to_thread(lambda: filter_samples(render(), names))
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    return RequestIdHeader(TrailingSlashIgnored(app))


class SharedPort:
    """One listener for APIs configured on the same address, as TorchServe allows.

    KServe's TorchServe examples put `inference_address` and `management_address` on the same
    port (8085). Paths are TorchServe's: `/models...`, `/token` and `/workflows...` are the
    management API's, except `/models/{m}/invoke` (an inference path, asked first there too),
    `/metrics` (and any path below it) the metrics API's, everything else the inference API's.
    """

    def __init__(self, apps: dict[str, ASGIApp]) -> None:
        self.apps = apps  # by kind: "inference", "management", "metrics"
        self.default = apps.get("inference") or next(iter(apps.values()))

    def app_for(self, path: str) -> ASGIApp:
        first = path.split("/", 2)[1] if path.count("/") else ""
        if (
            first in ("models", "token", "workflows")
            and "management" in self.apps
            and not is_invocation_path(path)
        ):
            return self.apps["management"]
        if first == "metrics" and "metrics" in self.apps:
            return self.apps["metrics"]
        return self.default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app_for(scope.get("path", ""))(scope, receive, send)


def listeners(apps: list[tuple[str, ASGIApp, Any]]) -> list[tuple[ASGIApp, Any]]:
    """(app, address) per distinct address: APIs that share one are served by a `SharedPort`."""
    by_address: dict[Any, dict[str, ASGIApp]] = {}
    for kind, app, address in apps:
        by_address.setdefault(address, {})[kind] = app
    return [
        (next(iter(group.values())) if len(group) == 1 else SharedPort(group), address)
        for address, group in by_address.items()
    ]
