"""The config.properties keys of KServe's layout: `model_snapshot` and `service_envelope`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from api.config import ConfigError, parse_config

SNAPSHOT = {
    "name": "startup.cfg",
    "modelCount": 2,
    "models": {
        "digits": {
            "1.0": {"defaultVersion": True, "marName": "digits.mar", "batchSize": 8},
            "2.0": {"marName": "digits_v2.mar", "maxBatchDelay": 7},
        }
    },
}


def test_model_snapshot_alone_says_what_loads(tmp_path: Path) -> None:
    raw = {
        "model_snapshot": json.dumps(SNAPSHOT),
        "load_models": "other.mar",  # not read: TorchServe restores the snapshot instead
        "models": json.dumps({"other": {"1.0": {"marName": "other.mar"}}}),
    }
    config = parse_config(raw, base_dir=tmp_path)
    assert [(m.name, m.version, m.mar_name, m.default) for m in config.models] == [
        ("digits", "1.0", "digits.mar", True),
        ("digits", "2.0", "digits_v2.mar", False),
    ]
    assert config.models[0].settings.batch_size == 8
    assert config.models[1].settings.max_batch_delay_ms == 7
    assert config.load_models == "digits.mar,digits_v2.mar"


@pytest.mark.parametrize("value", ["{not json", "[1, 2]"])
def test_a_malformed_model_snapshot_is_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="model_snapshot"):
        parse_config({"model_snapshot": value}, base_dir=tmp_path)


def test_service_envelope_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="api.config"):
        parse_config({"service_envelope": "kserve"}, base_dir=tmp_path)
    assert "service_envelope=kserve has no effect" in caplog.text
