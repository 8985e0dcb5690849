"""config.properties' models={...} at start, side by side with TorchServe 0.12: load_models
decides what loads and under which name (its `name=`, else the manifest's) and version (the
manifest's); an entry only gives the settings of the name and version it is keyed by. An entry
keyed by another name or version is not used (torchgate says so in a warning), and never
renames or re-versions the archive its marName points at."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.archives import ECHO, build_archive
from tests.support.side_by_side import Endpoints, side_by_side

pytestmark = [pytest.mark.integration, pytest.mark.torchserve]

MODELS = {
    # marName names echo.mar, but the key is another name: TorchServe registers "echo" with
    # the defaults and never serves "renamed".
    "renamed": {"1.0": {"marName": "echo.mar", "batchSize": 4, "maxBatchDelay": 50}},
    # echo.mar is version 1.0: an entry for 2.0 describes nothing loaded.
    "echo": {"2.0": {"marName": "echo.mar", "batchSize": 3}},
    # The positive control: other.mar is other 1.0, so this entry gives its settings.
    "other": {"1.0": {"marName": "other.mar", "batchSize": 4, "maxBatchDelay": 7}},
}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models-key")


@pytest.fixture(scope="module")
def servers(work: Path) -> Iterator[dict[str, Endpoints]]:
    store = work / "store"
    store.mkdir()
    for name in ("echo", "other"):
        build_archive(work, name, "echo.py", {"echo.py": ECHO}, export_dir=store)
    config = {"default_workers_per_model": "1", "models": json.dumps(MODELS)}
    with side_by_side(store, config, workdir=work / "torchgate") as found:
        yield found


@pytest.fixture(scope="module")
def torchgate_log(servers: dict[str, Endpoints], work: Path) -> str:
    return (work / "torchgate" / "torchgate.log").read_text()


def both(servers: dict[str, Endpoints], method: str, api: str, path: str) -> dict[str, Any]:
    answers = {}
    for name, ends in servers.items():
        base = ends.management if api == "management" else ends.inference
        answer = httpx.request(method, base + path, content=b"hi", timeout=60)
        json_body = answer.headers.get("content-type", "").startswith("application/json")
        answers[name] = (answer.status_code, answer.json() if json_body else answer.text)
    return answers


def test_models_register_under_their_own_names(servers: dict[str, Endpoints]) -> None:
    answers = both(servers, "GET", "management", "/models")
    assert answers["torchgate"] == answers["torchserve"]
    names = [model["modelName"] for model in answers["torchgate"][1]["models"]]
    assert sorted(names) == ["echo", "other"]


@pytest.mark.parametrize(
    "path", ["/predictions/echo", "/predictions/echo/1.0", "/predictions/renamed"]
)
def test_the_archive_answers_under_its_own_name_and_version(
    servers: dict[str, Endpoints], path: str
) -> None:
    answers = both(servers, "POST", "inference", path)
    assert answers["torchgate"][0] == answers["torchserve"][0], answers


@pytest.mark.parametrize(
    ("model", "expected"), [("echo", (1, 100)), ("other", (4, 7))]
)  # fmt: skip
def test_an_entry_gives_the_settings_of_its_own_name_and_version(
    servers: dict[str, Endpoints], model: str, expected: tuple[int, int]
) -> None:
    answers = both(servers, "GET", "management", f"/models/{model}")
    for name, (status, described) in answers.items():
        assert status == 200, name
        [version] = described
        assert (version["batchSize"], version["maxBatchDelay"]) == expected, name


def test_unused_entries_are_named_in_a_warning(torchgate_log: str) -> None:
    for model, version in (("renamed", "1.0"), ("echo", "2.0")):
        assert f"models.{model}.{version} (marName echo.mar) is not used" in torchgate_log
    assert "models.other.1.0" not in torchgate_log
