"""Fixtures for export tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.build import REPO_ROOT, ensure_archives


@pytest.fixture(scope="session")
def model_store() -> Path:
    """The repo's model store with the `--all` archives (built here only when missing/stale)."""
    store = REPO_ROOT / "model_store"
    ensure_archives(store)
    return store
