"""Hypothesis settings shared by the fuzzing suite (tests/fuzz).

By default every fuzz test runs a fixed number of examples, derandomized: the same inputs on
every run and machine, so CI is reproducible and a failure reruns as it failed. No example
database is kept (Hypothesis still caches constants in its self-ignoring `.hypothesis/`).
Deadlines are off: on a shared 2-core machine a slow example is load, not a bug; hangs are
caught by per-request timeouts instead.

For a deeper search by hand (not in `make test`): ``FUZZ_SCALE=10`` runs ten times the examples,
``FUZZ_RANDOM=1`` draws fresh inputs on each run (a failure prints the seed to rerun it with).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

SCALE = int(os.environ.get("FUZZ_SCALE", "1"))
RANDOM = os.environ.get("FUZZ_RANDOM", "") not in ("", "0")


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples * SCALE,
        derandomize=not RANDOM,
        database=None,
        deadline=None,
        print_blob=RANDOM,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )
