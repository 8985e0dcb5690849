"""The skeleton of torchgate's built-in handlers: TorchServe's contract, one outcome per item.

A built-in handler implements two steps; `BuiltinHandler.handle` runs them so that the valid
items of a batch share forward passes and a bad item fails alone::

    prepare(payload) -> Prepared           # one request -> its model input; BadRequest if bad
    postprocess(output, count) -> [answer]  # the model's output for `count` stacked inputs

Items whose inputs have the same shape and dtype go through the model together, one stack
per shape (TorchServe stacks the whole batch, so one odd-sized input fails every request in
it). A failed forward pass fails only its own group: 400 when the client chose the input's
shape (a JSON tensor), 500 when the handler built it (a decoded image). A failed item's status
is set with ``context.set_response_status`` and its body is ``{"code", "type", "message"}``,
as in torchgate's example handlers.

The payload of an item is TorchServe's ``row.get("data") or row.get("body")``; a request with
neither but exactly one form field (``curl -F file=@kitten.jpg``) uses that field.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..torchgate_base import BadRequest, Context, reason_phrase
from .labels import Labels, load_labels
from .model import Model, load_model, select_device

logger = logging.getLogger(__name__)

HANDLER_TIME = "HandlerTime"  # TorchServe's BaseHandler metric, in ms
_TORCHSCRIPT_TRACE = "The following operation failed in the TorchScript interpreter"


@dataclass(slots=True)
class Prepared:
    """One valid request: its model input, without the batch dimension."""

    tensor: torch.Tensor
    # The client chose this tensor's shape (a JSON list), so a model that refuses it refuses
    # the client's input; a tensor the handler built (a decoded image) failing is the server's.
    from_client: bool = False


def request_payload(item: Any) -> Any:
    """What TorchServe's built-in handlers read from one request item (see module docstring)."""
    if not isinstance(item, dict):
        return item
    payload = item.get("data") or item.get("body")
    if payload is None and len(item) == 1:
        payload = next(iter(item.values()))
    if payload is None:
        raise BadRequest('empty request: no "data" or "body"')
    return payload


class BuiltinHandler(ABC):
    """Loads the archive's model and labels, then serves batches (see the module docstring)."""

    def __init__(self) -> None:
        self.model: Model | None = None
        self.labels: Labels = None
        self.device = torch.device("cpu")
        self.manifest: dict[str, Any] = {}
        self.model_dir = Path()
        self.initialized = False

    def initialize(self, context: Context) -> None:
        properties = context.system_properties
        self.model_dir = Path(properties["model_dir"])
        self.manifest = context.manifest or {}
        self.device = select_device(properties)
        self.model = load_model(self.model_dir, self.manifest, self.device)
        self.labels = load_labels(self.model_dir)
        self.setup(context)
        self.initialized = True
        logger.info("%s loaded its model on %s", type(self).__name__, self.device)

    def setup(self, context: Context) -> None:  # noqa: B027 - optional hook, empty by default
        """What a handler loads after the model (a vocabulary)."""

    @abstractmethod
    def prepare(self, payload: Any) -> Prepared:
        """One request's model input; raise `BadRequest` with a message for its client."""

    @abstractmethod
    def postprocess(self, output: Any, count: int) -> list[Any]:
        """One answer per input from the model's output for `count` inputs."""

    def group_key(self, prepared: Prepared) -> Hashable:
        """Inputs with equal keys share a forward pass."""
        return (tuple(prepared.tensor.shape), prepared.tensor.dtype)

    def run(self, items: list[Prepared]) -> list[Any]:
        """One forward pass over `items` (one group): stacked, as TorchServe's handlers do."""
        assert self.model is not None, "handler used before initialize()"
        batch = torch.stack([item.tensor for item in items])
        return self.postprocess(self.model(batch), len(items))

    def handle(self, data: list[Any], context: Context) -> list[Any]:
        """TorchServe entry point: one answer per request in `data`, in order."""
        started = time.perf_counter()
        answers: list[Any] = [None] * len(data)
        groups: dict[Hashable, list[tuple[int, Prepared]]] = {}
        for idx, item in enumerate(data):
            try:
                prepared = self.prepare(request_payload(item))
            except BadRequest as exc:  # 400, or 413 for an image with too many pixels
                answers[idx] = _failed(context, idx, exc.code, str(exc), exc.type)
            except Exception as exc:  # a bug in preparing: fail this item alone, loudly
                logger.exception("request %d of the batch could not be prepared", idx)
                message = f"could not read the request: {type(exc).__name__}: {exc}"
                answers[idx] = _failed(context, idx, 500, message)
            else:
                groups.setdefault(self.group_key(prepared), []).append((idx, prepared))
        for members in groups.values():
            for (idx, _), answer in zip(members, self._run_group(members, context), strict=True):
                answers[idx] = answer
        metrics = getattr(context, "metrics", None)
        if metrics is not None:
            elapsed_ms = round((time.perf_counter() - started) * 1000, 2)
            metrics.add_time(HANDLER_TIME, elapsed_ms, None, "ms")
        return answers

    def _run_group(self, members: list[tuple[int, Prepared]], context: Context) -> list[Any]:
        items = [prepared for _, prepared in members]
        try:
            answers = self.run(items)
            if len(answers) != len(items):
                raise RuntimeError(f"{len(answers)} answers for {len(items)} inputs")
            return answers
        except Exception as exc:
            shape = list(items[0].tensor.shape)
            if all(item.from_client for item in items):
                message = f"the model cannot take an input of shape {shape}: {_reason(exc)}"
                return [_failed(context, idx, 400, message) for idx, _ in members]
            logger.exception("inference failed for %d inputs of shape %s", len(items), shape)
            message = f"inference failed: {_reason(exc)}"
            return [_failed(context, idx, 500, message) for idx, _ in members]


def _reason(exc: Exception) -> str:
    """One line for the client. A TorchScript error holds the model's call stack, with the
    actual error ("RuntimeError: mat1 and mat2 shapes cannot be multiplied ...") last."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith(_TORCHSCRIPT_TRACE):
        return lines[-1]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _failed(
    context: Context, idx: int, code: int, message: str, kind: str | None = None
) -> dict[str, Any]:
    context.set_response_status(code, reason_phrase(message), idx)
    kind = kind or ("BadRequest" if code == 400 else "InternalServerError")
    return {"code": code, "type": kind, "message": message}
