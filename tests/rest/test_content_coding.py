"""`api.rest.content_coding` on its own: what is sent compressed, and what is not."""

from __future__ import annotations

import gzip
import os
import zlib

import pytest

from api.errors import UnsupportedEncoding
from api.rest.content_coding import compressed, decompressed
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
