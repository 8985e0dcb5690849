"""GPU memory and utilization per device, read through NVML when Prometheus scrapes.

Without a GPU (no NVIDIA driver, no NVML library, no device) the collector yields nothing: the
series are absent, not zero, so a dashboard shows "no data" instead of an idle GPU that does not
exist. Families (labels `device`, NVML's index, which ignores CUDA_VISIBLE_DEVICES):

    torchgate_gpu_memory_used_bytes, torchgate_gpu_memory_total_bytes,
    torchgate_gpu_utilization_ratio (0..1, busy time over NVML's last sample period)

and TorchServe's names for the same, labelled `Level="Host"`, `DeviceId`, `Hostname`:
`GPUMemoryUsed` (megabytes), `GPUMemoryUtilization` and `GPUUtilization` (percent).

NVML comes from `nvidia-ml-py` (module `pynvml`); tests inject a fake module with the same
functions.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

_MB = 1024.0 * 1024.0


def import_nvml() -> ModuleType | None:
    """NVML's Python module (`nvidia-ml-py`), None where it is not installed."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


class GpuCollector:
    """A prometheus_client collector; NVML is initialised at the first scrape, once."""

    def __init__(self, *, hostname: str, nvml: Any | None = None) -> None:
        self._hostname = hostname
        self._nvml = nvml
        self._devices: int | None = None  # None: not initialised yet; 0: no GPU
        # Scrapes run in threads (api.rest.apps), two at once possibly: NVML starts once.
        self._starting = threading.Lock()

    def devices(self) -> int:
        with self._starting:
            return self._devices_found()

    def _devices_found(self) -> int:
        if self._devices is None:
            self._devices = 0
            nvml = self._nvml if self._nvml is not None else import_nvml()
            if nvml is None:
                return 0
            try:
                nvml.nvmlInit()
                self._devices = int(nvml.nvmlDeviceGetCount())
            except Exception as exc:  # pynvml.NVMLError and its subclasses: no driver, no GPU
                log.debug("no GPU metrics: %s", exc)
                return 0
            self._nvml = nvml
        return self._devices

    def collect(self) -> Iterator[Metric]:
        if not self.devices():
            return
        nvml = self._nvml
        assert nvml is not None  # devices() keeps the module once NVML answered
        labels = ["device"]
        ts_labels = ["Level", "DeviceId", "Hostname"]
        used = GaugeMetricFamily(
            "torchgate_gpu_memory_used_bytes", "GPU memory used", labels=labels
        )
        total = GaugeMetricFamily(
            "torchgate_gpu_memory_total_bytes", "GPU memory in total", labels=labels
        )
        utilization = GaugeMetricFamily(
            "torchgate_gpu_utilization_ratio",
            "GPU busy time over the last sample period (0..1)",
            labels=labels,
        )
        ts_used = GaugeMetricFamily(
            "GPUMemoryUsed",
            "GPU memory used on host, DeviceId (megabytes; TorchServe name)",
            labels=ts_labels,
        )
        ts_memory = GaugeMetricFamily(
            "GPUMemoryUtilization",
            "GPU memory utilization on host, DeviceId (percent; TorchServe name)",
            labels=ts_labels,
        )
        ts_utilization = GaugeMetricFamily(
            "GPUUtilization",
            "GPU utilization on host, DeviceId (percent; TorchServe name)",
            labels=ts_labels,
        )
        for index in range(self.devices()):
            device = str(index)
            ts_values = ["Host", device, self._hostname]
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception as exc:  # a device that fell off the bus: skip it, keep the others
                log.debug("GPU %d: no memory info: %s", index, exc)
                continue
            used.add_metric([device], float(memory.used))
            total.add_metric([device], float(memory.total))
            ts_used.add_metric(ts_values, memory.used / _MB)
            if memory.total:
                ts_memory.add_metric(ts_values, 100.0 * memory.used / memory.total)
            try:
                busy = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except Exception as exc:  # some devices (MIG slices) have no utilization counter
                log.debug("GPU %d: no utilization: %s", index, exc)
                continue
            utilization.add_metric([device], busy / 100.0)
            ts_utilization.add_metric(ts_values, busy)
        for family in (used, total, utilization, ts_used, ts_memory, ts_utilization):
            if family.samples:
                yield family
