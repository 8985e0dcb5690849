"""TorchServe's gRPC APIs: `InferenceAPIsService` (port 7070), `ManagementAPIsService` (7071).

Wire-compatible with TorchServe 0.12's published protos, so its generated clients call torchgate
unchanged. Each method decodes, calls the dataplane or the same management operations as REST
(`api.management`), and encodes; errors go through `api.errors`' one table.

Where torchgate answers differently from TorchServe 0.12, on purpose:

- Predictions on an unknown model or version: NOT_FOUND (TorchServe: INTERNAL).
- A handler's per-item error (`context.set_response_status(400, ...)`) fails the call with the
  mapped code, INVALID_ARGUMENT for 400 (TorchServe drops the status and answers OK with the
  error document as the prediction).
- StreamPredictions on a handler that does not stream answers one message (TorchServe fails the
  call with INTERNAL "Worker died." and restarts the worker). On a streaming handler it sends
  one message per intermediate response and the final one, as TorchServe.
- ListModels without `limit` lists up to 100 models (TorchServe takes the unset 0 literally and
  answers an empty page whose nextPageToken is "0").
- StreamPredictions2 answers a failed message with the mapped code in `status` (TorchServe:
  INTERNAL for every error), with TorchServe's messages; a handler's per-item error too
  (TorchServe answers it OK, with the error document as the prediction).
- RegisterModel refuses a `handler` the archive cannot resolve (INVALID_ARGUMENT) as REST does;
  see docs/compatibility.md.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable

import grpc
from google.protobuf import empty_pb2

from api.core.dataplane import Answer, DataPlane
from api.core.registry import Registry
from api.core.sequences import SEQUENCE_ID
from api.core.streaming import iterate
from api.core.types import API_TORCHSERVE_GRPC, InferenceRequest, Prediction
from api.encoding import encode_prediction
from api.errors import BadRequest, error_for_status
from api.management import ListArgs, Management, RegisterArgs, ScaleArgs
from api.management.params import positive
from api.model_loader import ModelLoader
from api.request_ids import new_request_id
from api.rpc.errors import (
    abort,
    as_error,
    call_request_id,
    grpc_code,
    grpc_errors,
    metadata_headers,
)
from api.rpc.generated import inference_pb2 as inference
from api.rpc.generated import inference_pb2_grpc as inference_grpc
from api.rpc.generated import management_pb2 as management
from api.rpc.generated import management_pb2_grpc as management_grpc


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
        headers = metadata_headers(context)
        return await self._predict(request, headers, call_request_id(context, headers))

    async def StreamPredictions(
        self, request: inference.PredictionsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference.PredictionResponse]:
        """One message per response of a streaming handler (`send_intermediate_predict_
        response`), the final one last; a failure, even after messages, ends the call with its
        status."""
        try:
            headers = metadata_headers(context)
            rid = call_request_id(context, headers)
            async for message in self._responses(request, headers, rid):
                yield message
        except Exception as exc:
            await abort(context, as_error(exc, "StreamPredictions"))

    async def StreamPredictions2(
        self,
        requests: AsyncIterator[inference.PredictionsRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[inference.PredictionResponse]:
        """TorchServe's stream for sequence batching: each message's answers, in order.

        Each message names its sequence in `sequence_id`, which the handler reads as the
        `ts_request_sequence_id` header (`context.get_sequence_id(idx)`); one without it is
        answered "Parameter sequenceId is required." (TorchServe 0.12 too: it cannot start a
        sequence here). A streaming handler's intermediate responses go out as messages
        before the final one, as TorchServe sends them (its stateful, LLM-style handlers do).
        A failed message answers with `status` set and the stream goes on; answers carry no
        `sequence_id`, as TorchServe's.
        """
        headers = metadata_headers(context)
        async for request in requests:
            try:
                if not request.sequence_id:
                    raise BadRequest("Parameter sequenceId is required.")
                sequence = {**headers, SEQUENCE_ID: request.sequence_id}
                async for message in self._responses(request, sequence, new_request_id()):
                    yield message
            except Exception as exc:  # this message's failure; the stream goes on
                error = as_error(exc, "StreamPredictions2")
                failed = inference.PredictionResponse()
                failed.status.code = grpc_code(error).value[0]
                failed.status.message = error.message
                yield failed

    async def _responses(
        self, request: inference.PredictionsRequest, headers: dict[str, str], rid: str
    ) -> AsyncIterator[inference.PredictionResponse]:
        """One message per response of the request's handler: its intermediate responses
        (`send_intermediate_predict_response`), then its final one."""
        item, model = self._item(request, headers, rid)
        version = request.model_version or None

        def infer(item: InferenceRequest) -> Awaitable[Answer]:
            return self.dataplane.infer(model, version, item)

        async for prediction, _ in iterate(item, infer):
            yield _prediction_message(prediction)

    async def _predict(
        self, request: inference.PredictionsRequest, headers: dict[str, str], rid: str
    ) -> inference.PredictionResponse:
        item, model = self._item(request, headers, rid)
        answer = await self.dataplane.infer(model, request.model_version or None, item)
        return _prediction_message(answer.prediction)

    @staticmethod
    def _item(
        request: inference.PredictionsRequest, headers: dict[str, str], rid: str
    ) -> tuple[InferenceRequest, str]:
        # As TorchServe's frontend: each input entry is one parameter of the handler's request
        # item, as bytes with no content type.
        item = InferenceRequest(dict(request.input), headers, rid, API_TORCHSERVE_GRPC)
        return item, _required(request.model_name, "model_name")


def _prediction_message(prediction: Prediction) -> inference.PredictionResponse:
    """The message for one handler response; a per-item error raises its TorchgateError."""
    body = encode_prediction(prediction).body
    if not prediction.ok:
        message = prediction.message or body.decode("utf-8", "replace")
        raise error_for_status(prediction.status, message)
    return inference.PredictionResponse(prediction=body)


class TorchServeManagement(management_grpc.ManagementAPIsServiceServicer):
    """Each call runs the same `api.management` operation as REST and answers its `Reply`'s
    message: the status text (REST's `status` field), or DescribeModel's and ListModels'
    document as pretty-printed JSON, as TorchServe's gRPC API does. proto3 cannot tell an
    unset number from 0, so 0 means the parameter's default, as in TorchServe."""

    def __init__(self, management: Management) -> None:
        self.management = management

    @grpc_errors
    async def DescribeModel(
        self, request: management.DescribeModelRequest, context: grpc.aio.ServicerContext
    ) -> management.ManagementResponse:
        """The default version, one version, or every version with model_version "all"."""
        name = _required(request.model_name, "model_name")
        reply = await self.management.describe(
            name, request.model_version or None, customized=request.customized
        )
        return management.ManagementResponse(msg=reply.message)

    @grpc_errors
    async def ListModels(
        self, request: management.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> management.ManagementResponse:
        args = ListArgs.of(request.limit or None, request.next_page_token)
        return management.ManagementResponse(msg=self.management.list_models(args).message)

    @grpc_errors
    async def RegisterModel(
        self, request: management.RegisterModelRequest, context: grpc.aio.ServicerContext
    ) -> management.ManagementResponse:
        args = RegisterArgs(
            url=request.url or None,  # unset: "Parameter url is required."
            model_name=request.model_name or None,
            runtime=request.runtime or None,
            handler=request.handler or None,
            batch_size=positive(request.batch_size),
            max_batch_delay=positive(request.max_batch_delay),
            initial_workers=positive(request.initial_workers),  # <= 0: the default, as TS
            response_timeout=positive(request.response_timeout),
            startup_timeout=positive(request.startup_timeout),
            synchronous=request.synchronous,
        )
        reply = await self.management.register(args)
        return management.ManagementResponse(msg=reply.message)

    @grpc_errors
    async def ScaleWorker(
        self, request: management.ScaleWorkerRequest, context: grpc.aio.ServicerContext
    ) -> management.ManagementResponse:
        """As TorchServe's gRPC API (`GRPCUtils.getRegisterParam`): a min_worker below 1 (unset
        too) means 1, a max_worker below 1 means min_worker. (REST refuses a negative one.)"""
        name = _required(request.model_name, "model_name")
        args = ScaleArgs(
            min_worker=positive(request.min_worker),
            max_worker=positive(request.max_worker),
            synchronous=request.synchronous,
            number_gpu=str(request.number_gpu) if request.number_gpu else None,
            timeout=str(request.timeout) if request.timeout else None,
        )
        reply = await self.management.scale(name, request.model_version or None, args)
        return management.ManagementResponse(msg=reply.message)

    @grpc_errors
    async def SetDefault(
        self, request: management.SetDefaultRequest, context: grpc.aio.ServicerContext
    ) -> management.ManagementResponse:
        name = _required(request.model_name, "model_name")
        version = _required(request.model_version, "model_version")
        return management.ManagementResponse(msg=self.management.set_default(name, version).message)

    @grpc_errors
    async def UnregisterModel(
        self, request: management.UnregisterModelRequest, context: grpc.aio.ServicerContext
    ) -> management.ManagementResponse:
        """Without model_version, the default version (refused while others exist)."""
        self.management.check_model_api()
        name = _required(request.model_name, "model_name")
        reply = await self.management.unregister(name, request.model_version or None)
        return management.ManagementResponse(msg=reply.message)


def _required(value: str, field: str) -> str:
    if not value:
        raise BadRequest(f"Parameter {field} is required.")
    return value


def add_torchserve_inference_servicer(server: grpc.aio.Server, dataplane: DataPlane) -> None:
    inference_grpc.add_InferenceAPIsServiceServicer_to_server(
        TorchServeInference(dataplane), server
    )


def add_torchserve_management(
    server: grpc.aio.Server, registry: Registry, loader: ModelLoader, *, enable_model_api: bool
) -> None:
    management_grpc.add_ManagementAPIsServiceServicer_to_server(
        TorchServeManagement(Management(registry, loader, enable_model_api=enable_model_api)),
        server,
    )
