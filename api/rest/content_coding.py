"""HTTP content codings on the v2 inference path, as Triton's HTTP server and tritonclient use
them: a request body sent with `Content-Encoding: gzip|deflate` (tritonclient's
`request_compression_algorithm`) is undone before decoding, and an answer is compressed when
`Accept-Encoding` asks for gzip or deflate (its `response_compression_algorithm`).

    body = decompressed(body, headers.get("content-encoding"), limit)
    coding = chosen_coding(headers.get("accept-encoding"))      # "gzip", "deflate" or None
    packed = await compressed(payload, coding)                    # None: send payload as is
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Final

from api.errors import BadRequest, PayloadTooLarge, UnsupportedEncoding

# What a refusal says we take (RFC 7694), and zlib's window bits for each coding: gzip's
# header and trailer, or deflate's zlib wrapper (what Python's zlib.compress writes, and
# tritonclient sends). x-gzip is gzip's old name, which RFC 9110 asks recipients to take.
ACCEPTED: Final = "gzip, deflate"
_WBITS: Final = {"gzip": 31, "x-gzip": 31, "deflate": 15}
_GZIP_MAGIC: Final = b"\x1f\x8b"  # how every gzip member starts
# Members one gzip body may have: concatenated files, or BGZF's blocks of at most 64 KiB
# each (64 MiB of them). Each member costs some µs of the event loop however small it is:
# a body of 6.5 MB of empty members would hold the loop for over half a second.
MAX_MEMBERS: Final = 1024
# What a stream after the first is fed of the body at first (see `_inflate_stream`).
_FIRST_FEED: Final = 1024
# Answers at least this big are compressed off the event loop (zlib lets go of the
# interpreter lock): a 6 MB tensor takes about 0.2 s, which would stall every other request.
_OFF_LOOP_BYTES: Final = 64 * 1024


def decompressed(body: bytes, encoding: str | None, limit: int) -> bytes:
    """`body` with its Content-Encoding undone; at most `limit` bytes once inflated.

    gzip data may be several members, one after the other (RFC 1952; `cat a.gz b.gz`): each
    is inflated, as gzip and Python's gzip.decompress do. Bytes after the last member that
    do not start another, or after the deflate stream, are refused: stopping at the end of
    the first stream would cut the body short, or take garbage, without a word.
    """
    coding = (encoding or "identity").strip().lower()
    if coding == "identity":
        return body
    wbits = _WBITS.get(coding)
    if wbits is None:
        raise UnsupportedEncoding(
            f"Unsupported Content-Encoding: {encoding} (this server takes {ACCEPTED})"
        )
    inflated: list[bytes] = []
    size = 0
    rest, feed = memoryview(body), len(body)  # the first stream whole: usually all there is
    for _ in range(MAX_MEMBERS):
        stream, rest = _inflate_stream(rest, wbits, coding, feed=feed, limit=limit, size=size)
        inflated += stream
        size += sum(len(part) for part in stream)
        if rest and wbits != _WBITS["gzip"]:
            raise BadRequest(
                f"Body is not valid {coding} data: {len(rest)} bytes after the deflate stream"
            )
        if rest[:2] == _GZIP_MAGIC:  # another member
            feed = _FIRST_FEED
            continue
        if _only_padding(rest):  # the end, or zeros after it (gzip.decompress takes them)
            return b"".join(inflated)  # one part is returned as it is, not copied
        raise BadRequest(
            f"Body is not valid {coding} data: {len(rest)} bytes after the last gzip "
            f"member are not a gzip member"
        )
    raise BadRequest(f"Body is not valid {coding} data: more than {MAX_MEMBERS} gzip members")


def _only_padding(rest: memoryview) -> bool:
    """Nothing but zero bytes (or nothing). It copies `rest`: asked once per body, at its
    end, not after each member (1,000 empty members before 6 MB took 0.7 s of the loop)."""
    return not bytes(rest).strip(b"\0")


def _inflate_stream(
    data: memoryview, wbits: int, coding: str, *, feed: int, limit: int, size: int
) -> tuple[list[bytes], memoryview]:
    """The stream (the gzip member) that `data` starts with, inflated, in parts, and what
    follows it; 413 should it take what was inflated before (`size` bytes) past `limit`.

    `data` is fed `feed` bytes, then twice as many each time the stream wants more: zlib
    copies out whatever follows a stream's end (`unused_data`), so feeding all the rest of
    the body to each of many small members would copy it once per member.
    """
    inflater = zlib.decompressobj(wbits)
    parts: list[bytes] = []
    used = 0
    while not inflater.eof:
        chunk = data[used : used + feed]
        if not chunk:  # zlib hands back what it could of a cut-off stream, silently
            raise BadRequest(f"Body is not valid {coding} data: the stream is truncated")
        try:
            part = inflater.decompress(chunk, limit - size + 1)
        except zlib.error as exc:
            raise BadRequest(f"Body is not valid {coding} data: {exc}") from None
        size += len(part)
        if size > limit or inflater.unconsumed_tail:
            raise PayloadTooLarge(f"Decompressed body exceeds max_request_size of {limit} bytes")
        parts.append(part)
        used += len(chunk) - len(inflater.unused_data)
        feed *= 2
    return parts, data[used:]


def chosen_coding(accept_encoding: str | None) -> str | None:
    """The coding to answer with: gzip or deflate, whichever `Accept-Encoding` weighs highest
    (gzip on a tie), unless it weighs `identity` higher; None for no compression."""
    if not accept_encoding:
        return None
    weights: dict[str, float] = {}
    for entry in accept_encoding.split(","):
        name, _, params = entry.partition(";")
        weights[name.strip().lower()] = _quality(params)
    anything = weights.get("*", 0.0)
    best = max(("gzip", "deflate"), key=lambda coding: weights.get(coding, anything))
    quality = weights.get(best, anything)
    # identity stays acceptable when unnamed (RFC 9110), but below any coding named.
    if quality <= 0 or ("identity" in weights and weights["identity"] >= quality):
        return None
    return best


async def compressed(body: bytes, coding: str | None) -> bytes | None:
    """`body` in `coding`; None when there is no coding, or compressing does not make it
    smaller (random float tensors barely shrink): then it goes as it is."""
    if coding is None:
        return None
    if len(body) >= _OFF_LOOP_BYTES:
        packed = await asyncio.to_thread(_compress, body, coding)
    else:
        packed = _compress(body, coding)
    return packed if len(packed) < len(body) else None


def _compress(body: bytes, coding: str) -> bytes:
    compressor = zlib.compressobj(wbits=_WBITS[coding])
    return compressor.compress(body) + compressor.flush()


def _quality(params: str) -> float:
    """An entry's `q=` weight; 1 when absent, 0 when unreadable (so never chosen)."""
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "q":
            try:
                quality = float(value)
            except ValueError:
                return 0.0
            return min(quality, 1.0) if quality > 0 else 0.0  # NaN is not > 0 either
    return 1.0
