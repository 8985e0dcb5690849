"""config.properties keys of docs/security.md's "Inputs" section."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.config import ConfigError, parse_config


def test_defaults() -> None:
    config = parse_config({}, base_dir=Path())
    assert config.limit_max_image_pixels is True
    assert config.max_image_pixels == 40_000_000
    assert config.image_pixel_limit == 40_000_000
    assert config.max_items_per_request == 1024


def test_keys_are_read() -> None:
    config = parse_config(
        {
            "torchgate.max_image_pixels": "1000",
            "torchgate.max_items_per_request": "8",
        },
        base_dir=Path(),
    )
    assert (config.image_pixel_limit, config.max_items_per_request) == (1000, 8)


def test_limit_max_image_pixels_false_lifts_the_limit_as_in_torchserve() -> None:
    config = parse_config({"limit_max_image_pixels": "False"}, base_dir=Path())
    assert config.image_pixel_limit is None


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("limit_max_image_pixels", "no", "limit_max_image_pixels must be true or false"),
        ("torchgate.max_image_pixels", "40M", "torchgate.max_image_pixels must be a positive"),
        ("torchgate.max_image_pixels", "0", "torchgate.max_image_pixels must be a positive"),
        ("torchgate.max_items_per_request", "-1", "max_items_per_request must be a positive"),
    ],
)
def test_bad_values_are_refused(key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({key: value}, base_dir=Path())
