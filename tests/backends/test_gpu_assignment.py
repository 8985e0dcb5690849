"""Which GPU each worker gets: TorchServe 0.12's round robin (WorkLoadManager.addThreads), one
counter for the whole server, `number_of_gpu` capped at the GPUs present (ConfigManager).

There is no GPU on the machines these tests run on, so the workers here are stand-ins: a pool
whose "processes" run the real worker-side device choice (`api.workers.main._device`) against
a stand-in for `torch` with `DEVICES` CUDA devices, and report the device as a worker does. The
frontend (the loader from `api.app`, `WorkerBackend`, the registry) is the real one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

# The round robin's names through the module: the behaviour tests also run (and fail) against
# the code from before it.
import api.backends.workers as workers_module
from api.app import worker_backend_loader
from api.config import parse_config
from api.core.registry import Registry
from api.core.types import ModelSettings
from api.observability.handler_metrics import HandlerMetrics
from api.workers.main import _device
from tests.backends.conftest import manifest
from tests.support import aio


class StandInTorch:
    """Stand-in for a CUDA build of torch in a worker (no GPU here): `devices` devices, and
    set_device refusing an ordinal past them as CUDA does ("invalid device ordinal")."""

    def __init__(self, devices: int) -> None:
        def set_device(ordinal: int) -> None:
            if not 0 <= ordinal < devices:
                raise RuntimeError("CUDA error: invalid device ordinal")

        self.cuda = SimpleNamespace(
            is_available=lambda: devices > 0,
            device_count=lambda: devices,
            set_device=set_device,
        )


class StandInProcess:
    """A worker process that ran the worker's device choice; exits when told to (`die`)."""

    def __init__(self, pid: int, report: tuple[Any, ...]) -> None:
        self.pid = pid
        self._report = report
        self.exited: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    async def receive(self, timeout: float) -> tuple[Any, ...]:
        return self._report

    def die(self) -> None:
        if not self.exited.done():
            self.exited.set_result("exit code 1")

    def kill(self) -> None:
        self.die()

    async def stop(self, grace_s: float) -> None:
        self.die()


class StandInPool:
    """`WorkerPool.spawn`, without a process: the worker's side is `_device` on `torch`."""

    def __init__(self, torch: StandInTorch) -> None:
        self.torch = torch
        self.processes: dict[str, StandInProcess] = {}  # by label, the latest
        self._pids = itertools.count(1000)

    async def spawn(
        self, spec: Any, *, label: str, worker_name: str | None = None
    ) -> StandInProcess:
        try:
            gpu_id = _device(self.torch, spec)
        except RuntimeError as exc:
            report: tuple[Any, ...] = ("failed", str(exc))
        else:
            device = "cpu" if gpu_id is None else f"cuda:{gpu_id}"
            report = ("ready", {"device": device, "description": "stand-in"}, [])
        process = StandInProcess(next(self._pids), report)
        self.processes[label] = process
        return process


