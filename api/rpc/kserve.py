"""KServe v2 `inference.GRPCInferenceService`: decode, call the dataplane, encode.

Wire-compatible with tritonclient.grpc; methods not declared in our proto (model config,
repository, statistics, shared memory) get UNIMPLEMENTED from gRPC itself.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping

import grpc

from api.core.dataplane import DataPlane
from api.core.sequences import SEQUENCE_ID
from api.core.types import API_V2_GRPC, header_value
from api.encoding import check_answer_size
from api.errors import Overloaded
from api.request_ids import new_request_id
from api.rpc.errors import as_error, call_request_id, grpc_errors, metadata_headers
from api.rpc.generated import grpc_predict_v2_pb2 as pb
from api.rpc.generated import grpc_predict_v2_pb2_grpc as pb_grpc
from api.rpc.ordered import Earlier, in_order
from api.v2 import EXTENSIONS, SERVER_NAME, SERVER_VERSION, bridge
from api.v2.codec import CodecError, V2Response, decode_grpc, encode_grpc, grpc_parameter
from api.v2.parameters import FINAL_RESPONSE, sequence_named

# Requests of one ModelStreamInfer call read ahead of the one being answered: enough to fill
# batches from one client (16 to 64 measured alike with digits), and a bound on what a client
# that stops reading makes us buffer. A request refused by a queue its own stream filled waits
# for the stream's earlier requests and tries again (`_backpressured`).
STREAM_WINDOW = 32
# ... and at most this many bytes of them (one request alone may be larger, up to
# max_request_size): 32 requests of 6.5 MB would hold 200 MB for one stream.
STREAM_WINDOW_BYTES = 64 * 1024 * 1024


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane, *, max_items: int, max_response_size: int) -> None:
        self.dataplane = dataplane
        self.max_items = max_items
        self.max_response_size = max_response_size

    @grpc_errors
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.dataplane.live())

    @grpc_errors
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    @grpc_errors
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        ready = self.dataplane.model_ready(request.name, request.version or None)
        return pb.ModelReadyResponse(ready=ready)

    @grpc_errors
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS
        )

    @grpc_errors
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        metadata = self.dataplane.metadata(request.name, request.version or None)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=metadata.name,
            versions=metadata.versions,
            platform=metadata.platform,
            inputs=[
                tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in metadata.inputs
            ],
            outputs=[
                tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in metadata.outputs
            ],
        )

    @grpc_errors
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        headers = metadata_headers(context)
        return await self._infer(request, headers, call_request_id(context, headers))

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton's stream: each request runs as soon as it is read, and its responses go out
        in request order (`api.rpc.ordered`). Every response says whether it is the request's
        last in the `triton_final_response` parameter, which Triton's clients wait for."""
        headers = metadata_headers(context)

        def respond(
            request: pb.ModelInferRequest, earlier: Earlier
        ) -> AsyncIterator[pb.ModelStreamInferResponse]:
            return self._stream_responses(request, headers, earlier)

        def sequence_of(request: pb.ModelInferRequest) -> str | None:
            return _sequence_id(request, headers)

        async for response in in_order(
            requests,
            respond,
            window=STREAM_WINDOW,
            window_bytes=STREAM_WINDOW_BYTES,
            size=pb.ModelInferRequest.ByteSize,
            key=sequence_of,
        ):
            yield response

    async def _stream_responses(
        self, request: pb.ModelInferRequest, headers: dict[str, str], earlier: Earlier
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """One request's responses: one, or a streaming handler's parts and then its final
        response, as a decoupled Triton model sends them. With the request parameter
        `triton_enable_empty_final_response`, a streamed request ends with an empty response
        that carries the final flag, as Triton's decoupled models end theirs. A failure is a
        response with `error_message`, and the stream goes on."""
        streamed = False
        try:
            call = await self._call(request, headers, new_request_id())
            empty_final = call.options.empty_final_response
            async for v2_response, final in _backpressured(call, earlier):
                streamed = streamed or not final
                with bridge.codec_errors():
                    message = encode_grpc(v2_response, call.request.outputs)
                _mark_final(message, final and not (streamed and empty_final))
                response = pb.ModelStreamInferResponse(infer_response=message)
                # Checked here, not by gRPC's send limit, which would end the whole stream.
                where = f"ModelStreamInfer {request.model_name}"
                check_answer_size(response.ByteSize(), self.max_response_size, where)
                yield response
            if streamed and empty_final:
                yield pb.ModelStreamInferResponse(infer_response=_final_response(request))
        except Exception as exc:
            # As Triton: the request's id, model and version say which request failed, and
            # the stream goes on, whatever the failure.
            error = as_error(exc, "ModelStreamInfer")
            yield pb.ModelStreamInferResponse(
                error_message=error.message, infer_response=_final_response(request)
            )

    async def _infer(
        self, request: pb.ModelInferRequest, headers: dict[str, str], rid: str
    ) -> pb.ModelInferResponse:
        call = await self._call(request, headers, rid)
        response = await call.answer()
        with bridge.codec_errors():
            return encode_grpc(response, call.request.outputs)

    async def _call(
        self, request: pb.ModelInferRequest, headers: dict[str, str], rid: str
    ) -> bridge.V2Call:
        # An unknown model or version is NOT_FOUND whatever the tensors hold, as in Triton
        # and on REST (and the tensors of a request that goes nowhere are not decoded).
        self.dataplane.registry.get(request.model_name, request.model_version or None)
        v2_request = await bridge.decoded(lambda: decode_grpc(request), _declared_bytes(request))
        return bridge.V2Call(
            self.dataplane, request.model_name, request.model_version or None, v2_request,
            headers=headers, request_id=rid, api=API_V2_GRPC,
            max_items=self.max_items,
        )  # fmt: skip


async def _backpressured(
    call: bridge.V2Call, earlier: Earlier
) -> AsyncIterator[tuple[V2Response, bool]]:
    """`call.responses()`; refused for a full queue while requests read before it on the same
    stream still run, it waits for those and tries once more. Read-ahead must not cost a
    request that one-at-a-time reading would have served. (The refusal is still counted, as a
    503 and in `torchgate_rejected_total`, beside the request's own outcome.)"""
    try:
        async for response in call.responses():
            yield response
        return
    except Overloaded:
        if not await earlier():
            raise
    async for response in call.responses():
        yield response


def _declared_bytes(request: pb.ModelInferRequest) -> int:
    """What decoding `request` costs, as bytes at 4 per element its shapes declare: read in
    O(inputs), where `ByteSize()` would serialize the whole message on the event loop."""
    return 4 * sum(math.prod(tensor.shape) for tensor in request.inputs)


def _sequence_id(request: pb.ModelInferRequest, headers: Mapping[str, str]) -> str | None:
    """The sequence a stream's request belongs to, as `api.v2.bridge` will read it: its
    `sequence_id` parameter (0 or "" is none), else the stream's `ts_request_sequence_id`
    metadata. Its requests run one after the other (`api.rpc.ordered`)."""
    if "sequence_id" in request.parameters:
        try:
            sequence = sequence_named(grpc_parameter(request.parameters["sequence_id"]))
        except CodecError:  # the request is refused for it when it runs; no sequence to keep
            sequence = None
        if sequence is not None:
            return sequence
    return header_value(headers, SEQUENCE_ID)


def _mark_final(message: pb.ModelInferResponse, final: bool) -> None:
    message.parameters[FINAL_RESPONSE].bool_param = final


def _final_response(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """An empty response for `request` that ends its responses."""
    message = pb.ModelInferResponse(
        id=request.id, model_name=request.model_name, model_version=request.model_version
    )
    _mark_final(message, True)
    return message


def add_kserve_servicer(
    server: grpc.aio.Server, dataplane: DataPlane, *, max_items: int, max_response_size: int
) -> None:
    servicer = KServeServicer(dataplane, max_items=max_items, max_response_size=max_response_size)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
