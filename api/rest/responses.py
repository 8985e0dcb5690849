"""HTTP answers: JSON responses encoded with orjson. (Errors and handler outputs are encoded the
same way on every transport, in `api.encoding`.)"""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from api.encoding import JSON, dumps


class JsonResponse(Response):
    """A JSON response encoded with orjson (FastAPI's ORJSONResponse is deprecated)."""

    media_type = JSON

    def render(self, content: Any) -> bytes:
        return dumps(content)
