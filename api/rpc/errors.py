"""Translating torchgate's exception tree to gRPC status at the edge, via `api.errors`' table."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc

from api.errors import InferenceFailed, TorchgateError, grpc_code_name, retry_after
from api.request_ids import request_id

log = logging.getLogger(__name__)

Servicer = TypeVar("Servicer")
Method = Callable[[Servicer, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def grpc_errors(method: Method[Servicer]) -> Method[Servicer]:
    """Abort a unary call with the status the error table gives its TorchgateError."""

    @functools.wraps(method)
    async def wrapper(self: Servicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except TorchgateError as exc:
            await abort(context, exc)
        except grpc.aio.AbortError:
            raise  # aborted inside already, with its own status
        except Exception as exc:
            # A bug, not the client's: INTERNAL as REST's 500, not gRPC's UNKNOWN.
            await abort(context, as_error(exc, method.__name__))

    return wrapper


def as_error(exc: Exception, where: str) -> TorchgateError:
    """`exc` as the error a client is told: itself when torchgate raised it; else one it did
    not expect (`where`), logged with its traceback, as a client's 500."""
    if isinstance(exc, TorchgateError):
        return exc
    log.exception("unexpected error in %s", where, exc_info=exc)
    return InferenceFailed(f"{type(exc).__name__}: {exc}")


def grpc_code(exc: TorchgateError) -> grpc.StatusCode:
    """The gRPC status for `exc`, from the one table in `api.errors`."""
    return grpc.StatusCode[grpc_code_name(exc)]


async def abort(context: grpc.aio.ServicerContext, exc: TorchgateError) -> None:
    seconds = retry_after(exc)
    if seconds is not None:  # beside what the call set already (its x-request-id)
        context.set_trailing_metadata(
            (*(context.trailing_metadata() or ()), ("retry-after", seconds))
        )
    await context.abort(grpc_code(exc), exc.message)


def call_request_id(context: grpc.aio.ServicerContext, headers: Mapping[str, str]) -> str:
    """The call's request id (`api.request_ids.request_id`), sent back in its trailing
    metadata as `x-request-id`, failed or not, as REST answers with the header: a client
    that sent none learns the one in the server's logs."""
    rid = request_id(headers)
    context.set_trailing_metadata((("x-request-id", rid),))
    return rid


def refusal_request_id(context: grpc.aio.ServicerContext) -> None:
    """`call_request_id` for a call refused before its servicer ran (a bad token, bytes that
    do not parse), unless the servicer set it already (a stream refused part-way)."""
    if not any(key == "x-request-id" for key, _ in context.trailing_metadata() or ()):
        call_request_id(context, metadata_headers(context))


def metadata_headers(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """Invocation metadata as lower-case headers (binary `-bin` entries are left out)."""
    return {
        key.lower(): value
        for key, value in (context.invocation_metadata() or ())
        if isinstance(value, str)
    }
