"""The worker process: one archive's handler, one batch at a time, over one socket.

`run(spec, sock)` is what a forked worker runs (see `zygote.py`), and it never returns: the
process ends when the frontend says stop, closes the socket, or dies. The loop is TorchServe's
`Service.predict` without its wire format:

1. the frontend sends `("batch", items)`, each item `(request_id, headers, inputs,
   input_types)` (`input_types`: the content type of each input that had one);
2. the worker shapes each item as TorchServe's worker does (`items.py`: bytearray values, the
   inputs' content types among the headers), sets the per-batch context (request ids, one
   `RequestProcessor` per item), calls `handle(data, context)` once, checks one response per
   request;
3. it answers `("result", responses, metrics)`, each response `(body, status, phrase, headers)`,
   or `("error", status, message, metrics)` when the whole batch failed.

A handler streaming with TorchServe's `send_intermediate_predict_response` sends
`("chunk", responses)` frames before its result: the same per-item shape, for the items the
call names. Bodies leave the worker as builtin values and numpy arrays only (`wire.py`): a torch
tensor becomes its numpy array; any other object fails its batch here, with its type named, not
in the frontend.

Messages at start: `("ready", info)` once `initialize` returned, or `("failed", message)`.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from api.backends.archive import Archive
from api.metrics_config import DEFAULT_MODEL_METRICS, DeclaredMetric
from api.workers import wire
from api.workers.items import handler_headers, handler_row

log = logging.getLogger(__name__)

# Images: a 24 MP (6000x4000) photo fits; a 13000x13000 PNG (164 KB, 169 M pixels, 1.5 GB once
# decoded) does not. handlers/torchgate_base.py has the same default for archives run elsewhere.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# Items (rows: images, texts) per request: batches are at most a few hundred rows; 24,000 digits
# in one gRPC request (6 MB, under max_request_size) held a worker for 1.1 s.
DEFAULT_MAX_ITEMS_PER_REQUEST = 1024
PREDICTION_METRIC = "PredictionTime"  # TorchServe's per-batch model metric, in ms
_PLAIN = (str, bytes, bytearray, int, float, bool, type(None))
# What a row of numbers or labels, or a flat JSON object, holds: sent as it is, without a call
# per element (an embedding's 384 floats cost 2 % of the minilm worker's time one by one).
_SCALARS = frozenset({str, int, float, bool, type(None)})


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker process needs to host its archive; built by the frontend, pickled."""

    archive: Archive
    index: int
    batch_size: int
    # The GPU the frontend assigned this worker (`api.backends.workers.GpuRoundRobin`:
    # TorchServe's server-wide round robin, kept across restarts); None: CPU.
    gpu_id: int | None
    intra_op_threads: int  # 0: leave torch's default
    # The shipped handlers' image limit (system property "max_image_pixels"); None: no limit,
    # TorchServe's limit_max_image_pixels=false.
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    # The most rows (images, texts) one request may bring the shipped handlers.
    max_items_per_request: int = DEFAULT_MAX_ITEMS_PER_REQUEST
    # The model's own package directories (its requirementsFile), after the model directory
    # on sys.path.
    python_path: tuple[str, ...] = ()
    # metrics_config's model_metrics, created in the handler's metrics cache up front.
    declared_metrics: tuple[DeclaredMetric, ...] = DEFAULT_MODEL_METRICS
    # TorchServe's service_envelope (kserve, kservev2, body, json): the envelope of
    # ts.torch_handler.request_envelope that wraps the handler; None: the handler alone.
    service_envelope: str | None = None


# (request_id, headers, inputs, input_types): one request of a batch, as the frontend sends it.
Item = tuple[str, dict[str, str], dict[str, Any], dict[str, str]]


class _Metrics(list[tuple[str, float, str, dict[str, str], str]]):
    """Collects the metric updates of one batch (or of initialize) to send with its answer."""

    def __call__(
        self, name: str, value: float, unit: str, dims: Mapping[str, str], kind: str
    ) -> None:
        self.append((name, value, unit, dict(dims), kind))

    def take(self) -> list[tuple[str, float, str, dict[str, str], str]]:
        # What was copied is what is removed: an update a handler's own thread appends in
        # between stays for the next answer (clear() would lose it).
        taken = self[:]
        del self[: len(taken)]
        return taken


