"""Malformed request bytes answer INVALID_ARGUMENT, with nothing of torchgate's internals.

grpc.aio calls a method's request deserializer (the generated ``Message.FromString``) before the
servicer runs; when it raises, grpc.aio answers UNKNOWN with "Unexpected <class
'google.protobuf.message.DecodeError'>: ..." in the details: the wrong code, and Python class
names for the client. A deserializer cannot pick the status itself, so `DecodingInterceptor`
wraps each method: its deserializer hands a `_Malformed` marker on instead of raising, and the
method aborts with INVALID_ARGUMENT when it meets one (the first message of a unary request, or
any message of a request stream, once the servicer has answered the messages before it).
Streaming methods here are async generators, as torchgate's servicers are.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from api.rpc.errors import refusal_request_id
from api.rpc.wrapping import WrappingInterceptor

Deserializer = Callable[[bytes], Any]


@dataclass(frozen=True, slots=True)
class _Malformed:
    """Stands in for a request message whose bytes did not parse."""


_MALFORMED = _Malformed()


class _MalformedStream(Exception):
    """A request stream met a message that did not parse: the call ends INVALID_ARGUMENT."""


def malformed_details(method: str) -> str:
    return f"malformed request: the message bytes do not parse as {method}'s request message"


def _tolerant(deserializer: Deserializer | None) -> Deserializer | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # protobuf's DecodeError, or anything else its parser raises
            return _MALFORMED

    return deserialize


class DecodingInterceptor(WrappingInterceptor):
    """Refuses request bytes that are not the method's message with INVALID_ARGUMENT."""

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        return _wrap(handler, malformed_details(method))


def _wrap(handler: grpc.RpcMethodHandler, details: str) -> grpc.RpcMethodHandler:
    deserialize = _tolerant(handler.request_deserializer)
    serialize = handler.response_serializer

    async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Malformed):
            await refuse(context)
        return request

    async def refuse(context: grpc.aio.ServicerContext) -> None:
        refusal_request_id(context)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, details)

    async def checked_stream(
        requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, _Malformed):
                # Raised, not aborted here: a servicer that reads ahead (`api.rpc.ordered`)
                # still sends the responses of the requests before this one, then the wrapper
                # below aborts the call.
                raise _MalformedStream
            yield request

    if handler.unary_unary is not None:
        unary_unary = handler.unary_unary

        async def uu(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await unary_unary(await checked(request, context), context)

        return grpc.unary_unary_rpc_method_handler(uu, deserialize, serialize)
    if handler.unary_stream is not None:
        unary_stream = handler.unary_stream

        async def us(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for response in unary_stream(await checked(request, context), context):
                yield response

        return grpc.unary_stream_rpc_method_handler(us, deserialize, serialize)
    if handler.stream_unary is not None:
        stream_unary = handler.stream_unary

        async def su(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            try:
                return await stream_unary(checked_stream(requests, context), context)
            except _MalformedStream:
                await refuse(context)

        return grpc.stream_unary_rpc_method_handler(su, deserialize, serialize)
    stream_stream = handler.stream_stream

    async def ss(
        requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        try:
            async for response in stream_stream(checked_stream(requests, context), context):
                yield response
        except _MalformedStream:
            await refuse(context)

    return grpc.stream_stream_rpc_method_handler(ss, deserialize, serialize)
