"""TorchServe's gRPC APIs: `InferenceAPIsService` (port 7070), `ManagementAPIsService` (7071).

Wire-compatible with TorchServe 0.12's published protos, so its generated clients call torchgate
unchanged. Each method decodes, calls the dataplane or the same management operations as REST
(`api.rest.management`), and encodes; errors go through `api.errors`' one table.

Where torchgate answers differently from TorchServe 0.12, on purpose:

- Predictions on an unknown model or version: NOT_FOUND (TorchServe: INTERNAL).
- A handler's per-item error (`context.set_response_status(400, ...)`) fails the call with the
  mapped code, INVALID_ARGUMENT for 400 (TorchServe drops the status and answers OK with the
  error document as the prediction).
- StreamPredictions on a handler that does not stream answers one message (TorchServe fails the
  call with INTERNAL "Worker died." and restarts the worker).
- ListModels without `limit` lists up to 100 models (TorchServe takes the unset 0 literally and
  answers an empty page whose nextPageToken is "0").
- StreamPredictions2 runs each message as an independent request and echoes its sequence_id:
  torchgate has no stateful sequence batching.
- DescribeModel ignores `customized`: handlers are not asked for custom metadata.
- RegisterModel ignores `handler`, `runtime`, `s3_sse_kms` and `startup_timeout`, as REST does.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import orjson
from google.protobuf import empty_pb2

from api.core.dataplane import DataPlane
from api.core.registry import Registry
from api.core.types import API_TORCHSERVE_GRPC, InferenceRequest
from api.errors import BadRequest, TorchgateError, error_for_status
from api.loader import ModelLoader
from api.rest.asgi import request_id
from api.rest.management import (
    SCALE_ACCEPTED,
    check_model_api,
    describe_versions,
    load_archive,
    make_default,
    model_list,
    remove_version,
    scale_workers,
)
from api.rest.responses import prediction_parts
from api.rpc.errors import abort, grpc_code, grpc_errors, metadata_headers
from api.rpc.generated import inference_pb2 as inference
from api.rpc.generated import inference_pb2_grpc as inference_grpc
from api.rpc.generated import management_pb2 as management
from api.rpc.generated import management_pb2_grpc as management_grpc

# TorchServe's defaults for unset (0) fields: ListModels' page size, ScaleWorker's min_worker.
DEFAULT_PAGE_SIZE = 100
DEFAULT_MIN_WORKERS = 1


class TorchServeInference(inference_grpc.InferenceAPIsServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    async def Ping(
        self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> inference.TorchServeHealthResponse:
        """Always OK; `health` says `{"status": "Healthy"}` or "Unhealthy", as TorchServe."""
        status = "Healthy" if self.dataplane.ready() else "Unhealthy"
        # indent=2 writes what TorchServe's pretty-printing Gson writes.
        return inference.TorchServeHealthResponse(health=json.dumps({"status": status}, indent=2))

    @grpc_errors
    async def Predictions(
        self, request: inference.PredictionsRequest, context: grpc.aio.ServicerContext
    ) -> inference.PredictionResponse:
        return await self._predict(request, metadata_headers(context))

    async def StreamPredictions(
        self, request: inference.PredictionsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference.PredictionResponse]:
        """One message: torchgate's handlers answer once per request."""
        try:
            response = await self._predict(request, metadata_headers(context))
        except TorchgateError as exc:
            await abort(context, exc)
        else:
            yield response

    async def StreamPredictions2(
        self,
        requests: AsyncIterator[inference.PredictionsRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[inference.PredictionResponse]:
        """One answer per message, in order; a failed message answers with `status` set and
        the stream goes on (TorchServe's contract). Each message needs a `sequence_id`."""
        headers = metadata_headers(context)
        async for request in requests:
            try:
                if not request.sequence_id:
                    raise BadRequest("Parameter sequence_id is required.")
                response = await self._predict(request, headers)
            except TorchgateError as exc:
                response = inference.PredictionResponse()
                response.status.code = grpc_code(exc).value[0]
                response.status.message = exc.message
            if request.sequence_id:
                response.sequence_id = request.sequence_id
            yield response

    async def _predict(
        self, request: inference.PredictionsRequest, headers: dict[str, str]
    ) -> inference.PredictionResponse:
        # As TorchServe's frontend: each input entry is one parameter of the handler's request
        # item, as bytes with no content type.
        item = InferenceRequest(
            dict(request.input), headers, request_id(headers), API_TORCHSERVE_GRPC
        )
        model = _required(request.model_name, "model_name")
        answer = await self.dataplane.infer(model, request.model_version or None, item)
        prediction = answer.prediction
        _, body, _ = prediction_parts(prediction)
        if not prediction.ok:
            message = prediction.message or body.decode("utf-8", "replace")
            raise error_for_status(prediction.status, message)
        return inference.PredictionResponse(prediction=body)


class TorchServeManagement(management_grpc.ManagementAPIsServiceServicer):
    """Each call answers what REST's management API answers: DescribeModel and ListModels the
    same JSON document (pretty-printed, as TorchServe's), the others REST's status text (the
    `status` field of REST's JSON), the bare text TorchServe's gRPC API answers."""

    def __init__(self, registry: Registry, loader: ModelLoader, *, enable_model_api: bool) -> None:
        self.registry = registry
        self.loader = loader
        self.enable_model_api = enable_model_api

    @grpc_errors
    async def DescribeModel(
        self, request: management.DescribeModelRequest, context: grpc.aio.ServicerContext
    ) -> management.ManagementResponse:
        """The default version, one version, or every version with model_version "all"."""
        name = _required(request.model_name, "model_name")
        return _document(describe_versions(self.registry, name, request.model_version or None))

    @grpc_errors
    async def ListModels(
        self, request: management.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> management.ManagementResponse:
        limit = request.limit if request.limit > 0 else DEFAULT_PAGE_SIZE
        return _document(model_list(self.registry, limit, max(request.next_page_token, 0)))

    @grpc_errors
    async def RegisterModel(
        self, request: management.RegisterModelRequest, context: grpc.aio.ServicerContext
    ) -> management.ManagementResponse:
        """Unset (0) numbers take config.properties' defaults, as in TorchServe."""
        check_model_api(self.enable_model_api)
        status = await load_archive(
            self.loader,
            _required(request.url, "url"),
            model_name=request.model_name or None,
            batch_size=_optional(request.batch_size, "batch_size"),
            max_batch_delay=_optional(request.max_batch_delay, "max_batch_delay"),
            initial_workers=_optional(request.initial_workers, "initial_workers"),
            response_timeout=_optional(request.response_timeout, "response_timeout"),
        )
        return management.ManagementResponse(msg=status)

    @grpc_errors
    async def ScaleWorker(
        self, request: management.ScaleWorkerRequest, context: grpc.aio.ServicerContext
    ) -> management.ManagementResponse:
        """As TorchServe: unset min_worker means 1, unset max_worker means min_worker."""
        low = _optional(request.min_worker, "min_worker") or DEFAULT_MIN_WORKERS
        high = _optional(request.max_worker, "max_worker") or low
        name = _required(request.model_name, "model_name")
        status = await scale_workers(self.registry, name, request.model_version or None, low, high)
        return management.ManagementResponse(msg=status if request.synchronous else SCALE_ACCEPTED)

    @grpc_errors
    async def SetDefault(
        self, request: management.SetDefaultRequest, context: grpc.aio.ServicerContext
    ) -> management.ManagementResponse:
        name = _required(request.model_name, "model_name")
        version = _required(request.model_version, "model_version")
        return management.ManagementResponse(msg=make_default(self.registry, name, version))

    @grpc_errors
    async def UnregisterModel(
        self, request: management.UnregisterModelRequest, context: grpc.aio.ServicerContext
    ) -> management.ManagementResponse:
        """Without model_version, the default version (refused while others exist)."""
        check_model_api(self.enable_model_api)
        name = _required(request.model_name, "model_name")
        status = await remove_version(self.registry, name, request.model_version or None)
        return management.ManagementResponse(msg=status)


def _required(value: str, field: str) -> str:
    if not value:
        raise BadRequest(f"Parameter {field} is required.")
    return value


def _optional(value: int, field: str) -> int | None:
    """proto3 cannot tell unset from 0: 0 means "the default" (None), as in TorchServe."""
    if value < 0:
        raise BadRequest(f"Parameter {field} must not be negative, got {value}")
    return value or None


def _document(value: Any) -> management.ManagementResponse:
    text = orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode()
    return management.ManagementResponse(msg=text)


def add_torchserve_inference_servicer(server: grpc.aio.Server, dataplane: DataPlane) -> None:
    inference_grpc.add_InferenceAPIsServiceServicer_to_server(
        TorchServeInference(dataplane), server
    )


def add_torchserve_management(
    server: grpc.aio.Server, registry: Registry, loader: ModelLoader, *, enable_model_api: bool
) -> None:
    management_grpc.add_ManagementAPIsServiceServicer_to_server(
        TorchServeManagement(registry, loader, enable_model_api=enable_model_api), server
    )
