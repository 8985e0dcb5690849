"""The edge every hot inference path shares, as plain ASGI.

Request id, token check, body size limits (the request's and the answer's), client
disconnects, rejections counted, errors encoded: once, here. A subclass names the model and
version a path asks for and turns a body into an answer (`api.rest.predictions` for
TorchServe's API, `api.rest.v2` for KServe v2).
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

from api.auth import INFERENCE, TokenAuth
from api.core.dataplane import DataPlane
from api.core.types import REJECT_AUTH, REJECT_TOO_LARGE
from api.encoding import (
    Encoded,
    ErrorBody,
    check_response_size,
    encode_error,
    kserve_error_body,
    torchserve_error_body,
)
from api.errors import (
    InferenceFailed,
    PayloadTooLarge,
    TorchgateError,
    Unauthenticated,
)
from api.request_ids import request_id
from api.rest.asgi import (
    ClientDisconnected,
    Receive,
    Scope,
    Send,
    cancel_on_disconnect,
    header_dict,
    read_body,
    send_response,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SizeLimits:
    """TorchServe's max_request_size and max_response_size, in bytes."""

    request: int
    response: int


class InferenceEndpoint(ABC):
    # The protocol's error body; TorchServe's unless the endpoint speaks another protocol.
    error_body: ErrorBody = staticmethod(torchserve_error_body)

    def __init__(
        self, dataplane: DataPlane, *, limits: SizeLimits, auth: TokenAuth | None = None
    ) -> None:
        self.dataplane = dataplane
        self.limits = limits
        self.auth = auth

    @abstractmethod
    def route(self, path: str) -> tuple[str, str | None]:
        """(model, version or None) for a path; NotFound if the path names none."""

    async def answer(
        self,
        scope: Scope,
        headers: dict[str, str],
        rid: str,
        body: bytes,
        model: str,
        version: str | None,
    ) -> Encoded:
        """Decode `body`, run it through the dataplane, encode the answer. (An endpoint that
        sends its response itself overrides `respond` instead.)"""
        raise NotImplementedError

    async def respond(
        self,
        scope: Scope,
        headers: dict[str, str],
        rid: str,
        body: bytes,
        model: str,
        version: str | None,
        send: Send,
    ) -> Encoded | None:
        """The reply to send; or None once the endpoint sent its response itself (a streamed
        one, `api.rest.predictions`), errors included. By default, `answer`'s reply."""
        return await self.answer(scope, headers, rid, body, model, version)

    def check_size(self, body: bytes, path: str) -> None:
        """`ResponseTooLarge` for an answer over `max_response_size` (`check_response_size`)."""
        check_response_size(body, self.limits.response, path)

    def error_reply(self, exc: TorchgateError) -> Encoded:
        """The protocol's error body for `exc`, with the status from `api.errors`."""
        return encode_error(exc, self.error_body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = header_dict(scope)
        rid = request_id(headers)
        model, version = "", None
        try:
            model, version = self.route(scope["path"])
            if self.auth is not None:
                self.auth.check(INFERENCE, headers.get("authorization"))
            body = await read_body(receive, self.limits.request, headers)
            reply = await cancel_on_disconnect(
                scope, receive, self.respond(scope, headers, rid, body, model, version, send)
            )
            if reply is None:
                return  # sent already
            if scope["method"] != "OPTIONS":  # that is the model's description, ours
                self.check_size(reply.body, scope["path"])
        except (ClientDisconnected, asyncio.CancelledError):
            return  # nobody is left to answer
        except TorchgateError as exc:
            if isinstance(exc, Unauthenticated | PayloadTooLarge):
                reason = REJECT_AUTH if isinstance(exc, Unauthenticated) else REJECT_TOO_LARGE
                self.dataplane.note_rejected(model, version or "", reason)
            reply = self.error_reply(exc)
        except Exception as exc:  # a bug, not the client's: still an answer in the API's shape
            log.exception("unexpected error answering %s", scope["path"])
            reply = self.error_reply(InferenceFailed(f"{type(exc).__name__}: {exc}"))
        reply.headers.append(("x-request-id", rid))
        await send_response(send, reply.status, reply.body, reply.headers)


class KServeEndpoint(InferenceEndpoint):
    """KServe's inference paths (v1 `:predict`, v2 `/infer`): KServe's error body, and a bound
    on the items (instances, tensor rows) one request may carry."""

    error_body = staticmethod(kserve_error_body)

    def __init__(
        self,
        dataplane: DataPlane,
        *,
        limits: SizeLimits,
        max_items: int,
        auth: TokenAuth | None = None,
    ) -> None:
        super().__init__(dataplane, limits=limits, auth=auth)
        self.max_items = max_items
