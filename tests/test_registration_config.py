"""config.properties keys of docs/security.md's "Registration and the management API"."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.config import Config, ConfigError, parse_config


def test_defaults_are_the_safe_ones() -> None:
    config = Config()
    assert config.allowed_urls == []  # the model store only; TorchServe's allows any path
    assert not config.allows_url("file:///etc/passwd")
    assert not config.allows_url("torchserve://10.0.0.1:8080")
    assert config.archive_max_bytes == 4 * 1024**3
    assert config.archive_max_members == 10_000
    assert config.archive_max_ratio == 100
    assert config.cors_allowed_origin == () and config.allowed_hosts == ()
    assert config.enable_model_api is False


def test_keys_are_read(tmp_path: Path) -> None:
    config = parse_config(
        {
            "allowed_urls": r"file:///srv/models/.*, torchserve://ts:808[01]",
            "torchgate.archive_max_bytes": "1048576",
            "torchgate.archive_max_members": "50",
            "torchgate.archive_max_ratio": "20.5",
            "cors_allowed_origin": "https://a.example,https://b.example",
            "torchgate.allowed_hosts": "Gateway.Internal, ops",
        },
        base_dir=tmp_path,
    )
    assert config.allowed_urls == [r"file:///srv/models/.*", "torchserve://ts:808[01]"]
    assert config.allows_url("file:///srv/models/a.mar")
    assert config.allows_url("torchserve://ts:8081")
    assert not config.allows_url("torchserve://ts:8082")
    assert (config.archive_max_bytes, config.archive_max_members) == (1048576, 50)
    assert config.archive_max_ratio == 20.5
    assert config.cors_allowed_origin == ("https://a.example", "https://b.example")
    assert config.allowed_hosts == ("gateway.internal", "ops")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("allowed_urls", "file://(unclosed", "is not a regex"),
        ("torchgate.archive_max_bytes", "0", "must be a positive number"),
        ("torchgate.archive_max_members", "-1", "must be a positive number"),
        ("torchgate.archive_max_members", "many", "archive_max_members must be a number"),
        ("torchgate.archive_max_ratio", "0.5", "must be >= 1"),
        ("torchgate.archive_max_ratio", "nan", "must be >= 1"),
    ],
)
def test_invalid_values_are_refused_naming_the_key(
    tmp_path: Path, key: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({key: value}, base_dir=tmp_path)
