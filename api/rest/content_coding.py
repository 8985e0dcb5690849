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
# Answers at least this big are compressed off the event loop (zlib lets go of the
# interpreter lock): a 6 MB tensor takes about 0.2 s, which would stall every other request.
_OFF_LOOP_BYTES: Final = 64 * 1024


def decompressed(body: bytes, encoding: str | None, limit: int) -> bytes:
    """`body` with its Content-Encoding undone; at most `limit` bytes once inflated."""
    coding = (encoding or "identity").strip().lower()
    if coding == "identity":
        return body
    wbits = _WBITS.get(coding)
    if wbits is None:
        raise UnsupportedEncoding(
            f"Unsupported Content-Encoding: {encoding} (this server takes {ACCEPTED})"
        )
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"Body is not valid {coding} data: {exc}") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"Decompressed body exceeds max_request_size of {limit} bytes")
    if not inflater.eof:  # zlib hands back what it could of a cut-off stream, silently
        raise BadRequest(f"Body is not valid {coding} data: the stream is truncated")
    return data


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
