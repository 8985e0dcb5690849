"""TorchServe's management API over HTTP (port 8081): each route decodes its query into the
arguments of `api.management` and sends the `Reply` it gets back as JSON.

Query values are plain strings here and parsed leniently by `api.management.params`, as
TorchServe parses them (`batch_size=dd` means the default, not a 400). A trailing slash
(`DELETE /models/m/`) names the same resource, as in TorchServe, rather than a redirect.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from api.auth import TokenAuth
from api.core.registry import Registry
from api.errors import BadRequest
from api.management import ListArgs, Management, RegisterArgs, Reply, ScaleArgs
from api.management.params import lenient_bool
from api.model_loader import ModelLoader
from api.rest.asgi import EVERY_METHOD
from api.rest.responses import JsonResponse

# The query parameters of list and scale, parsed leniently as TorchServe does (api.management).
ListQuery = Annotated[ListArgs, Depends(ListArgs.from_query)]
ScaleQuery = Annotated[ScaleArgs, Depends(ScaleArgs.from_query)]


def _send(reply: Reply) -> JsonResponse:
    return JsonResponse(reply.body, status_code=reply.status)


def _is_json(request: Request) -> bool:
    content_type = request.headers.get("content-type", "")
    return content_type.split(";")[0].strip().lower() == "application/json"


def _json_fields(body: bytes, names: dict[str, str | None]) -> dict[str, str | None]:
    """The register fields of a JSON object body, as the query's strings (then parsed the
    same lenient way); fields it does not name are not given."""
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise BadRequest(f"Invalid JSON body: {exc}") from None
    if not isinstance(document, dict):
        raise BadRequest("The JSON body must be an object of register parameters")
    fields: dict[str, str | None] = dict.fromkeys(names)
    for key in names:
        value = document.get(key)
        if value is None:
            continue
        fields[key] = json.dumps(value) if isinstance(value, bool) else str(value)
    return fields


def management_router(
    registry: Registry,
    loader: ModelLoader,
    *,
    enable_model_api: bool,
    auth: TokenAuth | None,
) -> APIRouter:
    router = APIRouter(tags=["management"])
    management = Management(registry, loader, enable_model_api=enable_model_api)

    @router.options("/", include_in_schema=False)
    # TorchServe describes its API whatever the method.
    @router.api_route("/api-description", methods=list(EVERY_METHOD), include_in_schema=False)
    async def api_description(request: Request) -> JsonResponse:
        """This API's OpenAPI document, where TorchServe serves its own."""
        document: dict[str, Any] = request.app.openapi()
        return JsonResponse(document)

    @router.post("/models")
    async def register_model(
        request: Request,
        url: str | None = None,
        model_name: str | None = None,
        runtime: str | None = None,
        handler: str | None = None,
        batch_size: str | None = None,
        max_batch_delay: str | None = None,
        initial_workers: str | None = None,
        synchronous: str | None = None,
        response_timeout: str | None = None,
        startup_timeout: str | None = None,
    ) -> JsonResponse:
        fields = {
            "url": url,
            "model_name": model_name,
            "runtime": runtime,
            "handler": handler,
            "batch_size": batch_size,
            "max_batch_delay": max_batch_delay,
            "initial_workers": initial_workers,
            "synchronous": synchronous,
            "response_timeout": response_timeout,
            "startup_timeout": startup_timeout,
        }
        if _is_json(request):
            # TorchServe takes the same fields from a JSON body instead of the query.
            fields = _json_fields(await request.body(), fields)
        return _send(await management.register(RegisterArgs.from_query(**fields)))

    @router.get("/models")
    async def list_models(args: ListQuery) -> JsonResponse:
        return _send(management.list_models(args))

    @router.get("/models/{model_name}")
    async def describe_default(
        request: Request, model_name: str, customized: str | None = None
    ) -> JsonResponse:
        return _send(await _describe(request, model_name, None, customized))

    @router.get("/models/{model_name}/all")
    async def describe_all(model_name: str) -> JsonResponse:
        # As TorchServe: every version described plainly, `customized` or not.
        return _send(await management.describe(model_name, "all"))

    @router.get("/models/{model_name}/{version}")
    async def describe_version(
        request: Request, model_name: str, version: str, customized: str | None = None
    ) -> JsonResponse:
        return _send(await _describe(request, model_name, version, customized))

    async def _describe(
        request: Request, model_name: str, version: str | None, customized: str | None
    ) -> Reply:
        # TorchServe hands the client's request headers to describe_handle().
        return await management.describe(
            model_name,
            version,
            customized=lenient_bool(customized, False),
            headers=dict(request.headers),
        )

    @router.put("/models/{model_name}")
    async def scale_default(
        model_name: str, args: ScaleQuery, model_version: str | None = None
    ) -> JsonResponse:
        # TorchServe takes the version from `model_version` here (not on the versioned path).
        return _send(await management.scale(model_name, model_version, args))

    @router.put("/models/{model_name}/{version}/set-default")
    async def set_default(model_name: str, version: str) -> JsonResponse:
        return _send(management.set_default(model_name, version))

    @router.put("/models/{model_name}/{version}")
    async def scale_version(model_name: str, version: str, args: ScaleQuery) -> JsonResponse:
        return _send(await management.scale(model_name, version, args))

    @router.delete("/models/{model_name}")
    async def unregister_default(model_name: str) -> JsonResponse:
        return _send(await management.unregister(model_name))

    @router.delete("/models/{model_name}/{version}")
    async def unregister_version(model_name: str, version: str) -> JsonResponse:
        return _send(await management.unregister(model_name, version))

    # What one model's management API offers: TorchServe's answer to OPTIONS there, which is
    # also how a browser's CORS preflight for PUT or DELETE gets its 200. The version of
    # .../set-default is not looked up, as in TorchServe.
    @router.options("/models/{model_name}", include_in_schema=False)
    @router.options("/models/{model_name}/{version}/set-default", include_in_schema=False)
    async def model_api_description(request: Request, model_name: str) -> JsonResponse:
        registry.get(model_name)
        return JsonResponse(model_management_document(request.app.openapi(), model_name))

    @router.options("/models/{model_name}/{version}", include_in_schema=False)
    async def version_api_description(
        request: Request, model_name: str, version: str
    ) -> JsonResponse:
        registry.get(model_name, version)
        return JsonResponse(model_management_document(request.app.openapi(), model_name))

    if auth is None:
        # As TorchServe with its token plugin off: /token is not there at all (404).
        return router

    @router.post("/token")
    # TorchServe regenerates on /token whatever the method; its docs' examples are GETs.
    @router.api_route("/token", methods=list(EVERY_METHOD), include_in_schema=False)
    async def new_token(request: Request, type: str | None = None) -> JsonResponse:
        if type is None:
            raise BadRequest("Parameter type is required.")
        key = auth.regenerate(type, request.headers.get("authorization"))
        return JsonResponse({type: {"key": key}})

    return router


MODEL_PATHS = (
    "/models/{model_name}",
    "/models/{model_name}/{version}",
    "/models/{model_name}/{version}/set-default",
)


def model_management_document(document: dict[str, Any], model: str) -> dict[str, Any]:
    """The port's OpenAPI `document` cut to the paths that act on one model, titled as
    TorchServe titles its own (`RESTful Management API for: <model>`)."""
    info = {**document.get("info", {}), "title": f"RESTful Management API for: {model}"}
    paths = document.get("paths", {})
    return {
        **document,
        "info": info,
        "paths": {path: paths[path] for path in MODEL_PATHS if path in paths},
    }
