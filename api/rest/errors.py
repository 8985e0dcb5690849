"""Exception handlers: every error leaves FastAPI in TorchServe's `{"code", "type", "message"}`."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from api.errors import TorchgateError
from api.rest.responses import JSON, dumps, error_body, error_parts


def _is_v2(request: Request) -> bool:
    return request.url.path.startswith("/v2")


def install_error_handlers(app: FastAPI) -> None:
    """TorchServe's error body everywhere, except `{"error": ...}` on KServe v2 paths."""

    @app.exception_handler(TorchgateError)
    async def on_torchgate_error(request: Request, exc: TorchgateError) -> Response:
        status, body, headers = error_parts(exc)
        if _is_v2(request):
            body = dumps({"error": exc.message})
        return Response(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        message = f"Invalid request: {problems}"
        body = (
            dumps({"error": message})
            if _is_v2(request)
            else error_body(400, "BadRequestException", message)
        )
        return Response(body, status_code=400, media_type=JSON)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        type_name = {404: "ResourceNotFoundException", 405: "MethodNotAllowedException"}.get(
            exc.status_code, "HttpException"
        )
        message = (
            "Requested resource is not found, please refer to API document."
            if exc.status_code == 404
            else "Requested method is not allowed, please refer to API document."
            if exc.status_code == 405
            else str(exc.detail)
        )
        body = (
            dumps({"error": message})
            if _is_v2(request)
            else error_body(exc.status_code, type_name, message)
        )
        return Response(body, status_code=exc.status_code, media_type=JSON)