def run(spec: WorkerSpec, sock: socket.socket, *, spin: float) -> None:
    """Load the handler, report, then serve batches until told to stop. Blocking. `spin`:
    seconds to poll for the next batch before sleeping (`wire.FrameReader`)."""
    import torch  # imported by the zygote already: free

    from api.workers.context import MetricsStore, make_context
    from api.workers.handler import enter_model_dir, load_handler

    archive = spec.archive
    metrics = _Metrics()
    try:
        gpu_id = _device(torch, spec)
        if gpu_id is None and spec.intra_op_threads > 0:
            torch.set_num_threads(spec.intra_op_threads)
        enter_model_dir(archive.model_dir, spec.python_path)
        context = make_context(
            model_name=archive.name,
            model_dir=archive.model_dir,
            manifest=archive.manifest,
            batch_size=spec.batch_size,
            gpu_id=gpu_id,
            metrics=MetricsStore(archive.name, metrics, spec.declared_metrics),
            model_yaml_config=archive.model_config,
            max_image_pixels=spec.max_image_pixels,
            max_items_per_request=spec.max_items_per_request,
        )
        _install_streaming(sock)
        entry = load_handler(archive, context)
    except Exception as exc:
        message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        log.error("%s", message, exc_info=exc.__cause__ or exc)
        wire.send(sock, wire.encode(("failed", message)))
        return
    device = "cpu" if gpu_id is None else f"cuda:{gpu_id}"
    info = {"pid": os.getpid(), "device": device, "description": entry.description}
    wire.send(sock, wire.encode(("ready", info, metrics.take())))
    log.info("worker %d: %s on %s", spec.index, entry.description, device)
    handle = plain = entry.handle
    if spec.service_envelope:
        handle = wrap_in_envelope(plain, spec.service_envelope)
    global _LOOP
    _LOOP = _Loop(spec, context, handle, metrics, torch, plain=plain)
    _LOOP.serve(sock, spin=spin)


# A request header the frontend sets on the items of its own KServe endpoints, which unwrapped
# them already (service_envelope does not unwrap them again) and take a handler's tensor as a
# tensor; taken out before the handler sees the headers.
PLAIN_ITEM = "x-torchgate-plain-item"


def wrap_in_envelope(handle: Any, envelope: str) -> Any:
    """`handle` inside TorchServe's request envelope `envelope`, as its model loader wraps the
    entry point: the envelope unwraps each batch for the handler and wraps what it returns."""
    import importlib

    module = importlib.import_module(f"ts.torch_handler.request_envelope.{envelope}")
    from ts.torch_handler.request_envelope.base import BaseEnvelope

    classes = [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, BaseEnvelope)
        and value is not BaseEnvelope
        and value.__module__ == module.__name__
    ]
    return classes[0](handle).handle


def _device(torch: Any, spec: WorkerSpec) -> int | None:
    """The GPU the frontend assigned (`spec.gpu_id`), made torch's current device so that a
    handler's bare "cuda" means it too (TorchServe leaves cuda:0 current: docs/compatibility.md);
    None (CPU) without one, or without CUDA in this torch. CUDA starts here, after the fork (the
    zygote never touches it), so every worker can use it."""
    gpu_id = spec.gpu_id
    if gpu_id is None or not torch.cuda.is_available():
        return None
    torch.cuda.set_device(gpu_id)
    return int(gpu_id)


