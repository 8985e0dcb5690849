"""Small requests that would cost a lot to serve in full: a decompression-bomb PNG, deep JSON."""

from __future__ import annotations

import struct
import zlib
from functools import cache


@cache
def png_bomb(width: int = 13_000, height: int = 13_000) -> bytes:
    """A valid 1-bit grayscale PNG of `width` x `height` black pixels, a few KB per 100 M pixels.

    Written by hand, row by row, so making it costs neither the memory nor the time that
    decoding it would (Pillow decodes it to one byte per pixel: 169 MB for 13000 x 13000, and
    the digits handler's float32 copy 680 MB more).
    """
    row = b"\x00" + bytes((width + 7) // 8)  # filter byte "none", then the packed bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    chunks = [_chunk(b"IHDR", header), _chunk(b"IDAT", data), _chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def deep_json(depth: int = 100_000) -> bytes:
    """`depth` nested JSON arrays: valid JSON, deeper than any recursive parser's stack."""
    return b"[" * depth + b"]" * depth
