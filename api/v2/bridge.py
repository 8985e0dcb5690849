"""How KServe v2 tensors reach a `.mar` handler, and how its answer becomes v2 tensors.

The rule (also in docs/kserve_v2.md):

1. Every v2 request reaches the handler as one TorchServe request item whose body is the v2
   request itself, tensors as numpy arrays::

       {"body": {"id": ..., "parameters": {...},
                 "inputs": [{"name", "shape", "datatype", "data": np.ndarray, "parameters"}],
                 "outputs": [{"name": ...}]}}

   Handlers that speak v2 (torchgate's own; TorchServe handlers written for KServe) read it.
2. An archive without a `signature.json` is taken to be a plain TorchServe handler. Its item
   then looks like what the same data posted to `/predictions` would give: a single input
   becomes the body (one BYTES element as raw bytes, several as a list of strings, numbers as
   nested lists like a parsed JSON array); several inputs become form fields named after the
   inputs.
3. The handler's answer for the item becomes the response tensors: a dict with "outputs"
   (v2-style, data as numpy arrays or lists) is taken as is; bytes or str become one BYTES
   element; numbers (a scalar, list or array) become a numeric tensor; anything else (a dict
   such as `{"label": probability}`) becomes one BYTES element holding its JSON. The output is
   named after the signature's first output, or "output0".

Before any of this, a request for an archive with a signature is checked against the
signature's ``inputs`` (what ``GET /v2/models/{m}[/versions/{v}]`` shows): every input named
there and no other, each with the declared datatype and a shape that fits: the same rank with
equal static dims, or, under a dynamic batch dim, rows of the same size (``[N, 64]`` fits
``[-1, 1, 8, 8]``, as handlers reshape). A mismatch is 400 / INVALID_ARGUMENT before the
request is queued; handlers never see an INT32 tensor for an FP32 input, silently cast. The
signature checked, and rule 2, are those of the version the request is routed to (an A/B split
may route to a version with another signature), for any backend.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, cast

import numpy as np
import orjson

from api.core.dataplane import Answer, DataPlane
from api.core.registry import ModelVersion
from api.core.sequences import SEQUENCE_END, SEQUENCE_ID, SEQUENCE_START
from api.core.streaming import iterate
from api.core.types import API_V2_GRPC, InferenceRequest, Prediction
from api.errors import (
    BadRequest,
    InferenceFailed,
    PayloadTooLarge,
    TorchgateError,
    error_for_status,
)
from api.v2.codec import CodecError, Tensor, V2Request, V2Response, numpy_dtype
from api.v2.parameters import RequestOptions, request_options
from api.v2.tensors import as_bytes, object_array

log = logging.getLogger(__name__)

DEFAULT_OUTPUT = "output0"

# A request this large decodes in a thread: its tensors can take long enough to decode (a
# BYTES tensor of a million short elements: over a second) to hold up every other request on
# the event loop, which a thread gives the loop back every switch interval.
DECODE_IN_THREAD_BYTES = 1 << 20


@contextmanager
def codec_errors() -> Iterator[None]:
    """Around decoding and encoding: the client's mistakes are 400, anything else 500.

    (Encoding can be the client's mistake too: a non-UTF-8 BYTES output asked for as JSON.)
    """
    try:
        yield
    except CodecError as exc:
        raise BadRequest(str(exc)) from None
    except TorchgateError:
        raise
    except Exception as exc:
        raise InferenceFailed(f"Handler output is not a valid v2 tensor: {exc}") from exc


async def decoded(decode: Callable[[], V2Request], size: int) -> V2Request:
    """`decode()` for a request of `size` bytes, off the event loop when it is large."""
    with codec_errors():
        if size < DECODE_IN_THREAD_BYTES:
            return decode()
        return await asyncio.to_thread(decode)


class V2Call:
    """One v2 request through the dataplane: checked, shaped for the version it is routed to
    (rules 0 to 2), and its answers turned into v2 responses (rule 3).

    `answer()` gives the final answer; `responses()` also gives a streaming handler's
    intermediate responses (TorchServe's `send_intermediate_predict_response`) as they come,
    each with whether it is the final one, for gRPC's `ModelStreamInfer`.
    """

    def __init__(
        self,
        dataplane: DataPlane,
        model: str,
        version: str | None,
        request: V2Request,
        *,
        headers: Mapping[str, str],
        request_id: str,
        api: str,
        max_items: int,
    ) -> None:
        try:
            self.options = request_options(request.parameters, grpc=api == API_V2_GRPC)
        except CodecError as exc:
            raise BadRequest(str(exc)) from None
        check_extensions(request)
        check_items(request, max_items)
        self.dataplane, self.model, self.version, self.request = dataplane, model, version, request
        self.item = InferenceRequest(
            {"body": handler_body(request)},
            _with_sequence(headers, self.options),
            request_id,
            api,
            True,
            queue_timeout_s=self.options.timeout_us / 1e6 or None,
        )
        self._routed_to: ModelVersion | None = None  # the version `item` went to

    async def answer(self) -> V2Response:
        answer = await self._infer(self.item)
        return self._response(answer.prediction, answer.model_version)

    async def responses(self) -> AsyncIterator[tuple[V2Response, bool]]:
        async for prediction, final in iterate(self.item, self._infer):
            # Routed (`_for_version`) before it was queued, so before any response came.
            routed_to = cast(ModelVersion, self._routed_to)
            yield self._response(prediction, routed_to), final

    def _infer(self, item: InferenceRequest) -> Awaitable[Answer]:
        return self.dataplane.infer(self.model, self.version, item, adapt=self._for_version)

    def _for_version(
        self, model_version: ModelVersion, item: InferenceRequest, *, shadow: bool
    ) -> InferenceRequest:
        signature = model_version.backend.signature
        check_inputs(self.request, signature)
        check_outputs(self.request, signature, self.model)
        if not shadow:
            self._routed_to = model_version
            if self.options.priority:  # here, once the model is known to exist
                _note_priority(self.model)
        if signature is None:  # rule 2, whatever the backend
            return replace(item, inputs=plain_item(item.inputs["body"]))
        return item

    def _response(self, prediction: Prediction, model_version: ModelVersion) -> V2Response:
        signature = model_version.backend.signature
        response = response_tensors(
            prediction,
            model=self.model,
            version=model_version.version,
            request_id=self.request.id,
            signature=signature,
        )
        check_answered_outputs(self.request, response, signature)
        return response


def _with_sequence(headers: Mapping[str, str], options: RequestOptions) -> Mapping[str, str]:
    """The request's headers, with its sequence parameters as TorchServe's sequence headers."""
    if options.sequence_id is None and not (options.sequence_start or options.sequence_end):
        return headers
    headers = dict(headers)
    if options.sequence_id is not None:
        headers[SEQUENCE_ID] = options.sequence_id
    if options.sequence_start:
        headers[SEQUENCE_START] = "true"
    if options.sequence_end:
        headers[SEQUENCE_END] = "true"
    return headers


_priority_noted: set[str] = set()


def _note_priority(model: str) -> None:
    """Say once per model that `priority` is not used, rather than drop it in silence."""
    if model not in _priority_noted:
        _priority_noted.add(model)
        log.warning(
            "%s: a v2 request set 'priority'; torchgate accepts it but does not use it "
            "(each model version has one queue, served in order)",
            model,
        )


def check_extensions(request: V2Request) -> None:
    """Refuse Triton's classification extension (not offered: GET /v2 does not list it) rather
    than answer a request for top-k classes with the raw output."""
    for output in request.outputs:
        if "classification" in output.parameters:
            raise BadRequest(
                f"output {output.name!r}: the classification extension is not supported"
            )


def check_items(request: V2Request, limit: int) -> None:
    """Raise PayloadTooLarge (413, RESOURCE_EXHAUSTED) for more than `limit` items in an input.

    Items are what a model answers one by one: the rows of the leading (batch) dimension of an
    input of rank 2 or more, or the elements of a BYTES vector (one text each). Refused before
    the request is queued: 24,000 digits fit in 6 MB and held a worker for over a second.
    """
    for tensor in request.inputs:
        shape = tensor.shape
        batched = len(shape) >= 2 or (len(shape) == 1 and tensor.datatype == "BYTES")
        if batched and shape[0] > limit:
            raise PayloadTooLarge(
                f"input {tensor.name!r} holds {shape[0]} items (shape {list(shape)}), over the "
                f"limit of {limit} per request: send them in several requests"
            )


def check_inputs(request: V2Request, signature: Mapping[str, Any] | None) -> None:
    """Raise BadRequest unless the inputs fit the signature's (see the module docstring).

    Nothing is checked for an archive without a signature, nor a field the signature leaves out.
    """
    specs = {str(spec["name"]): spec for spec in (signature or {}).get("inputs") or []}
    if not specs:
        return
    seen: set[str] = set()
    for tensor in request.inputs:
        spec = specs.get(tensor.name)
        if spec is None:
            raise BadRequest(f"unexpected input {tensor.name!r}: the model takes {_names(specs)}")
        if tensor.name in seen:
            raise BadRequest(f"input {tensor.name!r} is given twice")
        seen.add(tensor.name)
        datatype = spec.get("datatype")
        if datatype is not None and tensor.datatype != datatype:
            raise BadRequest(
                f"input {tensor.name!r}: datatype {tensor.datatype}, the model takes {datatype}"
            )
        dims = spec.get("shape")
        if dims is not None and not _shape_fits(tensor.shape, [int(d) for d in dims]):
            raise BadRequest(
                f"input {tensor.name!r}: shape {list(tensor.shape)} does not fit "
                f"the model's {list(dims)}"
            )
    missing = [name for name in specs if name not in seen]
    if missing:
        raise BadRequest(f"missing input {_names(missing)}")


def check_outputs(request: V2Request, signature: Mapping[str, Any] | None, model: str) -> None:
    """Raise BadRequest for a requested output the signature does not list, before the model
    runs, as Triton does. Without a signature (or its outputs) the answer shows what the
    handler gives: an unknown name is refused when it comes (`check_answered_outputs`)."""
    names = _output_names(signature)
    if not names:
        return
    for output in request.outputs:
        if output.name not in names:
            raise BadRequest(f"unexpected inference output {output.name!r} for model {model!r}")


def check_answered_outputs(
    request: V2Request, response: V2Response, signature: Mapping[str, Any] | None
) -> None:
    """Raise for a requested output the handler's answer lacks. With signature outputs
    `check_outputs` let only those through, so the handler failed to give one: InferenceFailed
    (500). Without, the name was never checked: the client asked for an unknown output (400)."""
    answered = {tensor.name for tensor in response.outputs}
    missing = [output.name for output in request.outputs if output.name not in answered]
    if not missing:
        return
    if _output_names(signature):
        raise InferenceFailed(
            f"the handler did not return output {missing[0]!r}, which the model's signature "
            f"lists (it returned {_names(sorted(answered)) or 'none'})"
        )
    raise BadRequest(f"unknown output {missing[0]!r} requested")


def _output_names(signature: Mapping[str, Any] | None) -> set[str]:
    return {str(spec["name"]) for spec in (signature or {}).get("outputs") or []}


def _shape_fits(shape: Sequence[int], dims: Sequence[int]) -> bool:
    """Same rank, static dims equal (-1 is any); or same-size rows under a dynamic batch dim."""
    if len(shape) == len(dims) and all(d < 0 or d == s for s, d in zip(shape, dims, strict=True)):
        return True
    if shape and dims and dims[0] < 0 and all(d >= 0 for d in dims[1:]):
        return math.prod(shape[1:]) == math.prod(dims[1:])
    return False


def _names(names: Iterable[str]) -> str:
    return ", ".join(repr(name) for name in names)


def handler_body(request: V2Request) -> dict[str, Any]:
    """Rule 1: the v2 request as the item's body, tensors as (writable) numpy arrays."""
    return {
        "id": request.id,
        "parameters": request.parameters,
        "inputs": [
            {
                "name": t.name,
                "shape": list(t.shape),
                "datatype": t.datatype,
                # Decoded binary tensors are read-only views of the request body; the worker
                # receives its own writable copy (torch.from_numpy warns on read-only ones).
                "data": t.data,
                "parameters": t.parameters,
            }
            for t in request.inputs
        ],
        "outputs": [{"name": o.name} for o in request.outputs],
    }


def plain_item(body: Mapping[str, Any]) -> dict[str, Any]:
    """Rule 2: the TorchServe request item a plain handler would get for the same data."""
    inputs = body.get("inputs") or []
    if len(inputs) == 1:
        return {"body": _plain_value(inputs[0]["data"], inputs[0]["datatype"])}
    return {t["name"]: _plain_value(t["data"], t["datatype"]) for t in inputs}


def _plain_value(data: np.ndarray, datatype: str) -> Any:
    if datatype == "BYTES":
        if data.size == 1:
            return bytes(data.reshape(-1)[0])
        return [_text(v) for v in data.reshape(-1)]
    return data.tolist()


def _text(value: bytes) -> str | bytes:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value


def response_tensors(
    prediction: Prediction,
    *,
    model: str,
    version: str,
    request_id: str | None,
    signature: Mapping[str, Any] | None,
) -> V2Response:
    """Rule 3. A per-item error status set by the handler raises its TorchgateError."""
    if not prediction.ok:
        raise error_for_status(prediction.status, _error_message(prediction))
    body = prediction.body
    try:
        if isinstance(body, dict) and isinstance(body.get("outputs"), list):
            outputs = [_tensor_from_dict(entry) for entry in body["outputs"]]
        else:
            outputs = [_tensor_from_value(_first_output_name(signature), body)]
    except Exception as exc:  # the handler's answer, not the client's request: never a 400
        raise InferenceFailed(
            f"Handler output is not a valid v2 tensor: {type(exc).__name__}: {exc}"
        ) from exc
    return V2Response(
        model_name=model, model_version=version, id=request_id, parameters={}, outputs=outputs
    )


def _tensor_from_dict(entry: Mapping[str, Any]) -> Tensor:
    datatype = str(entry["datatype"])
    data = entry["data"]
    if datatype == "BYTES":
        array = object_array([as_bytes(v) for v in np.asarray(data, dtype=object).reshape(-1)])
    else:
        array = np.asarray(data, dtype=numpy_dtype(datatype))
    shape = [int(d) for d in entry.get("shape", array.shape)]
    return Tensor(
        name=str(entry["name"]),
        datatype=datatype,
        shape=tuple(shape),
        data=array.reshape(shape),
        parameters=dict(entry.get("parameters") or {}),
    )


def _tensor_from_value(name: str, value: Any) -> Tensor:
    if isinstance(value, bytes | bytearray | str):
        return Tensor.from_numpy(name, object_array([as_bytes(value)]))
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return Tensor.from_numpy(name, value)
    if isinstance(value, int | float | bool | list):
        try:
            array = np.asarray(value)
        except ValueError:  # ragged lists
            array = np.asarray(None)
        if array.dtype.kind in "biuf":
            return Tensor.from_numpy(name, array)
    return Tensor.from_numpy(
        name, object_array([orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)])
    )


def _first_output_name(signature: Mapping[str, Any] | None) -> str:
    outputs = (signature or {}).get("outputs") or []
    return str(outputs[0]["name"]) if outputs else DEFAULT_OUTPUT


def _error_message(prediction: Prediction) -> str:
    body = prediction.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    if isinstance(body, bytes | str) and body:
        return body.decode() if isinstance(body, bytes) else body
    return prediction.message or f"Handler answered status {prediction.status}"
