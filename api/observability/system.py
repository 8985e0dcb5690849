"""TorchServe's host metrics, read through psutil when Prometheus scrapes.

TorchServe 0.12 exports these under its default metrics.yaml, labelled `Level="Host"` and
`Hostname`, and dashboards and alerts built on TorchServe use them:

    CPUUtilization (percent), MemoryUsed, MemoryAvailable (megabytes), MemoryUtilization
    (percent), DiskUsage, DiskAvailable (gigabytes of the root file system), DiskUtilization
    (percent)

TorchServe samples them once a minute (`metric_time_interval`) in a fresh process, so its
CPUUtilization is always psutil's first reading, 0.0; here each scrape reads CPU use since the
previous one. `disable_system_metrics=true` leaves them out, as it does in TorchServe.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import psutil
from prometheus_client.core import GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

_MB = 1024.0**2
_GB = 1024.0**3
_LABELS = ["Level", "Hostname"]


class SystemCollector:
    """A prometheus_client collector of the host's CPU, memory and root-disk use."""

    def __init__(self, *, hostname: str, disk: str = "/") -> None:
        self._values = ["Host", hostname]
        self._disk = disk
        psutil.cpu_percent(interval=None)  # the first reading is meaningless: start the clock

    def collect(self) -> Iterator[Metric]:
        memory = psutil.virtual_memory()
        readings = [
            ("CPUUtilization", "CPU utilization on host (percent)", psutil.cpu_percent(None)),
            ("MemoryUsed", "Memory used on host (megabytes)", memory.used / _MB),
            ("MemoryAvailable", "Memory available on host (megabytes)", memory.available / _MB),
            ("MemoryUtilization", "Memory utilization on host (percent)", memory.percent),
        ]
        try:
            disk = psutil.disk_usage(self._disk)
        except OSError as exc:  # an unreadable mount: the other readings still count
            log.debug("disk usage of %s: %s", self._disk, exc)
        else:
            readings += [
                ("DiskUsage", "Disk used on host (gigabytes)", disk.used / _GB),
                ("DiskUtilization", "Disk utilization on host (percent)", disk.percent),
                ("DiskAvailable", "Disk available on host (gigabytes)", disk.free / _GB),
            ]
        for name, help_text, value in readings:
            family = GaugeMetricFamily(name, f"{help_text}; TorchServe name", labels=_LABELS)
            family.add_metric(self._values, float(value))
            yield family
