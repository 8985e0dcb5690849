"""Small inputs that would cost far more than they weigh: an archive that unpacks to hundreds
of MB (the registration limits' tests), a PNG that decodes to gigabytes, JSON nested deeper
than any recursive parser's stack (the input limits' tests)."""

from __future__ import annotations

import json
import struct
import zipfile
import zlib
from functools import cache
from pathlib import Path

MEMBER_BYTES = 1_000_000  # under extract's 1 MiB per-member ratio floor, so each one passes


def many_small_members_bomb(path: Path, *, members: int = 401, name: str = "bomb") -> Path:
    """The issue's archive: ~430 KB on disk, `members` MB unpacked, every member harmless alone.

    A valid manifest and handler, so only the whole archive's size gives it away.
    """
    manifest = {"model": {"modelName": name, "modelVersion": "1.0", "handler": "handler.py"}}
    zeros = bytes(MEMBER_BYTES)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest))
        archive.writestr("handler.py", "def handle(data, context):\n    return data\n")
        for index in range(members):
            archive.writestr(f"weights/{index}.bin", zeros)
    return path


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
