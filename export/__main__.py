"""``python -m export ...`` is ``torchgate export ...``."""

from export.cli import main

raise SystemExit(main())
