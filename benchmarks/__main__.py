"""`python -m benchmarks`: run the suite (see `benchmarks.suite`)."""

from __future__ import annotations

import sys

from benchmarks.suite import main

sys.exit(main())
