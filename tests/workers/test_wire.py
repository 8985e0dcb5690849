"""Frames between the frontend and a worker: pickle 5 with out-of-band buffers, a restricted
reader for what workers send, and blocking socket I/O for the worker's side."""

from __future__ import annotations

import os
import pickle
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from api.workers import wire


def frame_of(message: Any) -> memoryview:
    """The bytes `encode` writes, received into one buffer as the reader does."""
    return memoryview(bytearray(b"".join(bytes(part) for part in wire.encode(message))))


def raw_frame(meta: bytes) -> memoryview:
    """A frame around a hand-written pickle, without out-of-band buffers."""
    return memoryview(bytearray(wire.HEADER.pack(len(meta), 0) + meta))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(10)
    b.settimeout(10)
    with a, b:
        yield a, b


def test_arrays_and_blobs_travel_out_of_band() -> None:
    payload = os.urandom(wire.BLOB_BYTES)
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    inputs = wire.blobs({"body": payload, "small": b"tiny", "text": "hi"})
    assert isinstance(inputs["body"], wire.Blob) and inputs["small"] == b"tiny"
    message = ("batch", [("req-0", {"x-tenant": "acme"}, inputs), ("req-1", {}, {"t": array})])

    _, meta, *buffers = wire.encode(message)
    # the pickle holds the structure only; the image and the array follow it as they are
    assert [memoryview(b).nbytes for b in buffers] == [len(payload), array.nbytes]
    assert len(meta) < 1024 and payload[:32] not in meta

    frame = frame_of(message)
    for loads in (wire.loads, wire.loads_restricted):
        kind, [(rid0, headers0, in0), (rid1, _, in1)] = loads(frame)
        assert (kind, rid0, headers0, rid1) == ("batch", "req-0", {"x-tenant": "acme"}, "req-1")
        # a request's large input arrives as the bytearray a TorchServe handler gets
        assert type(in0["body"]) is bytearray and in0["body"] == payload
        assert (in0["small"], in0["text"]) == (b"tiny", "hi")
        assert in1["t"].dtype == np.float32 and np.array_equal(in1["t"], array)
        # the array is a view of the received frame: copied by the kernel only
        assert np.shares_memory(in1["t"], np.frombuffer(frame, np.uint8))


def test_small_values_stay_in_the_pickle() -> None:
    values = {"body": b"x" * (wire.BLOB_BYTES - 1), "n": 1}
    assert wire.blobs(values) is values
    header, meta = wire.encode(("result", values))
    assert wire.HEADER.unpack(header) == (len(meta), 0)


def test_frame_layout_waits_for_the_whole_header() -> None:
    message = ("result", [np.zeros(3), wire.Blob(b"b" * wire.BLOB_BYTES)])
    frame = bytes(frame_of(message))
    header_len = wire.HEADER.size + 2 * wire.LENGTH.size
    for size in range(header_len):
        assert wire.frame_layout(frame[:size]) is None, size
    for size in (header_len, header_len + 1, len(frame)):
        assert wire.frame_layout(memoryview(frame)[:size]) == (header_len, len(frame))


def test_frames_over_the_limit_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    frame = bytes(frame_of(("result", np.zeros(1000, np.uint8))))
    monkeypatch.setattr(wire, "MAX_FRAME_BYTES", 500)
    with pytest.raises(wire.WireError, match="over the 500-byte frame limit"):
        wire.encode(("result", b"x" * 1000))
    # a reader refuses from the header alone, before it allocates the frame's buffer
    with pytest.raises(wire.WireError, match=f"frame of {len(frame)} bytes is over the 500-byte"):
        wire.frame_layout(frame[: wire.HEADER.size + wire.LENGTH.size])


class Custom:
    pass


@pytest.mark.parametrize(
    ("value", "refused"),
    [
        (os.system, "posix.system"),
        (torch.zeros(2), r"torch\._utils\._rebuild_tensor_v2"),
        (Custom(), r"tests\.workers\.test_wire\.Custom"),
    ],
)
def test_the_frontend_accepts_builtin_values_and_numpy_only(value: Any, refused: str) -> None:
    frame = frame_of(("result", [value]))
    with pytest.raises(wire.WireError, match=f"{refused} may not cross from a worker"):
        wire.loads_restricted(frame)


