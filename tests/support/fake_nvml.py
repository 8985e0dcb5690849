"""A stand-in for the `pynvml` module (nvidia-ml-py), for testing GPU metrics without a GPU.

Only the calls `api.observability.gpu.GpuCollector` makes are implemented. Devices are given as
`FakeDevice(used, total, utilization)`; `utilization=None` makes
`nvmlDeviceGetUtilizationRates` raise, as it does on devices without that counter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace


class NVMLError(Exception):
    """pynvml raises subclasses of its own NVMLError."""


@dataclass(frozen=True)
class FakeDevice:
    used: int
    total: int
    utilization: int | None = 0


@dataclass
class FakeNvml:
    devices: list[FakeDevice] = field(default_factory=list)
    init_error: Exception | None = None
    init_calls: int = 0

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise self.init_error

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        return self.devices[index]

    def nvmlDeviceGetMemoryInfo(self, handle: FakeDevice) -> SimpleNamespace:
        return SimpleNamespace(
            used=handle.used, total=handle.total, free=handle.total - handle.used
        )

    def nvmlDeviceGetUtilizationRates(self, handle: FakeDevice) -> SimpleNamespace:
        if handle.utilization is None:
            raise NVMLError("Not Supported")
        return SimpleNamespace(gpu=handle.utilization, memory=0)
