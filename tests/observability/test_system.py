"""TorchServe's host metrics (api/observability/system.py), read from this machine."""

from __future__ import annotations

import psutil
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from api.observability.compose import build_observability
from api.observability.system import SystemCollector
from tests.support.exposition import parse

NAMES = {
    "CPUUtilization",
    "MemoryUsed",
    "MemoryAvailable",
    "MemoryUtilization",
    "DiskUsage",
    "DiskUtilization",
    "DiskAvailable",
}


def test_host_metrics_are_torchserve_s_names_units_and_labels() -> None:
    registry = CollectorRegistry()
    registry.register(SystemCollector(hostname="host-1"))
    samples, types = parse(generate_latest(registry).decode())
    assert {s.name for s in samples} == NAMES and set(types.values()) == {"gauge"}
    assert all(s.labels == {"Level": "Host", "Hostname": "host-1"} for s in samples)
    by_name = {s.name: s.value for s in samples}
    memory, disk = psutil.virtual_memory(), psutil.disk_usage("/")
    assert by_name["MemoryUsed"] + by_name["MemoryAvailable"] <= memory.total / 2**20 * 1.01
    assert by_name["MemoryUtilization"] == pytest.approx(memory.percent, abs=5)
    assert by_name["DiskUsage"] + by_name["DiskAvailable"] <= disk.total / 2**30 * 1.01
    assert by_name["DiskUtilization"] == pytest.approx(disk.percent, abs=1)
    assert 0 <= by_name["CPUUtilization"] <= 100


def test_disable_system_metrics_leaves_them_out() -> None:
    for wanted in (True, False):
        observability = build_observability(access_log=False, system_metrics=wanted)
        samples, _ = parse(observability.metrics.render().decode())
        assert ({s.name for s in samples} >= NAMES) is wanted