def archive(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    (folder / "MAR-INF").mkdir(parents=True)
    (folder / "MAR-INF" / "MANIFEST.json").write_text(manifest())
    (folder / "handler.py").write_text("def handle(data, context):\n    return data\n")
    return folder


class Server:
    """The registry and the worker loader `api.app` builds, over a stand-in pool."""

    def __init__(
        self,
        tmp_path: Path,
        number_of_gpu: str | None,
        *,
        devices: int,
        metrics: HandlerMetrics | None = None,
    ) -> None:
        raw = {} if number_of_gpu is None else {"number_of_gpu": number_of_gpu}
        self.pool = StandInPool(StandInTorch(devices))
        self.loader = worker_backend_loader(
            self.pool,  # type: ignore[arg-type]  # a stand-in: no GPU, no process
            parse_config(raw, base_dir=tmp_path),
            metrics,
        )
        self.registry = Registry()
        self.path = archive(tmp_path)
        self.work = tmp_path / "work"

    async def register(self, name: str, workers: int = 1) -> None:
        settings = ModelSettings(min_workers=workers, max_workers=workers)
        await self.registry.register(
            name,
            "1.0",
            f"{name}.mar",
            lambda: self.loader(self.path, settings, self.work, name=name),
            settings,
        )

    def devices(self, name: str) -> list[str]:
        return [
            "none" if slot.worker is None else slot.worker.device
            for slot in self.registry.get(name).workers
        ]

    async def restart(self, name: str, index: int) -> None:
        """Kill the worker in slot `index`; wait for the registry's replacement."""
        slot = self.registry.get(name).workers[index]
        old = slot.worker
        self.pool.processes[f"{name}/1.0 w{slot.index}"].die()
        while slot.worker is None or slot.worker is old:
            await asyncio.sleep(0.01)


@pytest.fixture
def gpus_present(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """What the frontend finds present (`visible_gpus`, NVML here), as a one-item list to set."""
    present = [4]
    # raising=False: the check that this test fails without the fix imports the old module.
    monkeypatch.setattr(workers_module, "visible_gpus", lambda: present[0], raising=False)
    return present


def test_the_round_robin_is_torchserves_counter() -> None:
    four = workers_module.GpuRoundRobin(4)
    assert [four.next() for _ in range(6)] == [1, 2, 3, 0, 1, 2]
    one = workers_module.GpuRoundRobin(1)
    assert [one.next() for _ in range(3)] == [0, 0, 0]
    assert workers_module.GpuRoundRobin(0).next() is None
    assert workers_module.GpuRoundRobin(-2).next() is None


def test_workers_of_every_model_share_one_counter(tmp_path: Path, gpus_present: list[int]) -> None:
    """4 models x 1 worker on 4 GPUs: TorchServe puts them on GPUs 1, 2, 3, 0 (not all on 0);
    a restarted worker keeps its GPU; a new worker takes the next; a worker scaled away and
    replaced is a new one (TorchServe's new WorkerThread), not a restart."""
    server = Server(tmp_path, "4", devices=4)

    async def scenario() -> None:
        for name in "abcd":
            await server.register(name)
        assert [server.devices(name) for name in "abcd"] == [
            ["cuda:1"],
            ["cuda:2"],
            ["cuda:3"],
            ["cuda:0"],
        ]
        await server.restart("b", 0)
        assert server.devices("b") == ["cuda:2"]
        await server.registry.scale("a", None, 2, 2)
        assert server.devices("a") == ["cuda:1", "cuda:1"]  # the counter's next: 0 + 1
        await server.registry.scale("a", None, 1, 1)
        await server.registry.scale("a", None, 2, 2)  # slot index 1 again, a new worker
        assert server.devices("a") == ["cuda:1", "cuda:2"]
        await server.restart("a", 1)
        assert server.devices("a") == ["cuda:1", "cuda:2"]
        await server.registry.close()

    aio.run(scenario())


def test_number_of_gpu_is_capped_at_the_gpus_present(
    tmp_path: Path, gpus_present: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    """number_of_gpu=2 on a 1-GPU host: TorchServe uses min(2, 1) GPUs; uncapped, worker 1 would
    ask for cuda:1 and fail."""
    gpus_present[0] = 1
    with caplog.at_level(logging.WARNING, logger="api.backends.workers"):
        server = Server(tmp_path, "2", devices=1)

    async def scenario() -> None:
        await server.register("m", workers=2)
        assert server.devices("m") == ["cuda:0", "cuda:0"]
        await server.registry.close()

    aio.run(scenario())
    assert "number_of_gpu=2, but 1 GPU is present: workers use 1" in caplog.text


@pytest.mark.parametrize("number_of_gpu", ["0", "-1"])
def test_no_gpu_for_zero_or_less(
    tmp_path: Path, gpus_present: list[int], number_of_gpu: str
) -> None:
    """As TorchServe: number_of_gpu <= 0 gives no worker a GPU (a negative value is no "GPU 0")."""
    server = Server(tmp_path, number_of_gpu, devices=4)

    async def scenario() -> None:
        await server.register("m", workers=2)
        assert server.devices("m") == ["cpu", "cpu"]
        await server.registry.close()

    aio.run(scenario())


def test_unset_number_of_gpu_means_every_gpu_present(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="api.backends.workers"):
        assert workers_module.gpu_round_robin(None, visible=lambda: 3).count == 3
        assert workers_module.gpu_round_robin(3, visible=lambda: 3).count == 3
        assert workers_module.gpu_round_robin(2, visible=lambda: 3).count == 2
        assert workers_module.gpu_round_robin(None, visible=lambda: 0).next() is None
    assert not caplog.records  # nothing capped
    with caplog.at_level(logging.WARNING, logger="api.backends.workers"):
        assert workers_module.gpu_round_robin(-1, visible=lambda: 3).count == 0
    assert "number_of_gpu=-1: workers run on CPU" in caplog.text


class StandInNvml:
    """Stand-in for pynvml (no NVIDIA driver here)."""

    def __init__(self, devices: int | None) -> None:
        self.devices = devices

    def nvmlInit(self) -> None:
        if self.devices is None:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self) -> int:
        assert self.devices is not None
        return self.devices

    def nvmlShutdown(self) -> None:
        pass


@pytest.mark.parametrize(
    ("cuda_visible_devices", "expected"),
    [
        (None, 4),
        ("1,3", 2),
        ("0,5", 1),  # no device 5: torch stops there
        ("2,-1,3", 1),  # a negative ordinal ends the list
        ("", 0),
        ("0,0", 0),  # a repeated ordinal: torch sees none
        ("GPU-8c1d2e3f", 1),
    ],
)
def test_visible_gpus_counts_as_torch_does(cuda_visible_devices: str | None, expected: int) -> None:
    environ = {} if cuda_visible_devices is None else {"CUDA_VISIBLE_DEVICES": cuda_visible_devices}
    assert workers_module.visible_gpus(environ, StandInNvml(4)) == expected


def test_no_driver_no_gpu(tmp_path: Path) -> None:
    nothing = tmp_path / "no-kfd"
    assert workers_module.visible_gpus({}, StandInNvml(None), amd_nodes=nothing) == 0


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, 2),
        ({"HIP_VISIBLE_DEVICES": "1"}, 1),
        ({"ROCR_VISIBLE_DEVICES": "0", "HIP_VISIBLE_DEVICES": "0,1"}, 1),
        ({"CUDA_VISIBLE_DEVICES": ""}, 0),
    ],
)
def test_amd_gpus_are_counted_from_the_rocm_drivers_topology(
    tmp_path: Path, environ: dict[str, str], expected: int
) -> None:
    """A stand-in for /sys/class/kfd/kfd/topology/nodes (no AMD GPU here): a CPU node and two
    GPU nodes, as the ROCm driver lists them; no NVIDIA driver."""
    for node, simds in (("0", 0), ("1", 304), ("2", 304)):
        (tmp_path / node).mkdir()
        (tmp_path / node / "properties").write_text(f"cpu_cores_count 0\nsimd_count {simds}\n")
    assert workers_module.visible_gpus(environ, StandInNvml(None), amd_nodes=tmp_path) == expected


def test_a_loaded_version_holds_a_share_of_handler_metric_series_until_unloaded(
    tmp_path: Path, gpus_present: list[int]
) -> None:
    """Each version the loader loads reports its handler metrics as a source of its own
    (`HandlerMetrics.for_source`); unloaded, it keeps no share of the series any more."""
    metrics = HandlerMetrics(hostname="h")
    server = Server(tmp_path, "0", devices=0, metrics=metrics)

    async def scenario() -> None:
        await server.register("a")
        await server.register("b")
        assert sorted(metrics._by_source) == ["model (load 1)", "model (load 2)"]
        await server.registry.unregister("a", "1.0")
        assert sorted(metrics._by_source) == ["model (load 2)"]
        await server.registry.close()
        assert metrics._by_source == {}

    aio.run(scenario())
