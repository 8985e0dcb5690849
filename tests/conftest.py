"""Fixtures every test package may use."""

from tests.support.workers import worker_pool

__all__ = ["worker_pool"]
