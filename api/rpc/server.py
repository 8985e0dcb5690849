"""gRPC servers on TorchServe's ports: inference (7070) and management (7071).

Token authorization and size limits apply as on REST: the same TorchServe keys (sent as
`authorization: Bearer <key>` metadata) and `max_request_size` / `max_response_size` as gRPC's
message size limits, so an oversized message fails with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from api.auth import INFERENCE, MANAGEMENT, TokenAuth
from api.config import Config
from api.core.dataplane import DataPlane
from api.core.registry import Registry
from api.core.types import REJECT_AUTH
from api.errors import Unauthenticated
from api.model_loader import ModelLoader
from api.observability.access_lines import AccessLines
from api.rpc.access import AccessInterceptor
from api.rpc.decoding import DecodingInterceptor
from api.rpc.errors import grpc_code, refusal_request_id
from api.tls import KeyMaterial, grpc_credentials

log = logging.getLogger(__name__)
_INT32_MAX = 2**31 - 1

# Calls that need no key, as on REST: /ping, and KServe v2 health and metadata (REST's
# GET /v2/... routes are open; only inference needs the inference key on either protocol).
_OPEN_METHODS = frozenset(
    {
        "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Ping",
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
        "/inference.GRPCInferenceService/ModelReady",
        "/inference.GRPCInferenceService/ServerMetadata",
        "/inference.GRPCInferenceService/ModelMetadata",
    }
)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without the right TorchServe key, before any message is read."""

    def __init__(self, auth: TokenAuth, kind: str, on_reject: Callable[[], None]) -> None:
        self.auth, self.kind, self.on_reject = auth, kind, on_reject

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method not in _OPEN_METHODS:
            metadata = dict(handler_call_details.invocation_metadata or ())
            try:
                self.auth.check(self.kind, metadata.get("authorization"))
            except Unauthenticated as exc:
                self.on_reject()
                return _refusal(exc, await continuation(handler_call_details))
        return await continuation(handler_call_details)


def _refusal(exc: Unauthenticated, method: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    """A handler that fails the call at once, of the method's own kind: one taking a single
    request would wait for the client's first message of a stream before it could answer."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        refusal_request_id(context)  # as every answer, refused or not
        await context.abort(grpc_code(exc), exc.message)

    if method is not None and method.request_streaming:
        if method.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse)
        return grpc.stream_unary_rpc_method_handler(refuse)
    # Unary-unary and unary-stream refusals look the same to a client: the call fails at once.
    return grpc.unary_unary_rpc_method_handler(refuse)


def _server(
    config: Config,
    auth: TokenAuth | None,
    kind: str,
    dataplane: DataPlane,
    access_lines: AccessLines | None,
) -> grpc.aio.Server:
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if access_lines is not None:  # first: refused calls are logged too, as TorchServe's
        interceptors.append(AccessInterceptor(access_lines))
    if auth is not None:
        interceptors.append(
            TokenInterceptor(auth, kind, lambda: dataplane.note_rejected("", "", REJECT_AUTH))
        )
    # After the token check: a caller without the key learns nothing about message parsing.
    interceptors.append(DecodingInterceptor())
    options: list[tuple[str, int]] = [
        ("grpc.max_receive_message_length", config.max_request_size),
        ("grpc.max_send_message_length", config.max_response_size),
        ("grpc.so_reuseport", 0),
    ]
    # Aged connections make clients reconnect, so a Service's new replicas get their share
    # (a gRPC connection otherwise stays on the pod it first reached). gRPC core takes 32-bit
    # values; a longer age is no age.
    for option, ages in (
        ("grpc.max_connection_age_ms", config.grpc_max_connection_age_ms),
        ("grpc.max_connection_age_grace_ms", config.grpc_max_connection_age_grace_ms),
    ):
        if kind in ages and ages[kind] < _INT32_MAX:
            options.append((option, ages[kind]))
    return grpc.aio.server(interceptors=interceptors, options=options)


def grpc_servers(
    config: Config,
    *,
    auth: TokenAuth | None,
    dataplane: DataPlane,
    registry: Registry,
    loader: ModelLoader,
    tls: KeyMaterial | None = None,
    access_lines: AccessLines | None = None,
) -> tuple[Callable[[], Awaitable[None]], Callable[[float], Awaitable[None]]]:
    """(start, stop) for both gRPC servers; `api.app.Torchgate.grpc_servers` composes them
    from the same parts as the HTTP apps, and `api.server` runs them beside those. With
    `enable_grpc_ssl=true` both ports serve TLS with `tls` (api.tls.load_tls); with
    `access_lines` every call gets a line in TorchServe's access_log.log."""
    from api.rpc.kserve import add_kserve_servicer
    from api.rpc.torchserve import add_torchserve_inference_servicer, add_torchserve_management

    inference = _server(config, auth, INFERENCE, dataplane, access_lines)
    management = _server(config, auth, MANAGEMENT, dataplane, access_lines)
    add_kserve_servicer(
        inference,
        dataplane,
        max_items=config.max_items_per_request,
        max_response_size=config.max_response_size,
    )
    add_torchserve_inference_servicer(inference, dataplane)
    add_torchserve_management(
        management, registry, loader, enable_model_api=config.enable_model_api
    )
    inference_at = f"{config.grpc_inference_address}:{config.grpc_inference_port}"
    management_at = f"{config.grpc_management_address}:{config.grpc_management_port}"
    if tls is not None and config.enable_grpc_ssl:
        credentials = grpc_credentials(tls)
        inference.add_secure_port(inference_at, credentials)
        management.add_secure_port(management_at, credentials)
    else:
        inference.add_insecure_port(inference_at)
        management.add_insecure_port(management_at)

    async def start() -> None:
        await inference.start()
        await management.start()
        log.info(
            "gRPC inference on %s:%d, management on %s:%d",
            config.grpc_inference_address,
            config.grpc_inference_port,
            config.grpc_management_address,
            config.grpc_management_port,
        )

    async def stop(grace: float) -> None:
        await inference.stop(grace)
        await management.stop(grace)

    return start, stop
