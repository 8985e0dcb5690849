"""KServe v2 (Open Inference Protocol) over REST, on the inference port.

Health and metadata are FastAPI routes; `POST .../infer` is plain ASGI like `/predictions`.
Errors are `{"error": "..."}` as the protocol says, with the status from `api.errors`.
Triton's binary tensor extension is handled by `api.v2.codec`; compressed bodies and answers
(`Content-Encoding`, `Accept-Encoding`) by `api.rest.content_coding`.
"""

from __future__ import annotations

from fastapi import APIRouter

from api.core.dataplane import DataPlane, ModelMetadata
from api.core.types import API_V2_REST
from api.encoding import Encoded
from api.errors import NotFound, TorchgateError, UnsupportedEncoding
from api.rest.asgi import Scope
from api.rest.content_coding import ACCEPTED, chosen_coding, compressed, decompressed
from api.rest.endpoint import KServeEndpoint
from api.rest.responses import JsonResponse
from api.v2 import EXTENSIONS, SERVER_NAME, SERVER_VERSION, bridge
from api.v2.codec import decode_rest, encode_rest


def v2_router(dataplane: DataPlane) -> APIRouter:
    router = APIRouter(prefix="/v2", tags=["kserve-v2"])

    @router.get("")
    async def server_metadata() -> JsonResponse:
        return JsonResponse(
            {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}
        )

    @router.get("/health/live")
    async def live() -> JsonResponse:
        return JsonResponse({"live": dataplane.live()})

    @router.get("/health/ready")
    async def ready() -> JsonResponse:
        is_ready = dataplane.ready()
        return JsonResponse({"ready": is_ready}, status_code=200 if is_ready else 503)

    @router.get("/models")
    async def models() -> JsonResponse:
        # KServe's model server lists its models here, as v1 does at /v1/models.
        return JsonResponse({"models": sorted(dataplane.registry.names())})

    @router.get("/models/{model}")
    async def model_metadata(model: str) -> JsonResponse:
        return JsonResponse(metadata_json(dataplane.metadata(model)))

    @router.get("/models/{model}/versions/{version}")
    async def version_metadata(model: str, version: str) -> JsonResponse:
        return JsonResponse(metadata_json(dataplane.metadata(model, version)))

    @router.get("/models/{model}/ready")
    async def model_ready(model: str) -> JsonResponse:
        return readiness(model, None)

    @router.get("/models/{model}/versions/{version}/ready")
    async def version_ready(model: str, version: str) -> JsonResponse:
        return readiness(model, version)

    def readiness(model: str, version: str | None) -> JsonResponse:
        # tritonclient reads readiness from the status code alone: 200 ready, else not.
        is_ready = dataplane.model_ready(model, version)
        return JsonResponse(
            {"name": model, "ready": is_ready}, status_code=200 if is_ready else 503
        )

    return router


def metadata_json(metadata: ModelMetadata) -> dict[str, object]:
    return {
        "name": metadata.name,
        "versions": metadata.versions,
        "platform": metadata.platform,
        "inputs": [
            {"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in metadata.inputs
        ],
        "outputs": [
            {"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in metadata.outputs
        ],
    }


def is_infer_path(path: str) -> bool:
    return path.startswith("/v2/models/") and path.endswith("/infer")


class V2InferEndpoint(KServeEndpoint):
    """`POST /v2/models/{m}[/versions/{v}]/infer`, JSON or binary tensors."""

    def route(self, path: str) -> tuple[str, str | None]:
        parts = [p for p in path.split("/") if p]  # the server already percent-decoded it
        # ["v2", "models", m, "infer"] or ["v2", "models", m, "versions", v, "infer"]
        if len(parts) == 4:
            return parts[2], None
        if len(parts) == 6 and parts[3] == "versions":
            return parts[2], parts[4]
        raise NotFound(f"Unknown v2 path: {path}")

    async def answer(
        self,
        scope: Scope,
        headers: dict[str, str],
        rid: str,
        body: bytes,
        model: str,
        version: str | None,
    ) -> Encoded:
        # An unknown model or version is 404 whatever the body holds, as in KServe and Triton.
        self.dataplane.registry.get(model, version)
        body = decompressed(body, headers.get("content-encoding"), self.limits.request)
        header_length = headers.get("inference-header-content-length")
        request = await bridge.decoded(lambda: decode_rest(body, header_length), len(body))
        call = bridge.V2Call(
            self.dataplane, model, version, request,
            headers=headers, request_id=rid, api=API_V2_REST, max_items=self.max_items,
        )  # fmt: skip
        response = await call.answer()
        with bridge.codec_errors():
            payload, extra = encode_rest(response, request.outputs, call.options.binary_data_output)
        if response.model_version:
            extra["x-model-version"] = response.model_version
        extra["vary"] = "Accept-Encoding"  # the answer may differ with it, compressed or not
        coding = chosen_coding(headers.get("accept-encoding"))
        if coding is not None:
            # max_response_size bounds the answer itself, not what it compresses to.
            self.check_size(payload, scope["path"])
            packed = await compressed(payload, coding)
            if packed is not None:
                payload = packed
                extra["content-encoding"] = coding
        return Encoded(200, payload, list(extra.items()))

    def error_reply(self, exc: TorchgateError) -> Encoded:
        reply = super().error_reply(exc)
        if isinstance(exc, UnsupportedEncoding):
            reply.headers.append(("accept-encoding", ACCEPTED))  # what we take (RFC 7694)
        return reply
