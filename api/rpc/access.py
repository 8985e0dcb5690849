"""A line in TorchServe's access_log.log for every gRPC call (`api.observability.access_lines`).

TorchServe writes one for each call on both gRPC ports, with the call's status code:

    ... - /127.0.0.1:36204 "gRPC inference.GRPCInferenceService/ModelInfer HTTP/2.0" 0 7

`AccessInterceptor` wraps each method's handler (once per method, `api.rpc.wrapping`):
the wrapper notes the peer when the call starts (grpc no longer knows it once the call is
over) and writes the line when the servicer is done: the code it set or aborted with, else
OK, UNKNOWN for an exception (what grpc answers then) and CANCELLED for a call cancelled
under it (the client went away, or its deadline passed).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from api.observability.access_lines import AccessLines
from api.rpc.wrapping import WrappingInterceptor


class AccessInterceptor(WrappingInterceptor):
    """Logs every call whose method the server knows; first among the interceptors, so that
    calls refused by the token check are logged too."""

    def __init__(self, lines: AccessLines) -> None:
        super().__init__()
        self._lines = lines

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        return _logged(handler, method, self._lines)


def _code(context: grpc.aio.ServicerContext, error: BaseException | None) -> int:
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED.value[0]
    code = context.code()
    if code is not None:
        return int(code.value[0] if isinstance(code, grpc.StatusCode) else code)
    return grpc.StatusCode.OK.value[0] if error is None else grpc.StatusCode.UNKNOWN.value[0]


def _logged(
    handler: grpc.RpcMethodHandler, method: str, lines: AccessLines
) -> grpc.RpcMethodHandler:
    deserialize, serialize = handler.request_deserializer, handler.response_serializer

    if handler.unary_unary is not None or handler.stream_unary is not None:
        unary = handler.unary_unary or handler.stream_unary

        async def answer(request: Any, context: grpc.aio.ServicerContext) -> Any:
            peer, started, error = context.peer(), time.monotonic(), None
            try:
                return await unary(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                lines.grpc(peer, method, _code(context, error), started)

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(answer, deserialize, serialize)
        return grpc.stream_unary_rpc_method_handler(answer, deserialize, serialize)

    streaming = handler.unary_stream or handler.stream_stream

    async def answers(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        peer, started, error = context.peer(), time.monotonic(), None
        try:
            responses = streaming(request, context)
            if not hasattr(responses, "__aiter__"):
                await responses  # a coroutine that aborts: a refusal (api.rpc.server._refusal)
                return
            async for response in responses:
                yield response
        except BaseException as exc:
            error = exc
            raise
        finally:
            lines.grpc(peer, method, _code(context, error), started)

    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(answers, deserialize, serialize)
    return grpc.stream_stream_rpc_method_handler(answers, deserialize, serialize)
