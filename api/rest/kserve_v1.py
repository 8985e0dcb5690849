"""KServe protocol v1 on the inference port, as KServe's TorchServe runtime answers it.

    GET  /                            {"status": "alive"}            (KServe's liveness)
    GET  /v1/models                   {"models": ["digits", ...]}
    GET  /v1/models/{m}               {"name": m, "ready": true}; 503 when not ready
    POST /v1/models/{m}:predict       {"instances": [...]}  ->  {"predictions": [...]}
    POST /v1/models/{m}:explain       {"instances": [...]}  ->  {"explanations": [...]}

Errors are KServe's `{"error": "..."}`, with the status from `api.errors` (404 "Model with
name m does not exist.", 503 "Model with name m is not ready.", 400 for a malformed body).

How instances reach a `.mar` handler: as with TorchServe's `service_envelope=kserve` (the
envelope KServe's runtime sets), each instance is one item of the handler's batch and each
answer one prediction, in order. An instance that is a JSON object is the item itself
(`{"data": "<base64>"}` reaches the handler as `row["data"]`, as in KServe's TorchServe
examples); any other instance arrives as `{"body": instance}`, as the same JSON posted to
`/predictions` would. Unlike TorchServe's envelope, which hands the whole request to the
handler as one batch whatever `batchSize` says (and keeps only the first request of a batch
of several), the instances are queued one by one, so `batchSize` and `maxBatchDelay` batch
them, with other clients' requests too. Since TorchServe takes the request as one job, it takes
no more of the job queue than had room when it came: the rest of its instances are queued as
earlier ones are answered, so one with more instances than `job_queue_size` is still answered.
On a stateful model (sequenceBatching) they run one after another as steps of one sequence: the
client's `ts_request_sequence_id`, or the one the first instance started. `:explain` sets the
`explain: True` request header that TorchServe's frontend sets, so `BaseHandler.handle` calls
`explain_handle`. All instances of one request run on one model version (one routing decision:
`DataPlane.infer_many`).

A request sent as a CloudEvent (Knative Eventing's binary or structured mode) is unwrapped and
answered as one, as KServe's model server does (`api.rest.cloudevents`).
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter

from api.core.dataplane import Answer, DataPlane
from api.core.types import API_V1_REST, InferenceRequest, Prediction
from api.encoding import Encoded, dumps
from api.errors import (
    BadRequest,
    InferenceFailed,
    ModelNotFound,
    ModelNotReady,
    NotFound,
    PayloadTooLarge,
    error_for_status,
)
from api.rest import cloudevents
from api.rest.asgi import Scope
from api.rest.endpoint import KServeEndpoint
from api.rest.responses import JsonResponse

PREDICT, EXPLAIN = ":predict", ":explain"


def _not_found(model: str) -> ModelNotFound:
    """KServe's own sentence for an unknown model."""
    return ModelNotFound(f"Model with name {model} does not exist.")


def kserve_liveness_router() -> APIRouter:
    """KServe's `GET /` liveness, served at the port's root beside TorchServe's API."""
    router = APIRouter(tags=["kserve-v1"])

    @router.get("/")
    async def alive() -> JsonResponse:
        return JsonResponse({"status": "alive"})

    return router


def kserve_v1_router(dataplane: DataPlane) -> APIRouter:
    router = APIRouter(tags=["kserve-v1"])

    @router.get("/v1/models")
    async def models() -> JsonResponse:
        return JsonResponse({"models": sorted(dataplane.registry.names())})

    @router.get("/v1/models/{model}")
    async def model_ready(model: str) -> JsonResponse:
        # Errors leave through the KServe app's handlers (api.rest.apps): KServe's body.
        try:
            ready = dataplane.model_ready(model)
        except ModelNotFound:
            raise _not_found(model) from None
        if not ready:
            raise ModelNotReady(f"Model with name {model} is not ready.")
        return JsonResponse({"name": model, "ready": True})

    return router


def is_v1_infer_path(path: str) -> bool:
    return path.startswith("/v1/models/") and path.endswith((PREDICT, EXPLAIN))


class V1InferEndpoint(KServeEndpoint):
    """`POST /v1/models/{m}:predict` and `:explain` (see the module docstring)."""

    def route(self, path: str) -> tuple[str, str | None]:
        name = path[len("/v1/models/") :].rpartition(":")[0]  # already percent-decoded
        if not name or "/" in name:
            raise NotFound(f"Unknown v1 path: {path}")
        return name, None

    async def answer(
        self,
        scope: Scope,
        headers: dict[str, str],
        rid: str,
        body: bytes,
        model: str,
        version: str | None,
    ) -> Encoded:
        explain = scope["path"].endswith(EXPLAIN)
        try:
            self.dataplane.registry.get(model, version)  # KServe: an unknown model is 404
        except ModelNotFound:  # whatever the body holds
            raise _not_found(model) from None
        request, event = cloudevents.unwrap(headers, _parse(body))
        instances = self._instances(request)
        # TorchServe's frontend sets this header on every v1 request; handlers read it.
        item_headers = {**headers, "explain": "True" if explain else "False"}
        requests = [
            InferenceRequest(
                instance if isinstance(instance, dict) else {"body": instance},
                item_headers,
                rid,
                API_V1_REST,
            )
            for instance in instances
        ]
        for split in requests[1:]:
            split.counted = False  # one client request, for TorchServe's ts_* counters
        try:
            answers = await self.dataplane.infer_many(model, version, requests)
        except ModelNotFound:
            raise _not_found(model) from None
        key = "explanations" if explain else "predictions"
        document = {key: [_value(answer.prediction) for answer in answers]}
        if event is None:
            payload, reply_headers = dumps(document), [("content-type", "application/json")]
        else:
            payload, reply_headers = cloudevents.wrap(event, model, document)
        if answers:
            reply_headers.append(("x-model-version", _version(answers)))
        return Encoded(200, payload, reply_headers)

    def _instances(self, request: Any) -> list[Any]:
        instances = request.get("instances") if isinstance(request, dict) else None
        if not isinstance(instances, list):
            raise BadRequest('Expected "instances" to be a list')
        if len(instances) > self.max_items:
            raise PayloadTooLarge(
                f"{len(instances)} instances, over the limit of {self.max_items} per request: "
                f"send them in several requests"
            )
        return instances


def _parse(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"Unrecognized request format: {exc}") from None


def _version(answers: list[Answer]) -> str:
    return answers[0].model_version.version


def _value(prediction: Prediction) -> Any:
    """One prediction as a JSON value; a handler's per-item error fails the request."""
    body = prediction.body
    if not prediction.ok:
        message = prediction.message
        if not message and isinstance(body, bytes | str):
            message = body.decode(errors="replace") if isinstance(body, bytes) else body
        raise error_for_status(prediction.status, message or f"status {prediction.status}")
    if isinstance(body, bytes | bytearray | memoryview):
        # What a handler (or a proxied TorchServe) answered as bytes is JSON or text, or it
        # cannot be a prediction: TorchServe's envelope fails to encode it too.
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise InferenceFailed(
                "Handler output is binary; a v1 prediction must be JSON or text"
            ) from None
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            return text
    return body
