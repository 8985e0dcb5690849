"""Frames between the frontend and a worker process: pickle protocol 5, large buffers out of band.

A frame is one message, written with one `writev`/`sendmsg` and no joining copy::

    !II      meta_len, buffer_count
    !Q * n   the length of each out-of-band buffer
    meta     pickle protocol 5 of the message (tuples, dicts, str, bytes, numbers, numpy)
    buffers  each out-of-band buffer, back to back

numpy arrays travel out of band by themselves (protocol 5's `PickleBuffer`); a bytes value of
`BLOB_BYTES` or more (an image body, say) does too once wrapped in `Blob`. The reader receives a
frame into one buffer of the frame's size and unpickles arrays as views of it, so a tensor is
copied by the kernel only.

What the frontend unpickles comes from handler code, so `loads_restricted` accepts only
builtin values and numpy arrays: a handler's torch tensor or custom object cannot make the
frontend import torch (or anything) — the worker converts or refuses those (see `main.py`).
Nothing here imports torch.
"""

from __future__ import annotations

import io
import os
import pickle
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any

HEADER = struct.Struct("!II")
LENGTH = struct.Struct("!Q")
BLOB_BYTES = 64 * 1024
# One frame at most; a bigger message is refused before anything is sent.
MAX_FRAME_BYTES = 2**31

