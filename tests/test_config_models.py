"""config.properties' `models={...}` entries: a number TorchServe's ConfigManager.getJsonIntValue
replaces by the default (<= 0) starts the model with that default and a WARNING naming it, as
TorchServe does, where torchgate used to refuse to start; a value that is no number stops the
start, as it stops TorchServe's (Gson's NumberFormatException, which it does not catch)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from api.config import Config, ConfigError, parse_config


def entry_of(caplog: pytest.LogCaptureFixture, options: dict[str, Any], **keys: str) -> Config:
    raw = {**keys, "models": json.dumps({"m": {"2.0": options}})}
    with caplog.at_level(logging.WARNING, logger="api.config"):
        return parse_config(raw, base_dir=Path("/tmp"))


@pytest.mark.parametrize(
    ("key", "value", "field", "default"),
    [
        ("batchSize", 0, "batch_size", 1),
        ("batchSize", -1, "batch_size", 1),
        ("batchSize", "-3", "batch_size", 1),
        ("maxBatchDelay", 0, "max_batch_delay_ms", 100),
        ("responseTimeout", 0.5, "response_timeout_s", 120),
        ("jobQueueSize", 0, "job_queue_size", 100),
    ],
)
def test_invalid_value_means_the_default_with_a_warning(
    caplog: pytest.LogCaptureFixture, key: str, value: Any, field: str, default: int
) -> None:
    [entry] = entry_of(caplog, {key: value, "marName": "m.mar"}).models
    assert getattr(entry.settings, field) == default
    assert key not in entry.options and entry.options["marName"] == "m.mar"
    assert f"models={{...}} model m version 2.0: {key}={value!r} is not above 0" in caplog.text
    assert "the default is used instead" in caplog.text


def test_zero_workers_mean_the_default_workers(caplog: pytest.LogCaptureFixture) -> None:
    options = {"minWorkers": 0, "maxWorkers": 0}
    [entry] = entry_of(caplog, options, default_workers_per_model="3").models
    assert (entry.settings.min_workers, entry.settings.max_workers) == (3, 3)
    assert "minWorkers=0 is not above 0" in caplog.text
    assert "maxWorkers=0 is not above 0" in caplog.text


@pytest.mark.parametrize("value", ["abc", "2.5", True, None, [], {}])
def test_a_value_that_is_no_number_is_refused(caplog: pytest.LogCaptureFixture, value: Any) -> None:
    with pytest.raises(ConfigError, match=r"models\.m\.2\.0\.batchSize must be an integer"):
        entry_of(caplog, {"batchSize": value, "marName": "m.mar"})


def test_valid_values_are_read_as_gson_reads_them(caplog: pytest.LogCaptureFixture) -> None:
    options = {"batchSize": "8", "maxBatchDelay": 2.5, "minWorkers": 2, "maxWorkers": 4}
    [entry] = entry_of(caplog, options).models
    assert (entry.settings.batch_size, entry.settings.max_batch_delay_ms) == (8, 2)
    assert (entry.settings.min_workers, entry.settings.max_workers) == (2, 4)
    assert caplog.text == ""


def test_model_snapshot_values_are_still_refused(tmp_path: Path) -> None:
    """A model_snapshot restores what it says (TorchServe's setModelState): no defaults."""
    snapshot = {"models": {"m": {"1.0": {"marName": "m.mar", "batchSize": 0}}}}
    with pytest.raises(ConfigError, match=r"models\.m\.1\.0: batch_size must be >= 1"):
        parse_config({"model_snapshot": json.dumps(snapshot)}, base_dir=tmp_path)
