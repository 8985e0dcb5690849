"""The model name and version rule, and that the registry applies it to every source."""

from __future__ import annotations

import asyncio

import pytest

from api.core.names import check_model_name, check_model_version
from api.core.registry import Registry
from api.core.types import Backend, ModelSettings
from api.errors import BadRequest, http_status


@pytest.mark.parametrize("name", ["digits", "minilm-v2", "a_b.c", "9lives", "A" * 255])
def test_torchserve_names_pass(name: str) -> None:
    check_model_name(name)


@pytest.mark.parametrize(
    "name",
    ["../../x", "a\nb", "a/b", "", ".hidden", "-flag", "a b", "a%0ab", "é", "A" * 256, "a\x00"],
)
def test_names_that_could_escape_a_path_or_forge_a_log_line_are_refused(name: str) -> None:
    with pytest.raises(BadRequest, match="Invalid model name") as info:
        check_model_name(name)
    assert http_status(info.value) == 400


@pytest.mark.parametrize("version", ["1.0", "2", "v3-rc1", "1.0+cpu", "2024_01"])
def test_plain_versions_pass(version: str) -> None:
    check_model_version(version)


@pytest.mark.parametrize("version", ["../1", "1.0\n", "1/0", "", " 1", "1 0"])
def test_versions_with_path_or_control_characters_are_refused(version: str) -> None:
    with pytest.raises(BadRequest, match="Invalid model version"):
        check_model_version(version)


def test_a_version_the_traffic_api_would_shadow_is_refused() -> None:
    # /models/{m}/traffic is the traffic policy API: the management API could not reach it.
    with pytest.raises(BadRequest, match="reserved") as info:
        check_model_version("traffic")
    assert http_status(info.value) == 400
    check_model_version("traffic-2")  # only the exact name


def test_the_registry_refuses_a_bad_name_before_loading_anything() -> None:
    loaded: list[str] = []

    async def factory() -> Backend:
        loaded.append("x")
        raise AssertionError("the backend must not load")

    async def scenario() -> None:
        registry = Registry()
        for name, version in (("../../x", "1.0"), ("a\nb", "1.0"), ("ok", "1.0\nforged")):
            with pytest.raises(BadRequest):
                await registry.register(name, version, "x.mar", factory, ModelSettings())
        assert registry.names() == [] and loaded == []

    asyncio.run(scenario())
