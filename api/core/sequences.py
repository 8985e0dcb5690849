"""Sequence batching (TorchServe's `sequenceBatching: true`) for one model version.

A stateful handler keeps per-sequence state (examples/stateful: a running sum in an LRU cache,
keyed by `context.get_sequence_id(idx)`), so every request of a sequence must reach the same
worker, one at a time and in order. TorchServe 0.12's rules, kept here:

- A request names its sequence in the `ts_request_sequence_id` header (gRPC StreamPredictions2:
  its `sequence_id` field, which the transport puts in that header). One without an id starts a
  new sequence: it gets the id `ts-seq-<uuid4>` and the header `ts_request_sequence_start: true`,
  both visible to the handler. The id is not sent back (TorchServe does not either), so such a
  request is a sequence of one: requests without an id never share state.
- A sequence is pinned to the first worker that runs one of its requests; a batch holds at most
  one request per sequence, so a sequence's requests run one after the other, in order.
- At most `max_num_sequence` sequences exist at once and each queues at most
  `max_sequence_job_queue_size` requests; past either, 503 with TorchServe's message.
- A sequence ends once it was idle (nothing queued or running) for `sequence_max_idle_ms`, or
  once it is idle after `sequence_timeout_ms` (0: never) since it began. A later request with
  the same id starts a new sequence, perhaps on another worker.

Differences from TorchServe: a batch goes as soon as a worker is free (TorchServe waits up to
`maxBatchDelay` for more sequences); expiry is checked when requests arrive rather than by a
polling thread, so it is seen at the same moments by clients; a sequence whose worker died moves
to another worker (its handler state is lost with the process either way), its next request
marked `ts_request_sequence_start: true` there, so that a handler can tell; a request whose
client went away while it was queued still runs (TorchServe runs it too), since the sequence's
state is every request it took in turn.

Everything runs on the one event loop; `clock` is injectable so tests need no sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from api.core.batching import Batcher, Clock, Pending, predict_in_time, worker_alive
from api.core.types import (
    REJECT_QUEUE_FULL,
    InferenceRequest,
    ModelSettings,
    NotRun,
    Observer,
    Prediction,
    Worker,
    header_value,
)
from api.errors import InferenceFailed, Overloaded, TorchgateError

log = logging.getLogger(__name__)


# TorchServe's header names (ConfigManager's defaults; ts.context reads the same ones).
SEQUENCE_ID = "ts_request_sequence_id"
SEQUENCE_START = "ts_request_sequence_start"
SEQUENCE_END = "ts_request_sequence_end"  # passed to the handler; ends nothing here


def new_sequence_id() -> str:
    """An id as TorchServe makes one for a request that names no sequence."""
    return f"ts-seq-{uuid.uuid4()}"


def refused_message(model: str) -> str:
    """TorchServe's 503 message when a sequence cannot take a request."""
    return (
        f'Model "{model}" has no worker to serve inference request. Please use scale workers '
        f"API to add workers. If this is a sequence inference, please check if it is closed, "
        f"or expired; or exceeds maxSequenceJobQueueSize"
    )


@dataclass(slots=True)
class Sequence:
    """One sequence's queue and where it runs."""

    id: str
    started_at: float
    last_active: float
    queue: deque[Pending] = field(default_factory=deque)
    worker: Worker | None = None  # pinned on its first batch
    running: bool = False
    served: bool = False  # a request of it reached a handler: there is state to lose
    # Its worker ended (crash, scale-down) after serving some of it: its handler state went
    # with it, so its next request is marked as a sequence's start on the worker it moves to.
    moved: bool = False

    def idle(self) -> bool:
        return not self.running and not self.queue


@dataclass(slots=True)
class SequenceLimits:
    max_num_sequence: int
    max_sequence_job_queue_size: int
    sequence_max_idle_s: float
    sequence_timeout_s: float  # 0: none


