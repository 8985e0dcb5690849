"""One exception tree for torchgate, translated to HTTP and gRPC at the edge.

    TorchgateError
    ├── BadRequest                 400  INVALID_ARGUMENT
    │   ├── PayloadTooLarge        413  RESOURCE_EXHAUSTED
    │   ├── UnsupportedEncoding    415  INVALID_ARGUMENT  (a Content-Encoding we cannot undo)
    │   ├── InvalidWorkflow                            (a .war without a usable manifest/spec)
    │   └── InvalidDag                                 (its dag: is not one DAG)
    ├── Unauthenticated            401  UNAUTHENTICATED
    ├── Forbidden                  403  PERMISSION_DENIED
    │   └── DefaultVersionInUse        (unregistering the default of several versions)
    ├── NotFound                   404  NOT_FOUND
    │   ├── ModelNotFound
    │   ├── VersionNotFound
    │   └── WorkflowNotFound
    ├── MethodNotAllowed           405  UNIMPLEMENTED
    │   └── ModelApiDisabled       405  PERMISSION_DENIED  (as TorchServe: REST 405, gRPC 7)
    ├── Conflict                   409  FAILED_PRECONDITION
    ├── TooManyRequests            429  RESOURCE_EXHAUSTED  (a handler's own 429)
    ├── InferenceFailed            500  INTERNAL       (the handler raised)
    │   ├── WorkerDied                                 (its worker process died mid-batch)
    │   ├── HandlerLoadError                           (import or initialize failed)
    │   ├── ResponseTooLarge                           (an answer over max_response_size)
    │   └── WorkflowFailed                             (a workflow's node could not register)
    ├── BackendUnavailable         502  UNAVAILABLE    (a remote backend is down)
    ├── Overloaded                 503  UNAVAILABLE    (queue full; carries Retry-After)
    ├── ModelNotReady              503  UNAVAILABLE
    └── DeadlineExceeded           504  DEADLINE_EXCEEDED

REST and gRPC both read `STATUS_TABLE` (via `http_status` / `grpc_code_name`), so the two
protocols cannot drift apart. The table names gRPC codes rather than importing grpc, so the core
(which raises these errors) never loads it. The lookup walks the exception's MRO, so a new
subclass inherits its parent's codes unless the table names it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class TorchgateError(Exception):
    """Base of every error torchgate reports to a client.

    `type_name` is the `type` field of TorchServe's error body (`{"code", "type", "message"}`).
    """

    type_name = "InternalServerException"

    def __init__(
        self, message: str, *, retry_after: float | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        # An exact HTTP status to answer instead of the table's (a handler's own 4xx/5xx).
        self.status = status


class BadRequest(TorchgateError):
    type_name = "BadRequestException"


class PayloadTooLarge(BadRequest):
    type_name = "RequestEntityTooLargeException"


class UnsupportedEncoding(BadRequest):
    type_name = "UnsupportedMediaTypeException"


class Unauthenticated(TorchgateError):
    type_name = "InvalidKeyException"


class Forbidden(TorchgateError):
    type_name = "ForbiddenException"


class DefaultVersionInUse(Forbidden):
    """Unregistering a model's default version while it has others (TorchServe's 403)."""

    type_name = "InvalidModelVersionException"


class NotFound(TorchgateError):
    type_name = "ResourceNotFoundException"


class ModelNotFound(NotFound):
    type_name = "ModelNotFoundException"


class VersionNotFound(NotFound):
    type_name = "ModelVersionNotFoundException"


class WorkflowNotFound(NotFound):
    type_name = "WorkflowNotFoundException"


class InvalidWorkflow(BadRequest):
    type_name = "InvalidWorkflowException"


class InvalidDag(BadRequest):
    type_name = "InvalidDAGException"


class MethodNotAllowed(TorchgateError):
    type_name = "MethodNotAllowedException"


class ModelApiDisabled(MethodNotAllowed):
    """Register/unregister while `enable_model_api` is false.

    TorchServe answers 405 on REST but PERMISSION_DENIED on gRPC; clients of both check for it.
    """


class TooManyRequests(TorchgateError):
    """A handler answered an item with 429 (`set_response_status`): gRPC's RESOURCE_EXHAUSTED."""

    type_name = "TooManyRequestsException"


