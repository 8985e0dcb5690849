"""KServe v2 `inference.GRPCInferenceService`: decode, call the dataplane, encode.

Wire-compatible with tritonclient.grpc; methods not declared in our proto (model config,
repository, statistics, shared memory) get UNIMPLEMENTED from gRPC itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from api.core.dataplane import DataPlane
from api.core.types import API_V2_GRPC
from api.errors import TorchgateError
from api.request_ids import request_id
from api.rpc.errors import grpc_errors, metadata_headers
from api.rpc.generated import grpc_predict_v2_pb2 as pb
from api.rpc.generated import grpc_predict_v2_pb2_grpc as pb_grpc
from api.v2 import EXTENSIONS, SERVER_NAME, SERVER_VERSION, bridge
from api.v2.codec import decode_grpc, encode_grpc


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane, *, max_items: int) -> None:
        self.dataplane = dataplane
        self.max_items = max_items

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
        return await self._infer(request, metadata_headers(context))

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        headers = metadata_headers(context)
        async for request in requests:
            try:
                response = await self._infer(request, headers)
            except TorchgateError as exc:
                yield pb.ModelStreamInferResponse(error_message=exc.message)
            else:
                yield pb.ModelStreamInferResponse(infer_response=response)

    async def _infer(
        self, request: pb.ModelInferRequest, headers: dict[str, str]
    ) -> pb.ModelInferResponse:
        with bridge.codec_errors():
            v2_request = decode_grpc(request)
        response = await bridge.infer(
            self.dataplane,
            request.model_name,
            request.model_version or None,
            v2_request,
            headers=headers,
            request_id=request_id(headers),
            api=API_V2_GRPC,
            max_items=self.max_items,
        )
        with bridge.codec_errors():
            return encode_grpc(response, v2_request.outputs)


def add_kserve_servicer(server: grpc.aio.Server, dataplane: DataPlane, *, max_items: int) -> None:
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        KServeServicer(dataplane, max_items=max_items), server
    )
