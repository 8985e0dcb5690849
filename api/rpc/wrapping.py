"""`WrappingInterceptor`: a gRPC server interceptor that wraps each method's handler once.

grpc.aio asks every interceptor for the handler of every call; one that changes how a method
runs (`api.rpc.decoding`, `api.rpc.access`) builds its wrapper the first time it sees that
method's handler and hands the same one back after, rather than a new one per call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """Subclasses say how to wrap a method's handler (`wrap`)."""

    def __init__(self) -> None:
        # method -> (the handler, its wrapper)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """A handler for `method` (its full name) that runs `handler`'s behaviour its way: of
        the same kind (unary or streaming, each way) and with the same request deserializer
        and response serializer. Called once per handler, not per call."""
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED itself
            return handler
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        # A handler made per call (a token refusal's) replaces the entry: a dict of methods.
        wrapped = self.wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped
