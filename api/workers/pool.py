"""The frontend's side of the worker processes: the zygote, and one channel per worker.

`WorkerPool` starts the zygote (`zygote.py`) as soon as it is asked to, so torch is imported
while the frontend binds its ports, and spawns workers through it. `WorkerProcess` is one
worker as the event loop sees it: a socket speaking `wire.py` frames, read by a buffered
protocol (no task per read, no copy of a large frame's bulk), its stdout and stderr read line
by line into this process's log under the worker's name (`output.py`, as the zygote's own),
and its exit status from the zygote. Its output pipes are read until they end, as TorchServe
reads them: a daemon the handler started keeps them after the worker is gone, and prints on
into the log.

Nothing here imports torch or handler code, and nothing blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import itertools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api.workers import descendants, wire
from api.workers.output import LogBudget, LogLines, ZygoteOutput
from api.workers.spin import DEFAULT_SPIN_US, LoopSpinner
from api.workers.zygote import DEFAULT_PRELOAD

log = logging.getLogger(__name__)

# After a worker's socket closes, how long its exit status may take: the zygote reports it once
# the rest of the worker's process group is gone too, which may take its grace periods.
EXIT_REPORT_WAIT_S = descendants.GROUP_GRACE_S + descendants.GROUP_KILLED_WAIT_S + 2.0
# After a kill while its socket is still open, how long the process may take to die before it
# counts as gone: a large CUDA process can take seconds to tear down, and a replacement started
# beside it would meet its memory still held; one stuck in the kernel never dies.
KILLED_EXIT_WAIT_S = 30.0
# Once the zygote is gone, how long the output pipes still held (by daemons its workers
# started, handed to init) are read on before they are closed.
LOG_DRAIN_S = 2.0
# Output pipes of exited workers read on for the daemons that hold them (two per worker). A
# handler that starts a daemon at every start left two more descriptors in the frontend at
# each restart, for as long as the server ran; past this many the oldest is closed.
MAX_DRAINING = 256
_RECEIVE_BUFFER = 256 * 1024

ChunkCallback = Callable[[list[Any]], None]


class WorkerExit(Exception):
    """The worker process is gone; the message says how (exit code or signal)."""


class NotStarted(WorkerExit):
    """The worker process is gone, but it had not started on this call yet."""


class WorkerPool:
    """Spawns worker processes; one zygote per pool, restarted if it dies."""

    def __init__(
        self,
        *,
        cleanup: Path | None = None,
        preload: Sequence[str] = DEFAULT_PRELOAD,
        spin_us: int = DEFAULT_SPIN_US,
        python: str = sys.executable,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        self._cleanup = cleanup
        # Variables every worker gets (TorchServe's TS_* ones: `Config.worker_environment`).
        self._environment = dict(environment or {})
        self._preload = preload
        self._spin_us = spin_us
        self._python = python
        self._zygote: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self._ids = itertools.count()
        self._spawning: dict[int, asyncio.Future[int]] = {}
        self._workers: dict[int, WorkerProcess] = {}
        # Workers reported spawned whose `spawn` has not resumed yet, and the exit statuses
        # of those among them reported exited too: both reports can come in one turn of the
        # loop (a worker that dies at once), before `spawn` registers the process.
        self._resuming: set[int] = set()
        self._exited_early: dict[int, int | None] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.spinner: LoopSpinner | None = None  # the event loop's polling (api.workers.spin)
        # Output pipes of exited workers, read until they end: a daemon the handler started
        # holds them (until the zygote ends it, at the latest).
        self._draining: dict[LogLines, None] = {}  # oldest first
        self._zygote_output: ZygoteOutput | None = None

    @property
    def zygote_pid(self) -> int | None:
        return self._zygote.pid if self._zygote is not None else None

    @property
    def cleanup(self) -> Path | None:
        """The folder the zygote removes when the frontend is gone (the extracted archives)."""
        return self._cleanup

    def start(self) -> None:
        """Start the zygote now if `launch` did not (idempotent), and read its control socket
        on the running loop; spawning would start it anyway.

        The zygote outlives an event loop: a pool used from a new loop (a test suite's next
        `asyncio.run`) reads its control socket there, and forgets what the old loop awaited.
        """
        self.launch()
        self._attach()

    def launch(self) -> None:
        """Start the zygote process (idempotent); no event loop needed, so a server can start
        it before it imports its own servers (see `api.cli`)."""
        if self._control is not None:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        command = [self._python, "-m", "api.workers.zygote", "--control-fd", str(theirs.fileno())]
        command += ["--preload", ",".join(self._preload), "--spin-us", str(self._spin_us)]
        if self._cleanup is not None:
            command += ["--cleanup", str(self._cleanup)]
        # Its own session: a terminal's Ctrl-C or a signal to the frontend's process group does
        # not reach the workers; the frontend drains and then stops them itself.
        env = {**os.environ, **self._environment}
        root = str(Path(__file__).resolve().parents[2])  # where `api` is importable from
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        self._zygote = subprocess.Popen(
            command,
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=env,
        )
        theirs.close()
        ours.setblocking(False)
        self._control = ours
        assert self._zygote.stdout is not None and self._zygote.stderr is not None
        self._zygote_output = ZygoteOutput(self._zygote.stdout, self._zygote.stderr)

    def _attach(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        assert self._control is not None
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._control.fileno())
        if self._zygote_output is not None:
            self._zygote_output.attach(loop)
        self._loop = loop
        self.spinner = LoopSpinner(loop, self._spin_us / 1e6)
        for lines in [lines for lines in self._draining if lines.loop is not loop]:
            lines.close()  # read by an earlier loop, which reads no more
        self._spawning.clear()
        self._workers.clear()
        loop.add_reader(self._control.fileno(), self._on_control)

    async def spawn(
        self, spec: Any, *, label: str, worker_name: str | None = None
    ) -> WorkerProcess:
        """Fork a worker running `api.workers.main.run(spec, ...)`; `label` prefixes its log.
        `worker_name`: TorchServe's name for it (`W-9000-digits_1.0`), which its output lines
        carry into TorchServe's log files (`api.observability.log_files`)."""
        self.start()
        assert self._control is not None
        loop = asyncio.get_running_loop()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_read, out_write = os.pipe()  # the worker's stdout
        err_read, err_write = os.pipe()  # and its stderr
        request_id = next(self._ids)
        spawned: asyncio.Future[int] = loop.create_future()
        self._spawning[request_id] = spawned
        try:
            message = pickle.dumps(("spawn", request_id, spec))
            fds = [child.fileno(), out_write, err_write]
            while True:
                try:
                    socket.send_fds(self._control, [message], fds)
                    break
                except BlockingIOError:  # the zygote is still importing torch
                    await asyncio.sleep(0.01)
        except BaseException:
            self._spawning.pop(request_id, None)
            parent.close()
            os.close(out_read)
            os.close(err_read)
            raise
        finally:
            child.close()
            os.close(out_write)
            os.close(err_write)
        try:
            pid = await spawned
        except BaseException:
            parent.close()
            os.close(out_read)
            os.close(err_read)
            if spawned.done() and not spawned.cancelled():
                self._resuming.discard(spawned.result())
                self._exited_early.pop(spawned.result(), None)
            raise
        self._resuming.discard(pid)
        process = WorkerProcess(pid, label, self, worker_name=worker_name)
        self._workers[pid] = process
        try:
            await process.connect(parent, out_read, err_read)
        except BaseException:
            # Cancelled (its slot scaled away mid-start, a DELETE, a gRPC deadline) or failed:
            # nobody will drive this worker, which would run until the pool closes.
            process.kill()
            raise
        if pid in self._exited_early:
            process.exit_reported(self._exited_early.pop(pid))  # which forgets it too
        return process

    def kill(self, pid: int) -> None:
        if self._control is not None:
            with contextlib.suppress(OSError):
                self._control.send(pickle.dumps(("kill", pid)))

    async def close(self) -> None:
        """End the zygote, and with it every worker still running; waits for it to exit."""
        control, zygote = self._control, self._zygote
        if control is None or zygote is None:
            return
        self._detach()
        control.close()
        self._control = self._zygote = None
        try:
            await asyncio.wait_for(asyncio.to_thread(zygote.wait), 10)
        except TimeoutError:
            zygote.kill()
            self._kill_worker_groups()
        if self._zygote_output is not None:
            self._zygote_output.finish()  # it has exited: read to the end
            self._zygote_output = None
        for process in list(self._workers.values()):
            process.exit_reported(-signal.SIGKILL)
        # The zygote ended the daemons that held output pipes: their ends are due now. One
        # that went to init (the zygote was killed) holds its pipe for ever.
        loop, deadline = asyncio.get_running_loop(), time.monotonic() + LOG_DRAIN_S
        while any(lines.loop is loop for lines in self._draining) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._close_draining()

    def _detach(self) -> None:
        # The zygote's output stays watched: what it writes while it exits is logged, and
        # `ZygoteOutput.finish` stops watching it once it has.
        if self._loop is not None and not self._loop.is_closed() and self._control is not None:
            self._loop.remove_reader(self._control.fileno())
        self._loop = None

    def _on_control(self) -> None:
        assert self._control is not None
        while True:
            try:
                data = self._control.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._zygote_gone()
                return
            self._on_message(pickle.loads(data))

    def _on_message(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "spawned":
            future = self._spawning.pop(message[1], None)
            if future is not None and not future.done():
                future.set_result(message[2])
                self._resuming.add(message[2])
            else:
                # Its caller stopped waiting (the slot was stopped mid-start): nobody will
                # ever drive this worker, which would otherwise run `initialize` to its end.
                self.kill(message[2])
        elif kind == "exited":
            process = self._workers.pop(message[1], None)
            if process is not None:
                process.exit_reported(message[2])
            elif message[1] in self._resuming:
                self._exited_early[message[1]] = message[2]
        elif kind == "hello":
            log.debug("worker zygote %d ready", message[1])

    def _zygote_gone(self) -> None:
        """The zygote died (its workers die with it): fail what waits, start afresh next time."""
        control, zygote = self._control, self._zygote
        if control is not None:
            self._detach()
            control.close()
        self._control = self._zygote = None
        code = zygote.poll() if zygote is not None else None
        log.error("the worker zygote exited (%s); workers will be restarted", describe_exit(code))
        output, self._zygote_output = self._zygote_output, None
        if output is not None:  # its last lines (a traceback) come as it exits
            asyncio.get_running_loop().call_later(LOG_DRAIN_S, output.finish)
        self._kill_worker_groups()
        for future in self._spawning.values():
            if not future.done():
                future.set_exception(
                    WorkerExit(f"the worker zygote exited ({describe_exit(code)})")
                )
        self._spawning.clear()
        for process in list(self._workers.values()):
            process.exit_reported(-signal.SIGKILL)
        self._workers.clear()
        # Daemons the workers started went to init and may hold their output pipes for ever:
        # what they print soon is still logged.
        asyncio.get_running_loop().call_later(LOG_DRAIN_S, self._close_draining)

    def drain(self, lines: LogLines) -> None:
        """Read the output pipe of an exited worker until it ends (or the zygote is gone), but
        for no more than `MAX_DRAINING` pipes: the oldest beyond is closed, and what still
        holds it gets EPIPE (SIGPIPE, unless it ignores that) at its next line."""
        if lines.closed:
            return
        self._draining[lines] = None
        if len(self._draining) > MAX_DRAINING:
            oldest = next(iter(self._draining))
            log.warning(
                "more than %d output pipes of exited workers are held open by processes their "
                "handlers started (daemons in a session of their own); closing the oldest "
                "(%s): what they print from now on is lost",
                MAX_DRAINING,
                oldest.label,
            )
            oldest.close()

    def drained(self, lines: LogLines) -> None:
        self._draining.pop(lines, None)

    def _close_draining(self) -> None:
        for lines in list(self._draining):
            lines.close()

    def _kill_worker_groups(self) -> None:
        """The zygote died without its shutdown: its workers die with it, the helpers they
        left in their process groups do not. Safe although the zygote no longer holds the
        pids: a group's id is not reused while any process is left in it, and a worker that
        died moments ago leaves an empty group that no new process has had time to lead."""
        for pid in self._workers:
            descendants.kill_group(pid)

    def forget(self, pid: int) -> None:
        self._workers.pop(pid, None)


class WorkerProcess(asyncio.BufferedProtocol):
    """One worker process: `call` sends a message and waits for its answer, one at a time."""

    def __init__(
        self, pid: int, label: str, pool: WorkerPool, *, worker_name: str | None = None
    ) -> None:
        self.pid = pid
        self.label = label
        self.worker_name = worker_name
        self._pool = pool
        loop = asyncio.get_running_loop()
        self._loop = loop
        assert pool.spinner is not None, "spawned after the pool attached to this loop"
        self._spinner = pool.spinner
        self.exited: asyncio.Future[str] = loop.create_future()
        self._transport: asyncio.Transport | None = None
        self._logs: list[LogLines] = []  # the worker's stdout and stderr pipes
        # Calls whose answers are due, oldest first: the worker answers in order.
        self._waiters: deque[_Waiter] = deque()
        self._inbox: list[Any] = []  # a message that arrived before anyone waited
        self._lost = False
        self._killed = False  # kill() was called: the exit report may still be on its way
        self._kill_timer: asyncio.TimerHandle | None = None
        # Reading: small frames are parsed out of one reusable buffer; a frame larger than it
        # gets a buffer of its own size that the socket reads into directly.
        self._buffer = bytearray(_RECEIVE_BUFFER)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0
        self._frame: memoryview | None = None
        self._frame_filled = 0

    @property
    def alive(self) -> bool:
        return not (self._lost or self._killed or self.exited.done())

    async def connect(self, sock: socket.socket, log_fd: int, err_fd: int | None = None) -> None:
        """Talk over `sock`; log the worker's stdout (`log_fd`) and stderr (`err_fd`) pipes.

        Each descriptor is this call's to close until a transport owns it: cancelled or failed
        at any await (its slot scaled away or its model deleted while the worker starts), it
        closes every one not handed to the loop yet (the loop closes one whose connect it
        was given)."""
        fds = [(log_fd, False), *([] if err_fd is None else [(err_fd, True)])]
        unwrapped = [fd for fd, _ in fds]
        unowned: list[socket.socket | io.FileIO] = [sock]
        try:
            pipes: list[tuple[io.FileIO, bool]] = []
            for fd, stderr in fds:
                pipe = os.fdopen(fd, "rb", buffering=0)
                unwrapped.remove(fd)
                unowned.append(pipe)
                pipes.append((pipe, stderr))
            await self._loop.create_unix_connection(lambda: self, sock=sock)
            unowned.remove(sock)
            budget = LogBudget(self.label)  # one for both pipes
            for pipe, stderr in pipes:
                lines = LogLines(
                    self.label,
                    budget,
                    stderr=stderr,
                    on_closed=self._pool.drained,
                    worker_name=self.worker_name,
                )
                self._logs.append(lines)
                # The loop's from here, even if the connect fails: it closes the descriptor
                # then (uvloop by its number, so closing the object too might close another).
                unowned.remove(pipe)
                await self._loop.connect_read_pipe(functools.partial(_same, lines), pipe)
        except BaseException:
            for fd in unwrapped:
                os.close(fd)
            for closable in unowned:
                closable.close()
            raise

    # -- calls ------------------------------------------------------------------------------------

    async def receive(self, timeout: float) -> Any:
        """The next message from the worker (its start-up report); WorkerExit if it dies."""
        return await self._wait(timeout, None)

    async def call(
        self, message: Any, timeout: float, on_chunk: ChunkCallback | None = None
    ) -> Any:
        """Send `message`; its answer, TimeoutError (the worker is then killed) or WorkerExit.

        Calls may overlap: the worker reads the next message while the frontend waits for the
        answer to the one before (so it never idles between batches), and answers in order.
        `timeout` counts, as TorchServe's responseTimeout does, only the time the worker
        spends on this call: from when it takes it up (the call before it was answered), and
        afresh after each chunk it streams. A call waiting behind a slow one is not charged
        for it, so a healthy worker is never killed for the queue in its socket.
        A caller cancelled mid-call kills the worker: the answer it was waiting for would
        otherwise be taken for the next call's.
        """
        if not self.alive or self._transport is None:
            raise WorkerExit(self._exit_reason())
        self._transport.writelines(wire.encode(message))
        self._spinner.call_started()
        try:
            return await self._wait(timeout, on_chunk)
        finally:
            self._spinner.call_ended()

    async def _wait(self, timeout: float, on_chunk: ChunkCallback | None) -> Any:
        if self._inbox:
            return self._inbox.pop(0)
        if not self.alive:
            raise WorkerExit(self._exit_reason())
        waiter = _Waiter(self._loop.create_future(), on_chunk, timeout)
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            self._start_clock(waiter)  # the worker takes it up now
        try:
            return await waiter.future
        except (TimeoutError, asyncio.CancelledError):
            self.kill()
            raise
        finally:
            if waiter.timer is not None:
                waiter.timer.cancel()

    def _start_clock(self, waiter: _Waiter) -> None:
        """(Re)start the time the worker has for `waiter`'s call, the one it is running."""
        if waiter.timer is not None:
            waiter.timer.cancel()
        waiter.timer = self._loop.call_later(waiter.timeout, _time_out, waiter.future)

    def send(self, message: Any) -> None:
        """Send without waiting for an answer (the stop request)."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(wire.encode(message))

    def kill(self) -> None:
        """SIGKILL, through the zygote (which owns the pid, so it cannot hit a reused one).

        The worker counts as dead from here on: a batch taken for it before the zygote reports
        the exit goes back to the queue instead of failing against a process being killed.
        """
        first_kill = not self._killed
        self._killed = True
        if self.exited.done():
            return
        self._pool.kill(self.pid)
        if first_kill:
            self._give_up_on_exit_report_later()

    def _give_up_on_exit_report_later(self) -> None:
        """Count the worker gone if its exit is not reported in time after a kill. A process
        stuck in the kernel survives SIGKILL, and a kill message can be lost: the calls
        waiting behind a timed-out one would never be answered (nor given back), and the
        worker's slot never replaced."""
        # Its socket closed: the process is gone and only the report is due. Open: it may still
        # be dying (its socket closes then, and `connection_lost` shortens this wait).
        wait = EXIT_REPORT_WAIT_S if self._lost else KILLED_EXIT_WAIT_S
        self._give_up_after(wait)

    def _give_up_after(self, wait_s: float) -> None:
        if self._kill_timer is not None:
            self._kill_timer.cancel()  # an earlier timer of this worker: this one replaces it
        self._kill_timer = self._loop.call_later(wait_s, self.exit_reported, None)

    async def stop(self, grace_s: float) -> None:
        """Ask the worker to exit; kill it if it has not within `grace_s`."""
        self.send(("stop",))
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), grace_s)
        except TimeoutError:
            self.kill()  # which gives up on the exit report in time (see `kill`)
            await asyncio.shield(self.exited)

    # -- exit ------------------------------------------------------------------------------------

    def exit_reported(self, code: int | None) -> None:
        """The zygote reaped the worker (or is gone): the process no longer exists."""
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        self._pool.forget(self.pid)
        if not self.exited.done():
            self.exited.set_result(describe_exit(code))
        if self._transport is not None:
            self._transport.close()
        for lines in self._logs:
            # Read on until the pipe ends, when the last process holding it does: a daemon the
            # handler started (setsid) prints on, and would die of SIGPIPE were it closed here.
            self._pool.drain(lines)
        self._fail_waiter()

    def _exit_reason(self) -> str:
        if self.exited.done():
            return self.exited.result()
        return "its connection closed"

    def _fail_waiter(self, reason: str | None = None) -> None:
        """The worker is gone (for `reason`, by default how it exited): the oldest call due is
        the one it was running; the calls behind it were never started (it runs one at a
        time), so they can run elsewhere."""
        reason = reason or self._exit_reason()
        started = True
        while self._waiters:
            future = self._waiters.popleft().future
            if not future.done():
                error = WorkerExit if started else NotStarted
                future.set_exception(error(reason))
            started = False

    # -- asyncio.BufferedProtocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self.exited.done():
            self._fail_waiter()
            return
        # The exit status follows from the zygote, normally within milliseconds; the waiter
        # fails then, with it. A worker that closed its socket but lives on is killed.
        if self._killed:
            self._give_up_after(EXIT_REPORT_WAIT_S)  # it died of the kill: the report is due
        else:
            self._kill_timer = self._loop.call_later(EXIT_REPORT_WAIT_S, self._exit_overdue)

    def _exit_overdue(self) -> None:
        self.kill()  # which waits for the report as long again, then gives up on it

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._frame is not None:
            return self._frame[self._frame_filled :]
        if self._end == len(self._buffer):
            self._compact()
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._frame is not None:
            self._frame_filled += nbytes
            if self._frame_filled == len(self._frame):
                frame, self._frame = self._frame, None
                self._deliver(frame)
            return
        self._end += nbytes
        self._parse()

    def eof_received(self) -> bool | None:
        return None

    def _parse(self) -> None:
        while True:
            pending = self._view[self._start : self._end]
            try:
                layout = wire.frame_layout(pending)
            except wire.WireError as exc:
                self._protocol_error(exc)
                return
            if layout is None:
                if self._start == self._end:
                    self._start = self._end = 0
                return
            _, total = layout
            if total > len(self._buffer):
                # A large frame: its own buffer, filled by the socket from here on.
                frame = memoryview(bytearray(total))
                have = len(pending)
                frame[:have] = pending
                self._start = self._end = 0
                self._frame, self._frame_filled = frame, have
                return
            if len(pending) < total:
                if self._start + total > len(self._buffer):
                    self._compact()
                return
            # Copy out: arrays must not point into the reusable buffer.
            frame = memoryview(bytes(pending[:total]))
            self._start += total
            self._deliver(frame)

    def _compact(self) -> None:
        size = self._end - self._start
        self._buffer[:size] = self._buffer[self._start : self._end]
        self._start, self._end = 0, size

    def _deliver(self, frame: memoryview) -> None:
        try:
            message = wire.loads_restricted(frame)
        except wire.WireError as exc:
            self._protocol_error(exc)
            return
        if message[0] == "chunk":  # for the oldest call: the one the worker is running
            if self._waiters:
                running = self._waiters[0]
                if running.on_chunk is not None:
                    running.on_chunk(message[1])
                self._start_clock(running)  # TorchServe waits responseTimeout per reply
            return
        if not self._waiters:
            self._inbox.append(message)
            return
        future = self._waiters.popleft().future
        if not future.done():
            future.set_result(message)
        if self._waiters:
            self._start_clock(self._waiters[0])  # the worker goes on to the next call

    def _protocol_error(self, exc: Exception) -> None:
        log.error("%s: %s; killing the worker", self.label, exc)
        self._fail_waiter(f"it sent an unreadable answer ({exc})")
        self.kill()


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[Any]
    on_chunk: ChunkCallback | None
    timeout: float
    timer: asyncio.TimerHandle | None = None  # runs while the worker is on this call


def _same(value: Any) -> Any:
    return value


def _time_out(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def describe_exit(code: int | None) -> str:
    """`os.waitstatus_to_exitcode`'s code in words: "exit code 3", "signal 11 (SIGSEGV)"."""
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown"
        return f"killed by signal {-code} ({name})"
    return f"exit code {code}"
