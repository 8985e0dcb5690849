"""`torchgate models`: what each action sends and how answers print (the real server is in
tests/integration/test_cli.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from api.commands import models


def request(*argv: str) -> tuple[str, str, dict[str, object], object]:
    return models._request(models.build_parser().parse_args(list(argv)))


def test_actions_map_to_the_management_api() -> None:
    assert request("list") == ("GET", "/models", {}, None)
    assert request("describe", "digits")[:2] == ("GET", "/models/digits/all")
    method, path, query, _ = request("scale", "digits", "2.0", "--min-worker", "2", "--json")
    assert (method, path, query["min_worker"], query["synchronous"]) == (
        "PUT",
        "/models/digits/2.0",
        2,
        "true",
    )
    assert request("set-default", "digits", "2.0")[:2] == ("PUT", "/models/digits/2.0/set-default")
    assert request("unregister", "digits")[:2] == ("DELETE", "/models/digits")
    method, path, query, _ = request("register", "x.mar", "--model-name", "x", "--async")
    assert (method, path, query["url"], query["synchronous"]) == (
        "POST",
        "/models",
        "x.mar",
        "false",
    )
    assert request("traffic", "digits", "--clear")[:2] == ("DELETE", "/models/digits/traffic")
    _, _, _, body = request(
        "traffic", "digits", "--weights", "1.0=95,2.0=5", "--no-sticky", "--shadow", "3.0:10"
    )
    assert body == {
        "weights": {"1.0": 95.0, "2.0": 5.0},
        "sticky_header": None,
        "shadow": {"version": "3.0", "percent": 10.0},
    }


def test_bad_weights_are_a_usage_error() -> None:
    with pytest.raises(ValueError, match="VERSION=WEIGHT"):
        request("traffic", "digits", "--weights", "1.0:95")


def test_address_and_token_from_config_and_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TORCHGATE_MANAGEMENT_URL", raising=False)
    monkeypatch.delenv("TORCHGATE_TOKEN", raising=False)
    monkeypatch.delenv("TS_CONFIG_FILE", raising=False)
    (tmp_path / "config.properties").write_text("management_address=http://0.0.0.0:9081\n")
    (tmp_path / "key_file.json").write_text(json.dumps({"management": {"key": "k1"}}))
    options = models.build_parser().parse_args(["list"])
    assert models.management_url(options) == "http://127.0.0.1:9081"
    assert models._auth(options) == {"Authorization": "Bearer k1"}
    monkeypatch.setenv("TORCHGATE_MANAGEMENT_URL", "http://h:1")
    assert models.management_url(options) == "http://h:1"


def test_tables() -> None:
    answer = [
        {
            "modelName": "digits",
            "modelVersion": "1.0",
            "defaultVersion": True,
            "status": "READY",
            "minWorkers": 1,
            "maxWorkers": 2,
            "batchSize": 8,
            "maxBatchDelay": 5,
            "workers": [{"status": "READY"}],
            "jobQueueStatus": {"pendingRequests": 0},
        }
    ]
    lines = models.render("describe", answer).split("\n")
    assert lines[0].split()[:3] == ["MODEL", "VERSION", "DEFAULT"]
    assert lines[1].split() == [
        "digits",
        "1.0",
        "yes",
        "READY",
        "1/1",
        "ready",
        "1-2",
        "8",
        "5",
        "0",
    ]
    assert models.render("list", {"models": []}) == "no models registered"
    assert models.render("scale", {"status": "ok"}) == "ok"