class Conflict(TorchgateError):
    type_name = "ConflictStatusException"


class InferenceFailed(TorchgateError):
    type_name = "InternalServerException"


class WorkerDied(InferenceFailed):
    """The worker process running the batch died (a crash, a kill); it is being restarted."""


class HandlerLoadError(InferenceFailed):
    """The archive's handler could not be imported or initialized in its worker."""


class ResponseTooLarge(InferenceFailed):
    """The handler's answer is larger than `max_response_size` allows; not sent."""


class WorkflowFailed(InferenceFailed):
    """A workflow's node model failed to register; the ones that did were rolled back."""

    type_name = "WorkflowException"


class BackendUnavailable(TorchgateError):
    type_name = "BadGatewayException"


class Overloaded(TorchgateError):
    type_name = "ServiceUnavailableException"


class ModelNotReady(TorchgateError):
    type_name = "ServiceUnavailableException"


class DeadlineExceeded(TorchgateError):
    type_name = "RequestTimeoutException"


STATUS_TABLE: dict[type[TorchgateError], tuple[int, str]] = {
    TorchgateError: (500, "INTERNAL"),
    BadRequest: (400, "INVALID_ARGUMENT"),
    PayloadTooLarge: (413, "RESOURCE_EXHAUSTED"),
    UnsupportedEncoding: (415, "INVALID_ARGUMENT"),
    Unauthenticated: (401, "UNAUTHENTICATED"),
    Forbidden: (403, "PERMISSION_DENIED"),
    NotFound: (404, "NOT_FOUND"),
    MethodNotAllowed: (405, "UNIMPLEMENTED"),
    ModelApiDisabled: (405, "PERMISSION_DENIED"),
    Conflict: (409, "FAILED_PRECONDITION"),
    TooManyRequests: (429, "RESOURCE_EXHAUSTED"),
    InferenceFailed: (500, "INTERNAL"),
    BackendUnavailable: (502, "UNAVAILABLE"),
    Overloaded: (503, "UNAVAILABLE"),
    ModelNotReady: (503, "UNAVAILABLE"),
    DeadlineExceeded: (504, "DEADLINE_EXCEEDED"),
}


def _codes(error: TorchgateError) -> tuple[int, str]:
    for cls in type(error).__mro__:
        if cls in STATUS_TABLE:
            return STATUS_TABLE[cls]
    return STATUS_TABLE[TorchgateError]


def http_status(error: TorchgateError) -> int:
    return error.status or _codes(error)[0]


def retry_after(error: TorchgateError) -> str | None:
    """The Retry-After value (whole seconds, at least 1) for an error that carries one."""
    if error.retry_after is None:
        return None
    return str(max(1, round(error.retry_after)))


def grpc_code_name(error: TorchgateError) -> str:
    """The gRPC status code's name (`grpc.StatusCode[name]`); `api.rpc.errors` converts it."""
    return _codes(error)[1]


# Classes no handler status stands for: the base, and a queue's refusal (a 503 from the
# handler ran the request; a refusal did not, and a stream may send it again).
_NOT_A_HANDLERS = (TorchgateError, Overloaded)


def error_for_status(status: int, message: str) -> TorchgateError:
    """The error a handler's per-item status (`set_response_status`) stands for.

    A status the table does not name keeps its class: any other 4xx is the client's
    (INVALID_ARGUMENT on gRPC), any other 5xx the server's (INTERNAL), and REST sends the
    handler's exact status either way.
    """
    for cls, (code, _) in STATUS_TABLE.items():
        if code == status and cls not in _NOT_A_HANDLERS:
            return cls(message)
    if 400 <= status < 500:
        return BadRequest(message, status=status)
    return InferenceFailed(message, status=status if status >= 500 else None)


@contextmanager
def wrapping(error: type[TorchgateError], what: str) -> Iterator[None]:
    """Turn any foreign exception raised inside into `error`, keeping the cause.

    Used once around each call into torch / onnxruntime / handler code / httpx, so the rest of
    torchgate only ever sees the tree above.
    """
    try:
        yield
    except TorchgateError:
        raise
    except Exception as exc:
        raise error(f"{what}: {type(exc).__name__}: {exc}") from exc
