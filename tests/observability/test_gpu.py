"""`api.observability.gpu`: GPU metrics per device, absent without a GPU.

This project's test machines have no GPU, so NVML is a fake module injected into the collector
(`tests.support.fake_nvml`); the calls and fields it fakes are the ones of nvidia-ml-py's
`pynvml`. Only the no-GPU path runs against the real library.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from api.observability.gpu import GpuCollector
from tests.support.exposition import parse, value
from tests.support.fake_nvml import FakeDevice, FakeNvml, NVMLError

GIB = 1024**3


def scrape(collector: GpuCollector) -> tuple[list, dict[str, str]]:
    registry = CollectorRegistry()
    registry.register(collector)
    return parse(generate_latest(registry).decode())


def test_memory_and_utilization_per_device() -> None:
    nvml = FakeNvml([FakeDevice(used=2 * GIB, total=80 * GIB, utilization=37),
                     FakeDevice(used=0, total=80 * GIB, utilization=0)])  # fmt: skip
    samples, types = scrape(GpuCollector(hostname="h", nvml=nvml))

    assert value(samples, "torchgate_gpu_memory_used_bytes", device="0") == 2 * GIB
    assert value(samples, "torchgate_gpu_memory_total_bytes", device="0") == 80 * GIB
    assert value(samples, "torchgate_gpu_utilization_ratio", device="0") == pytest.approx(0.37)
    assert value(samples, "torchgate_gpu_memory_used_bytes", device="1") == 0
    # TorchServe's names and units for the same readings.
    labels = {"Level": "Host", "DeviceId": "0", "Hostname": "h"}
    assert value(samples, "GPUMemoryUsed", **labels) == 2048
    assert value(samples, "GPUMemoryUtilization", **labels) == pytest.approx(2.5)
    assert value(samples, "GPUUtilization", **labels) == 37
    assert all(types[name] == "gauge" for name in types)


def test_nvml_is_initialised_once_at_the_first_scrape() -> None:
    nvml = FakeNvml([FakeDevice(1, 2)])
    collector = GpuCollector(hostname="h", nvml=nvml)
    assert nvml.init_calls == 0
    scrape(collector)
    scrape(collector)
    assert nvml.init_calls == 1


@pytest.mark.parametrize(
    "nvml",
    [
        FakeNvml(init_error=NVMLError("NVML Shared Library Not Found")),  # no driver
        FakeNvml(devices=[]),  # a driver, no device
    ],
    ids=["no-driver", "no-device"],
)
def test_without_a_gpu_the_series_are_absent_not_zero(nvml: FakeNvml) -> None:
    samples, types = scrape(GpuCollector(hostname="h", nvml=nvml))
    assert samples == [] and types == {}


def test_a_device_without_a_utilization_counter_still_reports_memory() -> None:
    nvml = FakeNvml([FakeDevice(used=GIB, total=2 * GIB, utilization=None)])
    samples, types = scrape(GpuCollector(hostname="h", nvml=nvml))
    assert value(samples, "torchgate_gpu_memory_used_bytes", device="0") == GIB
    assert "torchgate_gpu_utilization_ratio" not in types
    assert "GPUUtilization" not in types


def test_the_real_library_on_this_machine_reports_only_what_exists() -> None:
    collector = GpuCollector(hostname="h")
    samples, _ = scrape(collector)
    # No GPU (the usual case here): nothing at all. With one: one sample per device and family.
    devices = collector.devices()
    used = [s for s in samples if s.name == "torchgate_gpu_memory_used_bytes"]
    assert len(used) == devices


@pytest.mark.parametrize("system_metrics", [True, False])
def test_disable_system_metrics_leaves_the_gpu_metrics_out(system_metrics: bool) -> None:
    """TorchServe's disable_system_metrics=true: no system metrics are collected, GPU ones
    included (the model and request metrics stay)."""
    from api.observability.compose import build_observability

    gpu = GpuCollector(hostname="h", nvml=FakeNvml([FakeDevice(1, 2)]))
    observability = build_observability(access_log=False, system_metrics=system_metrics, gpu=gpu)
    text = observability.metrics.render().decode()
    assert ("GPUMemoryUsed" in text) is system_metrics
    assert ("torchgate_gpu_memory_used_bytes" in text) is system_metrics