def test_a_refused_reference_imports_nothing() -> None:
    assert "this" not in sys.modules
    with pytest.raises(wire.WireError, match=r"this\.s may not cross"):
        wire.loads_restricted(raw_frame(b"\x80\x05cthis\ns\n."))  # GLOBAL this.s
    assert "this" not in sys.modules


def test_unreadable_frames_are_wire_errors() -> None:
    with pytest.raises(wire.WireError, match="unreadable frame from worker"):
        wire.loads_restricted(raw_frame(b"\x80\x05not a pickle"))
    allowed = pickle.dumps({"a": [1, 2.5, None, (b"x", "y")], "s": {1}}, protocol=5)
    assert wire.loads_restricted(raw_frame(allowed)) == {"a": [1, 2.5, None, (b"x", "y")], "s": {1}}


def test_small_frames_back_to_back_arrive_one_by_one(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Several small frames in one recv: each read returns one, in order, writable."""
    writer, reader = pair
    for n in range(3):
        wire.send(writer, wire.encode(("batch", n, np.full(4, n, np.float32))))
    writer.shutdown(socket.SHUT_WR)
    frames = wire.FrameReader(reader, buffer_size=64)  # small: frames straddle refills
    got = [wire.loads(frame) for frame in iter(frames.read, None)]
    assert [(kind, n) for kind, n, _ in got] == [("batch", 0), ("batch", 1), ("batch", 2)]
    assert all(array.flags.writeable and array[0] == n for _, n, array in got)


def test_send_and_receive_a_frame_larger_than_the_socket_buffers(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    writer, reader = pair
    array = np.random.default_rng(0).random((1024, 1024))  # 8 MiB
    body = os.urandom(3 * wire.BLOB_BYTES)
    buffered = writer.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) + reader.getsockopt(
        socket.SOL_SOCKET, socket.SO_RCVBUF
    )
    assert array.nbytes > 4 * buffered, "the writer must block and resume partway"
    failures: list[BaseException] = []

    def write() -> None:
        try:
            wire.send(writer, wire.encode(("result", array, wire.Blob(body))))
            wire.send(writer, wire.encode(("stop",)))  # right behind: never read into
            writer.shutdown(socket.SHUT_WR)
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    try:
        frames = wire.FrameReader(reader)
        first = frames.read()
        second = frames.read()
        end = frames.read()
    finally:
        thread.join(10)
    assert not failures
    assert first is not None and second is not None
    kind, got, got_body = wire.loads_restricted(first)
    assert kind == "result" and np.array_equal(got, array) and got_body == body
    assert wire.loads(second) == ("stop",)
    assert end is None, "a clean end of stream between frames"


def test_a_stream_that_ends_inside_a_frame(pair: tuple[socket.socket, socket.socket]) -> None:
    writer, reader = pair
    header, meta = wire.encode(("result", "x" * 100))
    writer.sendall(bytes(header) + bytes(meta)[:10])
    writer.shutdown(socket.SHUT_WR)
    with pytest.raises(wire.WireError, match="stream ended inside a frame"):
        wire.FrameReader(reader).read()
    writer2, reader2 = socket.socketpair()
    with writer2, reader2:
        writer2.sendall(bytes(header)[:3])
        writer2.shutdown(socket.SHUT_WR)
        with pytest.raises(wire.WireError, match="stream ended inside a frame"):
            wire.FrameReader(reader2).read()


def test_a_spinning_reader_polls_then_sleeps_until_the_next_frame() -> None:
    """With `spin` the reader polls first (the worker's side: a blocking socket, no timeout),
    then sleeps in recv; frames that come during the poll, after it, and the end all arrive."""
    writer, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with writer, reader:
        frames = wire.FrameReader(reader, spin=0.05)

        def write() -> None:
            wire.send(writer, wire.encode(("batch", 0)))
            threading.Event().wait(0.01)  # inside the reader's 50 ms of polling
            wire.send(writer, wire.encode(("batch", 1)))
            threading.Event().wait(0.3)  # long after it: the reader sleeps in recv
            wire.send(writer, wire.encode(("batch", 2)))
            writer.shutdown(socket.SHUT_WR)

        thread = threading.Thread(target=write)
        thread.start()
        try:
            got = [wire.loads(frame) for frame in iter(frames.read, None)]
        finally:
            thread.join(10)
        assert got == [("batch", 0), ("batch", 1), ("batch", 2)]
