"""Exception handlers: each HTTP API answers errors in its own protocol's shape.

The app an API is served by knows which API it is: TorchServe's apps install
`torchserve_error_body` (`{"code", "type", "message"}`), the KServe app `kserve_error_body`
(`{"error": "..."}`). Status codes come from the one table in `api.errors` either way.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from api.encoding import JSON, ErrorBody, encode_error, torchserve_error_body
from api.errors import TorchgateError

_HTTP_ERRORS = {
    404: (
        "ResourceNotFoundException",
        "Requested resource is not found, please refer to API document.",
    ),
    405: (
        "MethodNotAllowedException",
        "Requested method is not allowed, please refer to API document.",
    ),
}


def install_error_handlers(app: FastAPI, encode: ErrorBody = torchserve_error_body) -> None:
    """Every error `app` raises or meets leaves it encoded by `encode`."""

    @app.exception_handler(TorchgateError)
    async def on_torchgate_error(request: Request, exc: TorchgateError) -> Response:
        encoded = encode_error(exc, encode)
        return Response(encoded.body, status_code=encoded.status, headers=dict(encoded.headers))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        body = encode(400, "BadRequestException", f"Invalid request: {problems}")
        return Response(body, status_code=400, media_type=JSON)

    @app.exception_handler(Exception)
    async def on_unexpected_error(request: Request, exc: Exception) -> Response:
        # A bug of ours, not the client's: Starlette logs its traceback and closes the
        # connection after this answer, which keeps the API's shape (not plain text).
        body = encode(500, "InternalServerException", "Internal server error")
        return Response(body, status_code=500, media_type=JSON)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        type_name, message = _HTTP_ERRORS.get(exc.status_code, ("HttpException", str(exc.detail)))
        body = encode(exc.status_code, type_name, message)
        return Response(body, status_code=exc.status_code, media_type=JSON)
