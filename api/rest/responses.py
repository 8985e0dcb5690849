"""HTTP answers: TorchServe's error body with its status and headers, JSON responses (orjson)."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from api.encoding import JSON, dumps, error_body, prediction_parts
from api.errors import TorchgateError, http_status, retry_after

__all__ = ["JSON", "JsonResponse", "dumps", "error_body", "error_parts", "prediction_parts"]


def error_headers(exc: TorchgateError) -> dict[str, str]:
    headers = {"content-type": JSON}
    seconds = retry_after(exc)
    if seconds is not None:
        headers["retry-after"] = seconds
    return headers


def error_parts(exc: TorchgateError) -> tuple[int, bytes, dict[str, str]]:
    status = http_status(exc)
    return status, error_body(status, exc.type_name, exc.message), error_headers(exc)


class JsonResponse(Response):
    """A JSON response encoded with orjson (FastAPI's ORJSONResponse is deprecated)."""

    media_type = JSON

    def render(self, content: Any) -> bytes:
        return dumps(content)
