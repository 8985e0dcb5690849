"""`torchgate.max_workers_per_model` (read, checked, defaulted from cores and GPUs) and
`torchgate.spin_us`."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from api.app import build
from api.config import ConfigError, default_max_workers, parse_config
from api.workers.spin import DEFAULT_SPIN_US


def test_the_bound_is_read_from_config_properties(tmp_path: Path) -> None:
    config = parse_config({"torchgate.max_workers_per_model": "3"}, base_dir=tmp_path)
    assert config.worker_bound == 3


@pytest.mark.parametrize("value", ["0", "-2", "many", "1.5"])
def test_an_invalid_bound_is_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="max_workers_per_model must be >= 1"):
        parse_config({"torchgate.max_workers_per_model": value}, base_dir=tmp_path)


def test_the_default_comes_from_cores_and_gpus(tmp_path: Path) -> None:
    assert default_max_workers(cores=1, gpus=0) == 4
    assert default_max_workers(cores=16, gpus=0) == 32
    assert default_max_workers(cores=2, gpus=8) == 32
    cores = len(os.sched_getaffinity(0))
    assert parse_config({}, base_dir=tmp_path).worker_bound == max(4, 2 * cores)
    gpus = parse_config({"number_of_gpu": "8"}, base_dir=tmp_path)
    assert gpus.worker_bound == max(4, 2 * cores, 32)


def test_default_workers_per_model_above_the_bound_is_clamped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = {"torchgate.max_workers_per_model": "2", "default_workers_per_model": "8"}
    config = parse_config(raw, base_dir=tmp_path)
    assert config.default_workers_per_model == 2
    assert config.model_settings().min_workers == 2
    assert "default_workers_per_model=8 is above torchgate.max_workers_per_model=2" in caplog.text


def test_spin_is_read_checked_and_given_to_the_zygote(tmp_path: Path) -> None:
    """torchgate.spin_us reaches the zygote, which hands it to every worker it forks."""
    assert parse_config({}, base_dir=tmp_path).spin_us == DEFAULT_SPIN_US
    config = parse_config({"torchgate.spin_us": "0"}, base_dir=tmp_path)
    assert config.spin_us == 0
    for value in ("-1", "10001", "fast"):
        with pytest.raises(ConfigError, match="spin_us"):
            parse_config({"torchgate.spin_us": value}, base_dir=tmp_path)
    torchgate = build(config, work_dir=tmp_path)
    assert torchgate.pool is not None
    torchgate.pool.launch()
    try:
        pid = torchgate.pool.zygote_pid
        command: list[bytes] = []
        for _ in range(100):  # until /proc shows the command the zygote runs
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"--spin-us" in command:
                break
            time.sleep(0.05)
        assert command[command.index(b"--spin-us") + 1] == b"0"
    finally:
        asyncio.run(torchgate.pool.close())