class _Loop:
    def __init__(
        self,
        spec: WorkerSpec,
        context: Any,
        handle: Any,
        metrics: _Metrics,
        torch: Any,
        *,
        plain: Any = None,
    ) -> None:
        from ts.context import RequestProcessor
        from ts.metrics.metric_cache_errors import MetricsCacheKeyError
        from ts.metrics.metric_type_enum import MetricTypes

        self._processor = RequestProcessor
        self._context = context
        self._handle = handle
        # The handler without service_envelope, for items torchgate's own KServe endpoints
        # already unwrapped (marked with PLAIN_ITEM by the frontend).
        self._plain = plain if plain is not handle else None
        self._metrics = metrics
        self._tensor = torch.Tensor
        self._torch_save = torch.save
        self._what = f"Model {spec.archive.name} version {spec.archive.version} handler failed"
        # As TorchServe's Service.predict (`metrics.add_time(PREDICTION_METRIC, ...)`): the
        # PredictionTime gauge metrics_config declares (its unit and dimensions), else a new one.
        try:
            self._prediction_time = context.metrics.get_metric(PREDICTION_METRIC, MetricTypes.GAUGE)
        except MetricsCacheKeyError:
            self._prediction_time = context.metrics.add_metric_to_cache(
                PREDICTION_METRIC, "ms", ["ModelName", "Level"], MetricTypes.GAUGE
            )
        self._model_dims = [spec.archive.name, "Model"]
        # While a batch mixing entry points runs one group: the batch index of each of the
        # group's items, since the handler's indexes (and so its parts') are the group's.
        self._group: list[int] | None = None
        # (code, message) of an intermediate response with a code other than 200: as in
        # TorchServe, the whole batch fails with it, and the rest of its responses are dropped.
        self._stream_failure: tuple[int, str] | None = None
        # The request ids of the batch (the group) `handle` is running; None between batches.
        self._running: Mapping[int, str] | None = None
        self._strays_noted = False

    def serve(self, sock: socket.socket, *, spin: float) -> None:
        reader = wire.FrameReader(sock, spin=spin)
        while (frame := reader.read()) is not None:
            message = wire.loads(frame)
            del frame
            if message[0] == "stop":
                return
            wire.send(sock, wire.encode(self._answer(message[1])))
            del message  # do not keep the last batch alive while idle

    def _answer(self, items: list[Item]) -> tuple[Any, ...]:
        marked = [headers.pop(PLAIN_ITEM, None) is not None for _, headers, _, _ in items]
        plain = [i for i, is_plain in enumerate(marked) if is_plain]
        if self._plain is None or not plain:
            return self._run(items, self._handle, marked)
        if len(plain) == len(items):
            return self._run(items, self._plain, marked)
        # A batch mixing both: each group through its own entry point, answers back in order.
        wrapped = [i for i, is_plain in enumerate(marked) if not is_plain]
        answers: list[Any] = [None] * len(items)
        metrics: list[Any] = []
        try:
            for group, handle in ((wrapped, self._handle), (plain, self._plain)):
                self._group = group
                reply = self._run([items[i] for i in group], handle, [marked[i] for i in group])
                metrics += reply[-1]
                if reply[0] != "result":
                    return (*reply[:-1], metrics)
                for i, response in zip(group, reply[1], strict=True):
                    answers[i] = response
        finally:
            self._group = None
        return ("result", answers, metrics)

    def _run(self, items: list[Item], handle: Any, kserve: list[bool]) -> tuple[Any, ...]:
        """One `handle` call; `kserve[i]`: item i came through torchgate's KServe APIs."""
        from ts.utils.util import PredictionException

        context = self._context
        processors = [
            self._processor(handler_headers(headers, inputs, types))
            for _, headers, inputs, types in items
        ]
        ids = {idx: request_id for idx, (request_id, _, _, _) in enumerate(items)}
        context.request_ids = ids
        context.request_processor = processors
        context.metrics.request_ids = ids
        data = [handler_row(inputs, types) for _, _, inputs, types in items]
        started = time.perf_counter()
        self._stream_failure = None
        failure: tuple[int, str] | None = None
        self._running = ids
        try:
            result = handle(data, context)
        except PredictionException as exc:
            # TorchServe's way for a handler to fail a batch with a status of its choosing.
            failure = (int(exc.error_code), str(exc.message))
        except Exception as exc:
            log.warning("%s", self._what, exc_info=True)
            status = 507 if _out_of_resources(exc) else 500  # 507: TorchServe's "Out of resources"
            failure = (status, f"{self._what}: {type(exc).__name__}: {exc}")
        finally:
            self._running = None
        # An intermediate response's error came first: TorchServe answered the batch with it.
        failure = self._stream_failure or failure
        if failure is not None:
            return ("error", *failure, self._metrics.take())
        elapsed_ms = round((time.perf_counter() - started) * 1000, 2)
        self._prediction_time.add_or_update(elapsed_ms, self._model_dims)
        problem = _count_problem(result, len(items))
        if problem is not None:
            return ("error", 500, f"{self._what}: {problem}", self._metrics.take())
        try:
            responses = [
                self._response(body, processor, last=True, saved_tensor=not is_kserve)
                for body, processor, is_kserve in zip(result, processors, kserve, strict=False)
            ]
        except TypeError as exc:
            return ("error", 500, f"{self._what}: {exc}", self._metrics.take())
        return ("result", responses, self._metrics.take())

    def _response(
        self, body: Any, processor: Any, *, last: bool = False, saved_tensor: bool = True
    ) -> tuple[Any, int, str, dict[str, str]]:
        """`saved_tensor`: a torch tensor answered as TorchServe's worker answers it, the bytes
        of `torch.save` (clients `torch.load` them); else as its numpy array (a KServe tensor)."""
        headers = dict(processor.get_response_headers())
        if last and headers.get("ts_stream_next") == "true":
            headers["ts_stream_next"] = "false"  # the end of a stream, as TorchServe's worker
        status = int(processor.get_response_status_code())
        if not 100 <= status <= 599:
            # No HTTP status: the frontend could not send it (the connection was dropped).
            message = f"{self._what}: set_response_status({status}) is not an HTTP status"
            return (message, 500, message, {})
        if saved_tensor and isinstance(body, self._tensor):
            body = self._saved(body)
        return (
            self.portable(body),
            status,
            processor.get_response_status_phrase() or "",
            headers,
        )

    def _saved(self, tensor: Any) -> bytes:
        buffer = io.BytesIO()
        self._torch_save(tensor, buffer)
        return buffer.getvalue()

    def portable(self, value: Any) -> Any:
        """`value` as builtin values and numpy arrays, or TypeError naming what is not."""
        if isinstance(value, _PLAIN):
            return (
                wire.Blob(value)
                if type(value) is bytes and len(value) >= wire.BLOB_BYTES
                else value
            )
        if isinstance(value, self._tensor):
            return value.detach().cpu().numpy()
        if isinstance(value, dict):
            if _SCALARS.issuperset(map(type, value.values())):  # e.g. labels -> probabilities
                return value if type(value) is dict else dict(value)
            return {k: self.portable(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            if _SCALARS.issuperset(map(type, value)):
                return value if type(value) is list else list(value)
            return [self.portable(v) for v in value]
        if type(value).__module__ == "numpy":
            return value
        raise TypeError(
            f"returned a {type(value).__module__}.{type(value).__qualname__}; a response must be "
            f"str, bytes, JSON-compatible values, numpy arrays or torch tensors"
        )

    def _stray_parts(self, req_id_map: Mapping[int, str]) -> None:
        if not self._strays_noted:
            self._strays_noted = True
            log.warning(
                "%s: dropped intermediate responses for requests %s, which the batch running "
                "now does not hold (sent from a thread after their batch was answered?); "
                "said once",
                self._what,
                sorted(req_id_map.values()),
            )

    def chunk(
        self,
        ret: list[Any],
        req_id_map: Mapping[int, str],
        sock: socket.socket,
        *,
        code: int = 200,
        message: str = "",
    ) -> None:
        """One intermediate response per item named in `req_id_map`, sent at once; with a
        `code` other than 200, none, and the batch fails with `code` and `message` when the
        handler returns (TorchServe answers every request of the batch with that error)."""
        running = self._running
        if running is None or any(running.get(idx) != rid for idx, rid in req_id_map.items()):
            # Not this batch's (a handler's thread streaming on after its batch was answered,
            # or into the next one): sent, it would reach other clients' requests.
            self._stray_parts(req_id_map)
            return
        if self._stream_failure is not None:
            return
        if code != 200:
            self._stream_failure = (code, message)
            return
        context = self._context
        responses = []
        for idx in req_id_map:
            context.set_response_header(idx, "ts_stream_next", "true")
            response = self._response(ret[idx], context.request_processor[idx])
            responses.append((idx if self._group is None else self._group[idx], *response))
        wire.send(sock, wire.encode(("chunk", responses)))


def _out_of_resources(exc: Exception) -> bool:
    """Memory ran out, on the host or the GPU: TorchServe answers such a batch 507 "Out of
    resources" rather than its 503, so clients can tell it from a handler's bug. It tells
    CUDA's by the text (torch's OutOfMemoryError, cuBLAS failing to allocate), as here."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return any(sign in text for sign in _OUT_OF_GPU_MEMORY)


_OUT_OF_GPU_MEMORY = ("CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def _count_problem(result: Any, expected: int) -> str | None:
    if not isinstance(result, list):
        return f"returned {type(result).__name__}, expected a list of {expected} responses"
    if len(result) != expected:
        return f"returned {len(result)} responses for a batch of {expected} requests"
    return None


_LOOP: _Loop | None = None


def _install_streaming(sock: socket.socket) -> None:
    """Route TorchServe's `send_intermediate_predict_response` to this worker's socket.

    Handlers import it from `ts.handler_utils.utils` (or the older `ts.protocol.
    otf_message_handler`) when their module loads, which happens after this, so they get the
    replacement. TorchServe's version writes its binary protocol to `context.cl_socket`.
    """
    import ts.handler_utils.utils as utils
    import ts.protocol.otf_message_handler as otf

    def send_intermediate_predict_response(
        ret: list[Any], req_id_map: Mapping[int, str], message: str, code: int, context: Any = None
    ) -> None:
        if str(os.getenv("LOCAL_RANK", 0)) != "0" or _LOOP is None:
            return
        _LOOP.chunk(ret, req_id_map, sock, code=int(code), message=str(message))

    utils.send_intermediate_predict_response = send_intermediate_predict_response
    otf.send_intermediate_predict_response = send_intermediate_predict_response
