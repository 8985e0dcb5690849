"""`api.model_config`: model-config.yaml's frontend keys against models={...} and the register
API, key by key as TorchServe 0.12 weighs them (tests/integration/test_archive_environment.py
checks the same against a real TorchServe)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from api.backends.archive import ArchiveError
from api.config import Config, parse_config
from api.core.types import ModelSettings
from api.model_config import Origin, resolve_settings

EXAMPLE_STATEFUL = {  # examples/stateful/sequence_batching/model-config.yaml
    "minWorkers": 2,
    "maxWorkers": 2,
    "batchSize": 4,
    "maxNumSequence": 4,
    "sequenceMaxIdleMSec": 10,
    "maxSequenceJobQueueSize": 10,
    "sequenceBatching": True,
    "handler": {"cache": {"capacity": 4}},
}


def config_with(models: dict[str, Any] | None = None, **keys: str) -> Config:
    raw = dict(keys)
    if models is not None:
        raw["models"] = json.dumps(models)
    return parse_config(raw, base_dir=Path("/tmp"))


def resolve(
    config: Config,
    yaml: Mapping[str, Any],
    origin: Origin = "config",
    *,
    api: dict[str, Any] | None = None,
    settings: ModelSettings | None = None,
) -> ModelSettings:
    """As the loader calls it: `settings` built from the API's parameters (or a snapshot)."""
    return resolve_settings(
        config,
        yaml,
        name="m",
        version="1.0",
        origin=origin,
        settings=settings or config.model_settings(api),
        api=api,
    )


def test_the_stateful_example_fills_the_sequence_settings() -> None:
    settings = resolve(config_with(), EXAMPLE_STATEFUL)
    assert (settings.min_workers, settings.max_workers, settings.batch_size) == (2, 2, 4)
    assert settings.sequence_batching is True
    assert settings.sequence_max_idle_ms == 10
    assert settings.max_sequence_job_queue_size == 10
    # As TorchServe 0.12 enforces it: the configured value (its raise to batchSize x maxWorkers
    # happens while both are still 0).
    assert settings.max_num_sequence == 4


def test_yaml_beats_models_at_startup_and_models_beats_defaults() -> None:
    models = {
        "m": {
            "1.0": {
                "batchSize": 4,
                "maxBatchDelay": 50,
                "responseTimeout": 99,
                "startupTimeout": 77,
                "minWorkers": 3,
                "maxWorkers": 3,
            }
        }
    }
    config = config_with(models)
    settings = resolve(config, {"batchSize": 2, "responseTimeout": 33, "minWorkers": 1})
    assert settings.batch_size == 2
    assert settings.response_timeout_s == 33
    assert settings.max_batch_delay_ms == 50  # not in the yaml: models={...}
    assert settings.startup_timeout_s == 77
    # minWorkers without a valid maxWorkers: TorchServe ignores the yaml's pair.
    assert (settings.min_workers, settings.max_workers) == (3, 3)


def test_register_api_against_yaml() -> None:
    api = {"batchSize": 5, "maxBatchDelay": 11, "responseTimeout": 77, "minWorkers": 4}
    yaml = {"batchSize": 3, "maxBatchDelay": 9, "responseTimeout": 44}
    settings = resolve(config_with(), yaml, "api", api=api)
    assert settings.batch_size == 5  # the API's
    assert settings.max_batch_delay_ms == 11  # the API's
    assert settings.response_timeout_s == 44  # the yaml's
    assert settings.min_workers == 4  # initial_workers: the yaml has no valid pair
    with_workers = resolve(config_with(), {"minWorkers": 1, "maxWorkers": 2}, "api", api=api)
    assert (with_workers.min_workers, with_workers.max_workers) == (1, 2)


def test_register_api_falls_back_to_models_entry_for_batching() -> None:
    models = {"m": {"1.0": {"batchSize": 6, "responseTimeout": 12, "minWorkers": 3}}}
    settings = resolve(config_with(models), {}, "api", api={"responseTimeout": 30})
    assert settings.batch_size == 6
    assert settings.response_timeout_s == 12  # models={...} beats the API's responseTimeout
    assert settings.min_workers == 1  # workers at registration come from the API, not models


def test_snapshot_keeps_its_settings_but_takes_yaml_only_keys() -> None:
    snapshot = ModelSettings(batch_size=7, min_workers=2, max_workers=3)
    settings = resolve(
        config_with(), {**EXAMPLE_STATEFUL, "jobQueueSize": 5}, "snapshot", settings=snapshot
    )
    assert (settings.batch_size, settings.min_workers, settings.max_workers) == (7, 2, 3)
    assert settings.job_queue_size == 5
    assert settings.sequence_batching is True


def test_job_queue_size_and_use_venv() -> None:
    settings = resolve(config_with(job_queue_size="40"), {"jobQueueSize": 8, "useVenv": True})
    assert settings.job_queue_size == 8
    assert settings.use_venv is True
    assert resolve(config_with(job_queue_size="40"), {}).job_queue_size == 40


def test_max_retry_timeout_is_read_as_torchserve_stores_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert resolve(config_with(), {"maxRetryTimeoutInSec": 30}).max_retry_timeout_s == 30
    assert resolve(config_with(), {}).max_retry_timeout_s == 300
    # TorchServe 0.12 stores max(0, value): 0 gives a failing worker up at once.
    assert resolve(config_with(), {"maxRetryTimeoutInSec": 0}).max_retry_timeout_s == 0
    with caplog.at_level(logging.WARNING, logger="api.model_config"):
        assert resolve(config_with(), {"maxRetryTimeoutInSec": -5}).max_retry_timeout_s == 0
    assert "maxRetryTimeoutInSec=-5 is below 0: 0 is used" in caplog.text


