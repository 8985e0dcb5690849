"""Dynamic batching for one model version: a bounded queue feeding one or more workers.

The rule, per worker:

1. Block (on an event, never polling) until a request is queued; it opens the batch.
2. Take whatever else is already queued, up to `max_batch_size`.
3. Only while another batch of this model is running (on another worker, or on this one, which
   takes its next batch while it runs the current one) — the model is saturated, more requests
   are coming and compute is already occupied — wait for the batch to fill, at most until the
   first request's arrival plus `max_batch_delay`, and no longer than some batch still runs.
   The delay clock starts when the first request of the batch arrived, not when a worker picked
   it up, so a request that already queued that long goes at once.
   Otherwise go at once: holding a batch while no other batch runs only leaves compute idle,
   and under load batches fill anyway, because requests queue up while the worker runs. (The
   clients of the running batch are often the ones that would fill the held one: with 8
   connections and batches of 8, a held batch fills only after the running one answers.)
   (TorchServe always waits the full delay for a partial batch: 7-8 ms at concurrency 1.)
4. Run the batch and resolve each request's future on its own.

Requests whose future is already done (the client disconnected, or the dataplane gave up at the
deadline) are skipped before inference, and so are requests whose deadline has passed: neither
is ever run.

A request queued `alone` (TorchServe's describe request) runs in a batch of its own,
in its place in the queue: the batch before it closes when it reaches it, and nothing queued
after it joins it. (TorchServe's `BaseHandler` reads `describe` on a batch's first row only and
then answers once for the whole batch.)
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from api.core.types import (
    REJECT_DEADLINE,
    REJECT_QUEUE_FULL,
    InferenceRequest,
    NotRun,
    NullObserver,
    Observer,
    Prediction,
    Worker,
)
from api.errors import DeadlineExceeded, InferenceFailed, Overloaded, TorchgateError

Clock = Callable[[], float]

# A pipelining worker (see `Batcher.serve`) gets this many times its depth in lanes; the
# extra ones run only under overload.
OVERLOAD_LANES = 4


@dataclass(slots=True)
class Pending:
    request: InferenceRequest
    future: asyncio.Future[Prediction]
    enqueued_at: float
    deadline: float
    # Runs in a batch of its own (`Batcher.submit`'s `alone`).
    alone: bool = False


class Batcher:
    """The queue and batching loop of one model version.

    `submit` is called by the dataplane; `serve(worker)` is run as one task per worker by the
    registry. Everything runs on the one event loop, so the deque needs no lock.
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
        observer: Observer | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.model = model
        self.version = version
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.queue_size = queue_size
        self.response_timeout_s = response_timeout_s
        self._observer = observer or NullObserver()
        self._clock = clock
        self._queue: deque[Pending] = deque()
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()  # a full batch is queued (see `_lane`'s overload lanes)
        self._fillers: list[asyncio.Future[None]] = []  # lanes waiting for a batch to fill
        self._idle = asyncio.Event()
        self._idle.set()
        self._running = 0  # batches being run by workers right now
        self._busy = 0  # workers running at least one batch
        self._running_requests = 0  # requests in those batches
        # Each served worker's batches in hand, in the order it runs them (by id(worker)): all
        # but the first wait in the worker, not started yet (`pending`).
        self._hands: dict[int, deque[list[Pending]]] = {}
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # The loop in whose current turn answered requests were last dropped from a full
        # queue (`_room_made`), until that turn ends.
        self._dropped_in: asyncio.AbstractEventLoop | None = None

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, remembered: in Python 3.11 `get_running_loop` is a getpid()
        system call, per request a few % of the frontend's CPU. Asked again once the
        remembered loop stops (tests run one batcher on successive loops)."""
        loop = self._loop
        if loop is None or not loop.is_running():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    # -- called by the dataplane -------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Live requests queued. One answered while queued (its client gone, a 504) stays in
        the queue until a lane skips it, but takes no place there (`submit`); counting it
        overstated describe's pendingRequests and the queue gauge while workers were busy."""
        if not self._queue:
            return 0
        queued = list(self._queue)  # a copy, should a scrape run off the loop
        return sum(not pending.future.done() for pending in queued)

    @property
    def depth_at_most(self) -> int:
        """`depth` without the walk: answered requests not yet skipped are counted too."""
        return len(self._queue)

    @property
    def busy_workers(self) -> int:
        return self._busy

    @property
    def pending(self) -> int:
        """Requests not started yet (describe's pendingRequests, as TorchServe's job queue):
        queued, or in a batch waiting in a worker behind the one it runs."""
        hands = list(self._hands.values())  # a copy, should a scrape run off the loop
        waiting = sum(len(batch) for hand in hands for batch in itertools.islice(hand, 1, None))
        return self.depth + waiting

    @property
    def in_flight(self) -> int:
        """Requests queued or in a running batch (abandoned ones count until skipped)."""
        return len(self._queue) + self._running_requests

    def submit(
        self, request: InferenceRequest, *, alone: bool = False
    ) -> asyncio.Future[Prediction]:
        """Queue a request; its future resolves with its prediction or a TorchgateError.

        `alone`: it runs in a batch of its own, in its turn (TorchServe's describe request,
        which it sends a worker as a job of its own, never with predictions)."""
        if self._closed:
            raise Overloaded(
                f"Model {self.model} version {self.version} is shutting down", retry_after=1
            )
        if len(self._queue) >= self.queue_size and not self._room_made():
            self._observer.request_rejected(self.model, self.version, REJECT_QUEUE_FULL)
            raise Overloaded(
                f"Model {self.model} version {self.version} has no capacity to accept more "
                f"requests: job queue is full ({self.queue_size})",
                retry_after=1,
            )
        now = self._clock()
        future: asyncio.Future[Prediction] = self._event_loop().create_future()
        self._queue.append(Pending(request, future, now, now + self.response_timeout_s, alone))
        self._idle.clear()
        self._arrived.set()
        if self._fillers:
            self._wake_fillers()
        if len(self._queue) >= self.max_batch_size:
            self._full.set()
        self._observer.queue_changed(self.model, self.version, len(self._queue))
        return future

    def _room_made(self) -> bool:
        """Drop the requests answered while queued from a full queue; True if that made room.

        No lane takes them off while every worker is busy, and live clients were refused
        503 for a queue full of them. Only a full queue pays for the scan, and at most once
        a turn of the event loop: under overload a turn refuses hundreds of requests, each
        of which would scan a queue full of live ones. (A request answered later in the same
        turn holds its place until the next.)"""
        loop = self._event_loop()
        if self._dropped_in is loop:
            return False
        self._dropped_in = loop
        loop.call_soon(self._end_drop_turn)
        self._drop_answered()
        return len(self._queue) < self.queue_size

    def _drop_answered(self) -> None:
        live = [pending for pending in self._queue if not pending.future.done()]
        if len(live) < len(self._queue):
            self._queue.clear()  # in place: the same deque, however many look at it
            self._queue.extend(live)

    def _end_drop_turn(self) -> None:
        self._dropped_in = None

    def set_limits(
        self,
        *,
        max_batch_size: int,
        max_batch_delay_s: float,
        queue_size: int,
        response_timeout_s: float,
    ) -> None:
        """Apply new settings; batches already open keep the ones they started with."""
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.queue_size = queue_size
        self.response_timeout_s = response_timeout_s

    async def drain(self) -> None:
        """Refuse new requests and wait until everything queued or running has finished.

        A queued request answered meanwhile (504 at its deadline, its client gone) has
        finished too, though it stays queued until a lane skips it: with no live worker no
        lane ever does, so each queued request's answer is watched from here on.
        """
        self._closed = True
        self._watch(self._queued())
        self._note_if_drained()
        await self._idle.wait()

    def _queued(self) -> Iterable[Pending]:
        return self._queue

    def _watch(self, pendings: Iterable[Pending]) -> None:
        """While draining: an answer to any of `pendings` may leave nothing to wait for."""
        if self._closed:
            for pending in pendings:
                pending.future.add_done_callback(self._note_if_drained)

    def _note_if_drained(self, _answered: object = None) -> None:
        if self._running_requests == 0 and all(p.future.done() for p in self._queued()):
            self._idle.set()

    def fail_queued(self, error: TorchgateError) -> None:
        """Fail every queued request now (the model version is going away without workers)."""
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(error)
        self._note_if_idle()

    # -- run by the registry, one task per worker ----------------------------------------------

    async def serve(self, worker: Worker) -> None:
        """Feed `worker` batches until cancelled, or until it is no longer `alive`.

        A worker with `pipeline_depth` n > 1 (a process, see `Worker`) is fed by n lanes, each
        taking a batch and running it in turn: the worker gets its next batch while it still
        runs the current one, so it never sits idle waiting for the frontend. A lane takes its
        next batch in the same task step in which its last one was answered — one event-loop
        turn, however many connections that turn also serves. The next batch still forms under
        the usual rule, and since a batch of this worker is running, it waits to fill.

        A batch taken for a worker that died meanwhile goes back to the front of the queue: it
        never reached the worker, so another one (or the replacement) runs it.
        """
        depth = max(1, getattr(worker, "pipeline_depth", 1))
        running: set[asyncio.Task[None]] = set()  # lanes with a batch in hand
        in_hand = self._hands[id(worker)] = deque()  # their batches, in the worker's order
        stopping = asyncio.Event()  # set: lanes take no further batch
        lanes = [
            asyncio.ensure_future(
                self._lane(worker, running, in_hand, stopping, overload=index >= depth)
            )
            for index in range(depth * OVERLOAD_LANES if depth > 1 else 1)
        ]
        try:
            # wait, not gather: cancelling this task must not cancel the lanes' batches too.
            await asyncio.wait(lanes)
            for lane in lanes:
                lane.result()  # a bug in a lane: raise it here, not swallow it
        except asyncio.CancelledError:
            # Stopping this worker: idle lanes stop now; the batches in hand finish, so
            # accepted requests are answered, but a stuck handler must not hold the stop (and
            # the registry, and shutdown) forever: at most a response timeout each (`_finish`).
            # Shielded: a second cancellation (the supervisor's stop after ours) must not cut
            # that short.
            stopping.set()
            for lane in lanes:
                if lane not in running:
                    lane.cancel()
            busy = [lane for lane in lanes if lane in running]
            if busy:
                await asyncio.shield(asyncio.ensure_future(self._finish(busy)))
            raise
        finally:
            self._hands.pop(id(worker), None)

    async def _finish(self, lanes: list[asyncio.Task[None]]) -> None:
        # A worker runs the batches in hand one after another, each with a response timeout
        # of its own from when it takes it up (and a second for a kill): one timeout for all
        # failed a pipelined batch that had done nothing wrong.
        await asyncio.wait(lanes, timeout=self.response_timeout_s * len(lanes) + 1.0)
        for lane in lanes:
            lane.cancel()  # still running: its batch fails with the stop's message

    async def _lane(
        self,
        worker: Worker,
        running: set[asyncio.Task[None]],
        in_hand: deque[list[Pending]],
        stopping: asyncio.Event,
        *,
        overload: bool = False,
    ) -> None:
        """Take a batch, run it, repeat. An `overload` lane takes one only while a full batch
        is queued: under overload every event-loop turn parses a request from each of many
        connections (hundreds of 503s), and the few lanes of normal load, each refilled once
        a turn, would leave the worker idle most of the time; work that would only wait in
        the queue waits in the worker's socket instead."""
        lane = asyncio.current_task()
        assert lane is not None
        while worker_alive(worker) and not stopping.is_set():
            if overload:
                # Models that do not batch keep the plain job-queue semantics (jobQueueSize
                # requests wait here, one more in the worker): an overload lane would hand
                # their every queued request on.
                while self.max_batch_size < 2 or len(self._queue) < self.max_batch_size:
                    self._full.clear()
                    await self._full.wait()
            batch = await self._next_batch()
            if not worker_alive(worker):
                self._give_back(batch)
                return
            self._busy += not running
            running.add(lane)
            self._running += 1
            self._running_requests += len(batch)
            in_hand.append(batch)
            try:
                await self._run(worker, batch)
            finally:
                del in_hand[next(i for i, held in enumerate(in_hand) if held is batch)]
                running.discard(lane)
                self._busy -= not running
                self._running -= 1
                self._running_requests -= len(batch)
                if self._running == 0:
                    self._wake_fillers()  # a batch held for company goes now (see `_fill`)
                self._note_if_idle()

    async def _next_batch(self) -> list[Pending]:
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            batch: list[Pending] = []
            closed = self._take_queued(batch)
            if batch:
                break
            self._note_if_idle()  # everything queued was abandoned or expired
        saturated = self._running > 0  # another worker is running a batch right now
        if (
            saturated
            and not closed
            and len(batch) < self.max_batch_size
            and self.max_batch_delay_s > 0
        ):
            try:
                await self._fill(batch)
            except asyncio.CancelledError:
                # The worker is stopping: hand the open batch back to the others, in order.
                self._give_back(batch)
                raise
        self._observer.queue_changed(self.model, self.version, len(self._queue))
        return batch

    async def _fill(self, batch: list[Pending]) -> None:
        close_at = batch[0].enqueued_at + self.max_batch_delay_s
        while len(batch) < self.max_batch_size:
            remaining = close_at - self._clock()
            if remaining <= 0 or self._running == 0:
                return  # waited long enough, or compute went idle (`_wake_fillers`)
            # A future of its own, not `_arrived`: a lane that finds the queue empty clears
            # that event, which could swallow the wake-up before this wait began.
            waiter = self._event_loop().create_future()
            self._fillers.append(waiter)
            timer = waiter.get_loop().call_later(remaining, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._fillers.remove(waiter)
            if self._take_queued(batch):
                return  # a request that runs alone is next: nothing queued may join now

    def _wake_fillers(self) -> None:
        for waiter in self._fillers:
            _wake(waiter)

    def _take_queued(self, batch: list[Pending]) -> bool:
        """Move queued requests into `batch`, skipping abandoned and expired ones. True when
        the batch is closed by a request that runs alone: it holds one, or one is next."""
        now = self._clock()
        while self._queue and len(batch) < self.max_batch_size:
            pending = self._queue.popleft()
            if pending.future.done():
                continue  # the client went away or the dataplane already answered 504
            if self._expired(pending, now):
                continue
            # A slot read of an object in hand: all a prediction pays for the rare request
            # that runs alone (`submit`'s `alone`), which alone pays for the rest.
            if pending.alone:
                if batch:
                    self._queue.appendleft(pending)  # it opens the next batch
                else:
                    batch.append(pending)
                return True
            batch.append(pending)
        return False

    def _expired(self, pending: Pending, now: float) -> bool:
        """Answer `pending` 504 if its deadline passed while it was queued; True if so."""
        if now <= pending.deadline:
            return False
        self._observer.request_rejected(self.model, self.version, REJECT_DEADLINE)
        pending.future.set_exception(
            DeadlineExceeded(
                f"Request for model {self.model} version {self.version} timed out in "
                f"the queue after {self.response_timeout_s:g} s"
            )
        )
        return True

    async def _run(self, worker: Worker, batch: list[Pending]) -> None:
        started = self._clock()
        try:
            predictions = await predict_in_time(
                worker, [pending.request for pending in batch], self.response_timeout_s
            )
        except asyncio.CancelledError:
            self._fail(
                batch,
                InferenceFailed(
                    f"Model {self.model} version {self.version}: the handler did not "
                    f"return within {self.response_timeout_s:g} s; its worker was stopped"
                ),
            )
            raise
        except NotRun:
            # Never reached the handler: back to the queue, for another worker or this
            # one's replacement.
            self._queue_afresh(batch)
            return
        except TorchgateError as exc:
            self._fail(batch, exc)
            return
        except Exception as exc:
            self._fail(batch, InferenceFailed(f"Worker died: {type(exc).__name__}: {exc}"))
            return
        self._deliver(batch, predictions, started)

    def _queue_afresh(self, batch: list[Pending]) -> None:
        """Give back a batch a worker held but never started (`_renew_deadlines`)."""
        self._renew_deadlines(batch)
        self._give_back(batch)

    def _renew_deadlines(self, pendings: Iterable[Pending]) -> None:
        """Requests a worker held but never started get a new queue deadline a responseTimeout
        from now. Their old one ran on while the worker held them: a worker killed for running
        out the timeout of the batch before gives them back past it, and they were answered 504
        "timed out in the queue" instead of being run. (A client's own v2 `timeout` is not this
        deadline: the dataplane keeps it.)"""
        deadline = self._clock() + self.response_timeout_s
        for pending in pendings:
            pending.deadline = max(pending.deadline, deadline)
            pending.request.requeued = True  # the dataplane's timer too (`_deadline_passed`)

    def _give_back(self, batch: list[Pending]) -> None:
        """Queue a batch that never ran again where its requests arrived. Not simply at the
        front: when a worker dies, the batches pipelined to it come back one by one, oldest
        first, and each would otherwise jump ahead of the one before."""
        if self._queue and self._queue[0].enqueued_at < batch[-1].enqueued_at:
            merged = sorted([*batch, *self._queue], key=_arrival)  # two sorted runs: O(n)
            self._queue.clear()
            self._queue.extend(merged)
        else:
            self._queue.extendleft(reversed(batch))
        self._watch(batch)
        self._arrived.set()
        if len(self._queue) >= self.max_batch_size:
            self._full.set()

    def _deliver(self, batch: list[Pending], predictions: list[Prediction], started: float) -> None:
        """Resolve each request of a batch that ran with its own prediction, in order."""
        finished = self._clock()
        self._observer.batch_finished(self.model, self.version, len(batch), finished - started)
        if len(predictions) != len(batch):
            self._fail(
                batch,
                InferenceFailed(
                    f"Handler returned {len(predictions)} responses for a batch of "
                    f"{len(batch)} requests"
                ),
            )
            return
        for pending, prediction in zip(batch, predictions, strict=True):
            if not pending.future.done():
                prediction.queue_seconds = started - pending.enqueued_at
                prediction.batch_size = len(batch)
                pending.future.set_result(prediction)

    @staticmethod
    def _fail(batch: list[Pending], error: TorchgateError) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(error)

    def _note_if_idle(self) -> None:
        if not self._queue and self._running == 0:
            self._idle.set()
        elif self._closed:
            self._note_if_drained()


async def predict_in_time(
    worker: Worker, requests: list[InferenceRequest], timeout_s: float
) -> list[Prediction]:
    """`worker.predict`, failed with 504 past `timeout_s` unless the worker keeps that time
    itself (`Worker.keeps_time`; a process worker also kills and replaces its process).
    Meanwhile the requests are `dispatched`: the worker's clock, not their deadline in the
    queue, governs them (a batch given back, or a request sent again, queues afresh)."""
    for request in requests:
        request.dispatched = True
    try:
        if getattr(worker, "keeps_time", False):
            return await worker.predict(requests)
        return await asyncio.wait_for(worker.predict(requests), timeout_s)
    except TimeoutError:
        raise DeadlineExceeded(
            f"The worker did not answer within responseTimeout {timeout_s:g} s"
        ) from None
    finally:
        for request in requests:
            request.dispatched = False


def worker_alive(worker: Worker) -> bool:
    """A worker that can die (a process) says whether it lives; others always do."""
    return getattr(worker, "alive", True)


def _arrival(pending: Pending) -> float:
    return pending.enqueued_at


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
