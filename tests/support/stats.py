"""Statistical bounds for tests of random traffic splits."""

from __future__ import annotations

import math

SIGMAS = 5  # a false failure about once in 1.7 million runs


def within_binomial(count: int, n: int, p: float, sigmas: float = SIGMAS) -> bool:
    """Whether `count` successes in `n` draws of probability `p` lie within `sigmas` std devs."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))