def test_yaml_min_workers_below_one_counts_as_one(caplog: pytest.LogCaptureFixture) -> None:
    """TorchServe's setMinWorkers stores max(1, value): minWorkers 0 with maxWorkers 2 is the
    pair 1..2 there, not a pair to ignore."""
    config = config_with(default_workers_per_model="3")
    with caplog.at_level(logging.WARNING, logger="api.model_config"):
        settings = resolve(config, {"minWorkers": 0, "maxWorkers": 2})
    assert (settings.min_workers, settings.max_workers) == (1, 2)
    assert "model-config.yaml minWorkers=0 is below 1: 1 is used" in caplog.text
    assert "ignored" not in caplog.text


def test_yaml_batch_size_below_one_counts_as_one(caplog: pytest.LogCaptureFixture) -> None:
    """TorchServe's setBatchSize stores max(1, value), and a yaml batchSize > 0 beats
    models={...}: batchSize 0 in the yaml is a batch of 1, whatever models={...} says."""
    config = config_with({"m": {"1.0": {"batchSize": 4}}})
    with caplog.at_level(logging.WARNING, logger="api.model_config"):
        settings = resolve(config, {"batchSize": 0})
    assert settings.batch_size == 1
    assert "model-config.yaml batchSize=0 is below 1: 1 is used" in caplog.text


@pytest.mark.parametrize(
    "yaml",
    [
        {"minWorkers": 3, "maxWorkers": 2},
        {"minWorkers": 2},
        {"minWorkers": 0},  # raised to 1, with maxWorkers still 0 (unset) in TorchServe
        {"maxWorkers": 2},
    ],
)
def test_yaml_workers_without_a_valid_pair_are_ignored(
    caplog: pytest.LogCaptureFixture, yaml: dict[str, int]
) -> None:
    """TorchServe takes the yaml's workers only as a pair with minWorkers <= maxWorkers;
    otherwise models={...} (or its default) decides, as here."""
    config = config_with({"m": {"1.0": {"minWorkers": 4, "maxWorkers": 5}}})
    with caplog.at_level(logging.WARNING, logger="api.model_config"):
        settings = resolve(config, yaml)
    assert (settings.min_workers, settings.max_workers) == (4, 5)
    assert "TorchServe uses them only as a pair, with minWorkers <= maxWorkers" in caplog.text


def test_models_entry_values_torchserve_replaces_do_not_reach_the_merge() -> None:
    """models={...} maxBatchDelay 0: TorchServe's getJsonIntValue uses the default (100 ms)
    for any value <= 0, also where the entry is weighed against an archive's yaml."""
    models = {"m": {"1.0": {"maxBatchDelay": 0, "minWorkers": 0, "maxWorkers": 0}}}
    config = config_with(models, default_workers_per_model="2")
    settings = resolve(config, {})
    assert settings.max_batch_delay_ms == 100
    assert (settings.min_workers, settings.max_workers) == (2, 2)


def test_models_runtime_type_torchgate_cannot_run_is_refused() -> None:
    """TorchServe runs the version on its C++ backend: refused as a manifest runtime LSP is."""
    config = config_with({"m": {"1.0": {"runtimeType": "LSP"}}})
    with pytest.raises(ArchiveError, match=r"runtimeType 'LSP' is not supported \(only python"):
        resolve(config, {})
    with pytest.raises(ArchiveError):
        resolve(config, {}, "api", api={})
    # A restored snapshot keeps the manifest's runtime (TorchServe's setModelState).
    resolve(config, {}, "snapshot")


def test_models_runtime_type_python_is_accepted_and_unknown_warned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="api.model_config"):
        resolve(config_with({"m": {"1.0": {"runtimeType": "python3"}}}), {})
        assert caplog.text == ""
        resolve(config_with({"m": {"1.0": {"runtimeType": "java"}}}), {})
        resolve(config_with({"m": {"1.0": {"runtimeType": ["LSP"]}}}), {})
    assert "Model m version 1.0: models={...} runtimeType='java' is not a TorchServe" in (
        caplog.text
    )
    assert "runtimeType=['LSP'] is not a TorchServe runtime" in caplog.text
    assert "the manifest's runtime is used" in caplog.text


def test_unsupported_and_mistyped_keys_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    yaml = {
        "deviceType": "gpu",
        "continuousBatching": True,
        "batchSize": "8",
        "useVenv": "yes",
        "handler": {"anything": 1},
        "pt2": {"compile": True},
    }
    with caplog.at_level(logging.WARNING, logger="api.model_config"):
        settings = resolve(config_with(), yaml)
    assert settings.batch_size == 1 and settings.use_venv is False
    text = caplog.text
    assert "deviceType='gpu' is not implemented by torchgate" in text
    assert "continuousBatching=True is not implemented by torchgate" in text
    assert "batchSize='8' is not an integer" in text
    assert "useVenv='yes' is not true or false" in text
    assert "handler" not in text and "pt2" not in text  # the handler's keys


def test_sequence_batching_without_idle_time_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="api.model_config"):
        settings = resolve(config_with(), {"sequenceBatching": True, "maxNumSequence": 9})
    assert settings.sequence_batching is True
    assert settings.max_num_sequence == 1
    assert "sequenceMaxIdleMSec" in caplog.text
