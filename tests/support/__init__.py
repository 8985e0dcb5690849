"""Helpers shared by tests, integration tests and benchmarks (not tests themselves)."""