_SAFE_GLOBALS = frozenset(
    {
        ("builtins", "bytes"),
        ("builtins", "bytearray"),
        ("builtins", "complex"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("collections", "OrderedDict"),
    }
)
_SAFE_NUMPY = frozenset({"_reconstruct", "_frombuffer", "scalar", "dtype", "ndarray"})
_NUMPY_MODULES = frozenset(
    {
        "numpy",
        "numpy.core.multiarray",
        "numpy._core.multiarray",
        "numpy.core.numeric",
        "numpy._core.numeric",
    }
)


class WireError(Exception):
    """A frame that cannot be built or read (too large, or an object not allowed across)."""


class Blob:
    """A bytes value sent out of band; it arrives as plain `bytes` (one copy, on arrival)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return bytes, (pickle.PickleBuffer(self.data),)


class InputBlob(Blob):
    """A request's input sent out of band: it arrives as the `bytearray` a TorchServe handler
    gets (`api.workers.items`), in the same one copy."""

    __slots__ = ()

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return bytearray, (pickle.PickleBuffer(self.data),)


def blobs(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with large bytes wrapped in `InputBlob` (a request's inputs: the body, form
    files)."""
    if not any(type(v) is bytes and len(v) >= BLOB_BYTES for v in values.values()):
        return values
    return {
        k: InputBlob(v) if type(v) is bytes and len(v) >= BLOB_BYTES else v
        for k, v in values.items()
    }


def encode(message: Any) -> list[Any]:
    """The parts of one frame, ready for `writelines` / `sendmsg`."""
    buffers: list[pickle.PickleBuffer] = []
    meta = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    raws = [buffer.raw() for buffer in buffers]
    size = len(meta) + sum(raw.nbytes for raw in raws)
    if size > MAX_FRAME_BYTES:
        raise WireError(f"message of {size} bytes is over the {MAX_FRAME_BYTES}-byte frame limit")
    header = HEADER.pack(len(meta), len(raws))
    if raws:
        header += b"".join(LENGTH.pack(raw.nbytes) for raw in raws)
    return [header, meta, *raws]


def frame_layout(prefix: bytes | memoryview) -> tuple[int, int] | None:
    """(header length, total frame length) once `prefix` holds the whole header, else None."""
    if len(prefix) < HEADER.size:
        return None
    meta_len, count = HEADER.unpack_from(prefix)
    header_len = HEADER.size + LENGTH.size * count
    if len(prefix) < header_len:
        return None
    lengths = struct.unpack_from(f"!{count}Q", prefix, HEADER.size)
    total = header_len + meta_len + sum(lengths)
    if total > MAX_FRAME_BYTES:
        raise WireError(f"frame of {total} bytes is over the {MAX_FRAME_BYTES}-byte limit")
    return header_len, total


def split(frame: memoryview) -> tuple[memoryview, list[memoryview]]:
    """A whole frame's pickle and its out-of-band buffers, as views of `frame`."""
    meta_len, count = HEADER.unpack_from(frame)
    lengths = struct.unpack_from(f"!{count}Q", frame, HEADER.size)
    at = HEADER.size + LENGTH.size * count
    meta = frame[at : at + meta_len]
    at += meta_len
    buffers = []
    for length in lengths:
        buffers.append(frame[at : at + length])
        at += length
    return meta, buffers


def loads(frame: memoryview) -> Any:
    """Unpickle a frame from the frontend (trusted: the worker's own parent).

    numpy arrays come back as writable views of `frame`, whatever they were at the sender.
    """
    meta, buffers = split(frame)
    return _FrameUnpickler(io.BytesIO(meta), frame, buffers=buffers).load()


class _FrameUnpickler(pickle.Unpickler):
    """Pickle marks a buffer that was read-only at the sender (a v2 binary tensor is a view of
    the request body) read-only here too. The frame is this process's own memory, so such an
    array is rebuilt as a writable view of the same bytes: handlers get writable arrays
    (torch.from_numpy warns on read-only ones) without a copy."""

    def __init__(self, file: io.BytesIO, frame: memoryview, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._frame = frame

    def find_class(self, module: str, name: str) -> Any:
        if name == "_frombuffer" and module in _NUMPY_MODULES:
            return self._frombuffer
        return super().find_class(module, name)

    def _frombuffer(self, buffer: Any, dtype: Any, shape: Any, order: Any) -> Any:
        import numpy as np

        array = np.frombuffer(buffer, dtype=dtype)
        if not array.flags.writeable and array.nbytes:
            frame = np.frombuffer(self._frame, np.uint8)
            offset = array.ctypes.data - frame.ctypes.data
            if 0 <= offset <= frame.nbytes - array.nbytes and self._frame.readonly is False:
                array = np.frombuffer(self._frame, dtype, count=array.size, offset=offset)
        return array.reshape(shape, order=order)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS or (module in _NUMPY_MODULES and name in _SAFE_NUMPY):
            return super().find_class(module, name)
        raise WireError(f"{module}.{name} may not cross from a worker to the frontend")


def loads_restricted(frame: memoryview) -> Any:
    """Unpickle a frame from a worker: builtin values and numpy arrays only."""
    meta, buffers = split(frame)
    try:
        return _RestrictedUnpickler(io.BytesIO(meta), buffers=buffers).load()
    except WireError:
        raise
    except Exception as exc:
        raise WireError(f"unreadable frame from worker: {type(exc).__name__}: {exc}") from exc


# -- blocking I/O, for the worker process ------------------------------------------------------


def send(sock: socket.socket, parts: Sequence[Any]) -> None:
    """Write one frame's parts with `sendmsg`, resuming after partial writes."""
    views = [memoryview(part).cast("B") for part in parts]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= views[0].nbytes:
            sent -= views[0].nbytes
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


class FrameReader:
    """Whole frames from a blocking socket, with one `recv` for a small frame.

    Small frames arrive in a reusable buffer and are copied out (a few hundred bytes, cheaper
    than a second system call); a frame larger than the buffer gets a buffer of its own size
    that the socket fills directly. Never reads past a frame it returns into the next one's
    buffer of its own: leftover bytes stay for the next `read`.

    With `spin` (seconds) the reader polls the socket that long before it sleeps in `recv`,
    yielding the CPU between polls (see `api.workers.spin`): the worker's side of
    `torchgate.spin_us`.
    """

    def __init__(
        self, sock: socket.socket, buffer_size: int = 256 * 1024, *, spin: float = 0.0
    ) -> None:
        self._sock = sock
        self._spin = spin
        self._buffer = bytearray(buffer_size)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0

    def read(self) -> memoryview | None:
        """The next frame, writable; None at a clean end of stream."""
        while True:
            pending = self._view[self._start : self._end]
            layout = frame_layout(pending)
            if layout is not None:
                _, total = layout
                if len(pending) >= total:
                    frame = memoryview(bytearray(pending[:total]))
                    self._start += total
                    return frame
                if total > len(self._buffer):
                    return self._read_large(pending, total)
            if self._start == self._end:
                self._start = self._end = 0
            elif self._end == len(self._buffer):
                size = self._end - self._start
                self._buffer[:size] = self._buffer[self._start : self._end]
                self._start, self._end = 0, size
            received = self._receive(self._view[self._end :])
            if received == 0:
                if self._start == self._end:
                    return None
                raise WireError("stream ended inside a frame")
            self._end += received

    def _receive(self, into: memoryview) -> int:
        if self._spin:
            deadline = time.perf_counter() + self._spin
            while True:
                try:
                    return self._sock.recv_into(into, 0, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    if time.perf_counter() >= deadline:
                        break
                    os.sched_yield()
        return self._sock.recv_into(into)

    def _read_large(self, pending: memoryview, total: int) -> memoryview:
        frame = memoryview(bytearray(total))
        have = len(pending)
        frame[:have] = pending
        self._start = self._end = 0
        while have < total:
            received = self._sock.recv_into(frame[have:])
            if received == 0:
                raise WireError("stream ended inside a frame")
            have += received
        return frame
