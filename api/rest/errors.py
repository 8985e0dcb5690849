"""Exception handlers: every error leaves FastAPI in TorchServe's `{"code", "type", "message"}`."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from api.errors import TorchgateError
from api.rest.responses import JSON, error_body, error_parts


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TorchgateError)
    async def on_torchgate_error(request: Request, exc: TorchgateError) -> Response:
        status, body, headers = error_parts(exc)
        return Response(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return Response(
            error_body(400, "BadRequestException", f"Invalid request: {problems}"),
            status_code=400,
            media_type=JSON,
        )

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
        return Response(
            error_body(exc.status_code, type_name, message),
            status_code=exc.status_code,
            media_type=JSON,
        )