class SequenceBatcher(Batcher):
    """The queue of one sequence-batching model version, in place of its `Batcher`.

    It keeps `Batcher`'s surface (`submit`, `serve`, `drain`, `fail_queued`, `set_limits`,
    `depth`, `in_flight`, `busy_workers`) with queues per sequence instead of one, so the
    registry, the supervisor and the dataplane treat both alike.
    """

    def __init__(
        self,
        *,
        model: str,
        version: str,
        max_batch_size: int,
        max_batch_delay_s: float,
        queue_size: int,
        response_timeout_s: float,
        limits: SequenceLimits,
        observer: Observer | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(
            model=model,
            version=version,
            max_batch_size=max_batch_size,
            max_batch_delay_s=max_batch_delay_s,  # batches never wait for more sequences
            queue_size=queue_size,
            response_timeout_s=response_timeout_s,
            observer=observer,
            clock=clock,
        )
        self.limits = limits
        self._sequences: dict[str, Sequence] = {}
        self._changed = asyncio.Event()  # a request arrived or a sequence became free
        self._busy_workers: set[int] = set()  # id() of workers running a batch

    # -- called by the dataplane -------------------------------------------------------------

    @property
    def depth(self) -> int:
        # A copy first, made in one step: /metrics reads this from its own thread while the
        # event loop adds and removes sequences (iterating the dict itself could fail).
        return sum(len(s.queue) for s in list(self._sequences.values()))

    @property
    def busy_workers(self) -> int:
        return len(self._busy_workers)

    @property
    def in_flight(self) -> int:
        return self.depth + self._running_requests

    @property
    def sequences(self) -> dict[str, Sequence]:
        """The live sequences by id (read-only use: tests and describe)."""
        self._expire(self._clock())
        return self._sequences

    def submit(
        self, request: InferenceRequest, *, alone: bool = False
    ) -> asyncio.Future[Prediction]:
        """Queue a request on its sequence (a new one if it names none or an ended one);
        `alone` (TorchServe's describe request, a sequence of its own since it names none):
        it runs in a batch with no other sequence's request."""
        if self._closed:
            raise Overloaded(
                f"Model {self.model} version {self.version} is shutting down", retry_after=1
            )
        if self.limits.sequence_max_idle_s <= 0:
            # TorchServe keeps no sequences without sequenceMaxIdleMSec and refuses them all.
            raise Overloaded(
                f"{refused_message(self.model)} (sequenceBatching needs sequenceMaxIdleMSec > 0)"
            )
        sequence_id = header_value(request.headers, SEQUENCE_ID) or ""
        if not sequence_id:
            sequence_id = new_sequence_id()
            request.headers = {
                **request.headers,
                SEQUENCE_START: "true",
                SEQUENCE_ID: sequence_id,
            }
        now = self._clock()
        self._expire(now)
        sequence = self._sequences.get(sequence_id)
        if sequence is None:
            if len(self._sequences) >= self.limits.max_num_sequence:
                self._refuse("maxNumSequence", sequence_id)
            sequence = Sequence(sequence_id, started_at=now, last_active=now)
            self._sequences[sequence_id] = sequence
        elif len(sequence.queue) >= self.limits.max_sequence_job_queue_size:
            self._refuse("maxSequenceJobQueueSize", sequence_id)
        future: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
        sequence.queue.append(Pending(request, future, now, now + self.response_timeout_s, alone))
        sequence.last_active = now
        self._idle.clear()
        self._changed.set()
        self._observer.queue_changed(self.model, self.version, self.depth)
        return future

    def _refuse(self, limit: str, sequence_id: str) -> None:
        log.warning(
            "%s/%s: refused a request of sequence %s (%s reached)",
            self.model,
            self.version,
            sequence_id,
            limit,
        )
        self._observer.request_rejected(self.model, self.version, REJECT_QUEUE_FULL)
        raise Overloaded(refused_message(self.model))

    def _queued(self) -> Iterable[Pending]:
        return (pending for s in self._sequences.values() for pending in s.queue)

    def fail_queued(self, error: TorchgateError) -> None:
        for sequence in self._sequences.values():
            while sequence.queue:
                pending = sequence.queue.popleft()
                if not pending.future.done():
                    pending.future.set_exception(error)
        self._note_if_idle()

    # -- run by the registry, one task per worker ----------------------------------------------

    async def serve(self, worker: Worker) -> None:  # one lane per worker: no pipelining
        """Run batches on `worker` until cancelled or it dies; its sequences then move on.

        Cancelled (a scale-down), the batch in hand is answered, within a response timeout,
        as `Batcher.serve`'s are: the lane runs as a task of its own, which the cancellation
        stops only when it has no batch.
        """
        stopping = asyncio.Event()
        lane = asyncio.ensure_future(self._lane_of(worker, stopping))
        try:
            await asyncio.shield(lane)
        except asyncio.CancelledError:
            stopping.set()  # no further batch
            if id(worker) in self._busy_workers:
                await asyncio.shield(asyncio.ensure_future(self._finish([lane])))
            else:
                lane.cancel()
            raise
        finally:
            moved = [s for s in self._sequences.values() if s.worker is worker]
            for sequence in moved:
                self._unpin(sequence)
            if moved:  # INFO: a scale-down or a stop moves them too, as planned
                log.info(
                    "%s/%s: %d sequence(s) lost their worker and its state; their next "
                    "requests start afresh on another worker, marked %s: true",
                    self.model,
                    self.version,
                    len(moved),
                    SEQUENCE_START,
                )
            self._changed.set()

    async def _lane_of(self, worker: Worker, stopping: asyncio.Event) -> None:
        while worker_alive(worker) and not stopping.is_set():
            batch = self._take(worker)
            if batch:
                await self._run_sequences(worker, batch)
            else:
                self._changed.clear()
                await self._changed.wait()

    def _take(self, worker: Worker) -> list[tuple[Sequence, Pending]]:
        """One request from each ready sequence of `worker` (or unpinned), oldest first."""
        now = self._clock()
        batch: list[tuple[Sequence, Pending]] = []
        ready = [
            s
            for s in self._sequences.values()
            if s.queue and not s.running and (s.worker is None or s.worker is worker)
        ]
        ready.sort(key=lambda s: s.queue[0].enqueued_at)
        for sequence in ready:
            if len(batch) >= self.max_batch_size:
                break
            pending = self._next_pending(sequence, now)
            if pending is None:
                continue
            if pending.alone and batch:
                sequence.queue.appendleft(pending)  # it opens a batch of its own, later
                continue
            if sequence.moved:
                sequence.moved = False
                request = pending.request
                request.headers = {**request.headers, SEQUENCE_START: "true"}
            sequence.worker = worker
            sequence.running = True
            batch.append((sequence, pending))
            if pending.alone:
                break  # nothing joins it
        if batch:
            # Counted as running from here, not once its task starts: a drain in between
            # would find nothing queued and nothing running.
            self._busy_workers.add(id(worker))
            self._running_requests += len(batch)
            self._observer.queue_changed(self.model, self.version, self.depth)
        self._note_if_idle()
        return batch

    def _next_pending(self, sequence: Sequence, now: float) -> Pending | None:
        while sequence.queue:
            pending = sequence.queue.popleft()
            if pending.future.cancelled():
                # Its client went away, but the sequence's state is every request it took in
                # turn: it runs, its answer dropped, as TorchServe runs it. (One answered 504
                # at its deadline was reported failed, and is not run.)
                return pending
            if not pending.future.done() and not self._expired(pending, now):
                return pending
        return None

    async def _run_sequences(self, worker: Worker, batch: list[tuple[Sequence, Pending]]) -> None:
        pendings = [pending for _, pending in batch]
        started = self._clock()
        try:
            predictions = await predict_in_time(
                worker, [pending.request for pending in pendings], self.response_timeout_s
            )
        except asyncio.CancelledError:
            self._fail(pendings, InferenceFailed(f"Model {self.model}: its worker was stopped"))
            raise
        except NotRun:
            # Never started: back to the front of its sequence, queued afresh.
            self._renew_deadlines(pendings)
            for sequence, pending in batch:
                sequence.queue.appendleft(pending)
                self._unpin(sequence)
            self._watch(pendings)
            return
        except TorchgateError as exc:
            self._fail(pendings, exc)
            return
        except Exception as exc:
            self._fail(pendings, InferenceFailed(f"Worker died: {type(exc).__name__}: {exc}"))
            return
        finally:
            self._release(worker, batch)
        self._deliver(pendings, predictions, started)

    @staticmethod
    def _unpin(sequence: Sequence) -> None:
        """Free a sequence from its worker (which ended, or will not run it); the state it had
        there is lost once it moves."""
        if sequence.worker is not None and sequence.served:
            sequence.moved = True
        sequence.worker = None

    def _release(self, worker: Worker, batch: list[tuple[Sequence, Pending]]) -> None:
        now = self._clock()
        for sequence, _ in batch:
            sequence.served = sequence.served or sequence.worker is worker  # not NotRun's
            sequence.running = False
            sequence.last_active = now  # the idle clock starts once its request is answered
        self._busy_workers.discard(id(worker))
        self._running_requests -= len(batch)
        self._changed.set()
        self._note_if_idle()

    def _expire(self, now: float) -> None:
        """End the sequences idle past sequenceMaxIdleMSec or past sequenceTimeoutMSec."""
        limits = self.limits
        ended = [
            s.id
            for s in self._sequences.values()
            if s.idle()
            and (
                now - s.last_active > limits.sequence_max_idle_s
                or (
                    limits.sequence_timeout_s > 0 and now - s.started_at > limits.sequence_timeout_s
                )
            )
        ]
        for sequence_id in ended:
            del self._sequences[sequence_id]

    def _note_if_idle(self) -> None:
        if self._running_requests == 0 and all(s.idle() for s in self._sequences.values()):
            self._idle.set()
        elif self._closed:
            self._note_if_drained()


def sequence_limits(
    *,
    max_num_sequence: int,
    max_sequence_job_queue_size: int,
    sequence_max_idle_ms: float,
    sequence_timeout_ms: float,
) -> SequenceLimits:
    """TorchServe's model-config.yaml values as the batcher's limits (at least 1 of each)."""
    return SequenceLimits(
        max_num_sequence=max(1, max_num_sequence),
        max_sequence_job_queue_size=max(1, max_sequence_job_queue_size),
        sequence_max_idle_s=sequence_max_idle_ms / 1000.0,
        sequence_timeout_s=max(0.0, sequence_timeout_ms / 1000.0),
    )


def describe_fields(settings: ModelSettings) -> dict[str, Any]:
    """TorchServe 0.12's describe keys for sequence batching, in its order (it shows them for
    every model, right after "useVenv"). The limits read 0 unless sequenceMaxIdleMSec > 0:
    TorchServe reads them only then."""
    read = settings.sequence_max_idle_ms > 0
    return {
        "stateful": settings.sequence_batching,
        "sequenceMaxIdleMSec": int(settings.sequence_max_idle_ms) if read else 0,
        "sequenceTimeoutMSec": int(settings.sequence_timeout_ms) if read else 0,
        "maxNumSequence": settings.max_num_sequence if read else 0,
        "maxSequenceJobQueueSize": settings.max_sequence_job_queue_size if read else 0,
    }
