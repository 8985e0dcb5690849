"""`api.rest.content_coding` on its own: what is sent compressed, and what is not."""

from __future__ import annotations

import gzip
import os
import zlib

import pytest

from api.errors import BadRequest, PayloadTooLarge, UnsupportedEncoding
from api.rest import content_coding
from api.rest.content_coding import MAX_MEMBERS, compressed, decompressed
from tests.support.aio import run


def test_a_body_that_does_not_shrink_goes_as_it_is() -> None:
    noise = os.urandom(2048)  # what random float tensors look like to zlib
    assert run(compressed(noise, "gzip")) is None
    assert run(compressed(b"abc", None)) is None


@pytest.mark.parametrize("size", [4096, 1 << 20])  # on the loop, and off it (a thread)
def test_a_body_that_shrinks_is_compressed(size: int) -> None:
    body = b"0.0," * (size // 4)
    packed = run(compressed(body, "gzip"))
    assert packed is not None and len(packed) < len(body) and gzip.decompress(packed) == body
    packed = run(compressed(body, "deflate"))
    assert packed is not None and zlib.decompress(packed) == body


def test_request_codings() -> None:
    body = b'{"inputs": []}'
    assert decompressed(gzip.compress(body), "x-gzip", 1000) == body  # gzip's old name
    assert decompressed(body, " Identity ", 1000) == body
    with pytest.raises(UnsupportedEncoding):
        decompressed(body, "br", 1000)


def test_every_gzip_member_is_inflated() -> None:
    """A gzip body may be several members (RFC 1952; `cat a.gz b.gz`): all of it is the body,
    as gzip.decompress reads it, not the first member alone."""
    parts = [b'{"inputs": ', b"[]", b"}"]
    body = b"".join(gzip.compress(part) for part in parts)
    assert decompressed(body, "gzip", 1000) == gzip.decompress(body) == b"".join(parts)
    assert decompressed(body * 2, "x-gzip", 1000) == b"".join(parts) * 2
    noise = os.urandom(100_000)  # a member after the first, read in growing pieces
    body = gzip.compress(b"[") + gzip.compress(noise) + gzip.compress(b"]")
    assert decompressed(body, "gzip", 200_000) == b"[" + noise + b"]"


def test_the_size_bound_holds_across_members() -> None:
    body = gzip.compress(b" " * 600) + gzip.compress(b" " * 600)  # each within the bound
    assert decompressed(body, "gzip", 1200) == b" " * 1200
    with pytest.raises(PayloadTooLarge):
        decompressed(body, "gzip", 1000)


@pytest.mark.parametrize(
    ("body", "coding", "says"),
    [
        (gzip.compress(b"{}") + b"junk", "gzip", "4 bytes after the last gzip member"),
        (gzip.compress(b"{}") + b"\0junk", "gzip", "5 bytes after the last gzip member"),
        (gzip.compress(b"{}") + gzip.compress(b"{}")[:-4], "gzip", "the stream is truncated"),
        (gzip.compress(b"{}") + b"\x1f\x8bjunkjunkjunk", "gzip", "while decompressing data"),
        (zlib.compress(b"{}") + b"junk", "deflate", "4 bytes after the deflate stream"),
        (zlib.compress(b"{}") + zlib.compress(b"{}"), "deflate", "after the deflate stream"),
    ],
    ids=["garbage", "zero then", "cut-off member", "broken member", "deflate garbage", "two zlib"],
)
def test_bytes_after_the_last_stream_are_refused(body: bytes, coding: str, says: str) -> None:
    with pytest.raises(BadRequest) as refused:
        decompressed(body, coding, 1000)
    assert refused.value.message.startswith(f"Body is not valid {coding} data: ")
    assert says in refused.value.message


def test_zero_padding_after_the_last_gzip_member_is_taken() -> None:
    # As gzip(1) and gzip.decompress take it (tape blocks, fixed-size records).
    body = gzip.compress(b"{}") + gzip.compress(b"[]") + bytes(8)
    assert decompressed(body, "gzip", 1000) == gzip.decompress(body) == b"{}[]"


def test_the_members_of_one_body_are_bounded() -> None:
    """Each member costs the event loop some µs however small: 6.5 MB of empty members would
    hold it for over half a second."""
    empty = gzip.compress(b"")
    assert decompressed(empty * MAX_MEMBERS, "gzip", 1000) == b""
    with pytest.raises(BadRequest, match=f"more than {MAX_MEMBERS} gzip members"):
        decompressed(empty * (MAX_MEMBERS + 1), "gzip", 1000)


def test_the_rest_of_a_body_is_not_copied_after_each_member(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Checking for padding copies what follows a member: done after each of 1,000 empty
    members in front of 6 MB, it held the event loop for 0.7 s (the body's size squared)."""
    checks: list[int] = []
    only_padding = content_coding._only_padding

    def counted(rest: memoryview) -> bool:
        checks.append(len(rest))
        return only_padding(rest)

    monkeypatch.setattr(content_coding, "_only_padding", counted)
    empty, big = gzip.compress(b""), gzip.compress(bytes(100_000))
    assert decompressed(empty * 500 + big, "gzip", 200_000) == bytes(100_000)
    assert checks == [0]
