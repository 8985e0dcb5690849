"""TorchServe's other inference paths: `/invocations` (SageMaker's), `/models/{model}/invoke`
and the legacy `/{model}/predict`, `/{model}/{version}/predict`.

They run inference as `/predictions` does (any method; OPTIONS describes the model), with two
differences TorchServe makes: each query parameter reaches the handler as a parameter of the
request item (bytes, without a content type), and the request headers `explain` and `url_path`
are not added. `/invocations` names its model in the query (`?model_name=`), else goes to the
one model registered at start when there is exactly one, else reads a `model_name` form field;
without any, 400 "Parameter model_name is required.". `/invocations` and `/models/.../invoke`
go to the default version.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from urllib.parse import parse_qsl

from api.auth import TokenAuth
from api.core.dataplane import DataPlane
from api.errors import BadRequest, NotFound
from api.rest.asgi import Scope
from api.rest.endpoint import SizeLimits
from api.rest.predictions import PredictionsEndpoint, RequestItem

# First path segments with paths of their own on the inference port: `/{x}/predict` there is
# not a legacy prediction (TorchServe matches these names first too).
_NOT_MODELS = frozenset(
    {"ping", "predictions", "explanations", "api-description", "invocations", "models", "v1", "v2"}
)


def _segments(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


def is_invocation_path(path: str) -> bool:
    parts = _segments(path)
    if parts == ["invocations"]:
        return True
    if len(parts) == 3 and parts[0] == "models":
        return parts[2] == "invoke"
    return len(parts) in (2, 3) and parts[-1] == "predict" and parts[0] not in _NOT_MODELS


class InvocationsEndpoint(PredictionsEndpoint):
    takes_query = True

    def __init__(
        self,
        dataplane: DataPlane,
        *,
        limits: SizeLimits,
        startup_models: Callable[[], Collection[str]],
        auth: TokenAuth | None = None,
    ) -> None:
        super().__init__(dataplane, limits=limits, auth=auth)
        self.startup_models = startup_models

    def route(self, path: str) -> tuple[str, str | None]:
        parts = _segments(path)
        if parts == ["invocations"]:
            return "", None  # named by the request (`model_for`)
        if parts[0] == "models":
            return parts[1], None
        if len(parts) in (2, 3):
            return parts[0], parts[1] if len(parts) == 3 else None
        raise NotFound(f"Requested resource is not found, please refer to API document: {path}")

    def model_for(self, scope: Scope, model: str, item: RequestItem) -> str:
        if model:
            return model
        query = scope.get("query_string", b"").decode("latin-1")
        name = dict(parse_qsl(query)).get("model_name", "")
        if not name:
            startup = self.startup_models()
            if len(startup) == 1:
                name = next(iter(startup))
        if not name:
            field = item.inputs.get("model_name")
            name = field.decode("utf-8", "replace") if isinstance(field, bytes) else ""
        if not name:
            raise BadRequest("Parameter model_name is required.")
        return name

    def item_headers(self, scope: Scope, headers: dict[str, str]) -> None:
        """TorchServe adds none on these paths."""
