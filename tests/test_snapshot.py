"""The state snapshot: atomic writes, crash leftovers, and a restart restoring everything.

Restarts here are in-process (a second `build` from the same config.properties); the
integration tests restart the real server, after SIGTERM and after kill -9.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

import api.snapshot
from api.app import Torchgate, build
from api.cli import main as cli_main
from api.config import Config, ConfigError, load_config
from api.core.routing import TrafficPolicy
from api.snapshot import Snapshotter, read_snapshot, write_atomic
from tests.support.aio import run
from tests.support.fake_backend import load_fake_backend, write_fake_archive
from tests.support.torchserve import free_addresses

CONFIG = """\
model_store=model_store
load_models=all
disable_token_authorization=true
enable_model_api=true
models={"m": {"1.0": {"marName": "m-1.0.mar", "defaultVersion": true}, \\
              "2.0": {"marName": "m-2.0.mar", "batchSize": 2, "maxBatchDelay": 3, \\
                      "startupTimeout": 45}}}
torchgate.traffic={"m": {"weights": {"1.0": 80, "2.0": 20}}}
"""


def config_in(tmp_path: Path, text: str = CONFIG) -> Path:
    store = tmp_path / "model_store"
    for name, version in (("m", "1.0"), ("m", "2.0"), ("m", "3.0"), ("n", "1.0")):
        write_fake_archive(store, name, version)
    path = tmp_path / "config.properties"
    path.write_text(text)
    return path


async def started(config: Config, tmp_path: Path) -> Torchgate:
    tg = build(config, work_dir=tmp_path / "work", backend_loader=load_fake_backend)
    await tg.start()
    return tg


def state(tg: Torchgate) -> dict[str, Any]:
    """What must survive a restart, read from the running instance."""
    assert tg.router is not None
    versions = {}
    for v in tg.registry:
        s = v.settings
        versions[f"{v.name}/{v.version}"] = {
            "url": v.url,
            "default": tg.registry.default_version(v.name) == v.version,
            "workers": (len(v.workers), s.min_workers, s.max_workers),
            "batch": (s.batch_size, s.max_batch_delay_ms, s.response_timeout_s),
            "startup_timeout": s.startup_timeout_s,
        }
    policies = {m: p.to_json() for m, p in tg.router.policies().items()}
    return {"versions": versions, "traffic": policies}


# -- the file -----------------------------------------------------------------------------------


def test_write_atomic_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "snap.json"
    write_atomic(path, b'{"a": 1}')
    write_atomic(path, b'{"a": 2}')
    assert json.loads(path.read_text()) == {"a": 2}
    assert os.listdir(path.parent) == ["snap.json"]  # no temp file left behind


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_crash_mid_write_keeps_the_previous_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    path = tmp_path / "snap.json"
    write_atomic(path, b'{"generation": 1}')

    def crash(*args: Any) -> None:
        raise OSError(f"{failing}: disk on fire")

    monkeypatch.setattr(api.snapshot.os, failing, crash)
    with pytest.raises(OSError, match="disk on fire"):
        write_atomic(path, b'{"generation": 2, "and a lot more": "' + b"x" * 100_000 + b'"}')
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"generation": 1}
    assert os.listdir(tmp_path) == ["snap.json"]


def test_leftover_and_truncated_temp_files_are_ignored_and_removed(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = load_config(config_in(tmp_path))
        tg = await started(config, tmp_path)
        saved = state(tg)
        await tg.stop()
        snapshot = config.snapshot_file
        assert snapshot is not None and snapshot.exists()
        # What a kill between write and rename leaves: temp files, one of them torn.
        good = snapshot.read_text()
        (snapshot.parent / f".{snapshot.name}.a1b2.tmp").write_text(good)
        (snapshot.parent / f".{snapshot.name}.c3d4.tmp").write_text(good[: len(good) // 2])
        (snapshot.parent / f".{snapshot.name}.e5f6.tmp").write_bytes(b"")

        tg = await started(config, tmp_path)
        assert state(tg) == saved and tg.startup_errors == []
        assert sorted(os.listdir(snapshot.parent)) == [snapshot.name]
        await tg.stop()

    run(scenario())


def test_an_unreadable_snapshot_is_moved_aside_and_config_is_used(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = load_config(config_in(tmp_path))
        assert config.snapshot_file is not None
        config.snapshot_file.parent.mkdir(parents=True)
        config.snapshot_file.write_text('{"name": "torchgate-snapshot", "models": {"m":')
        tg = await started(config, tmp_path)
        assert sorted(state(tg)["versions"]) == ["m/1.0", "m/2.0", "m/3.0", "n/1.0"]
        aside = config.snapshot_file.with_name(config.snapshot_file.name + ".corrupt")
        assert aside.read_text().endswith('"m":')
        assert read_snapshot(config.snapshot_file) is not None  # a fresh, whole one
        await tg.stop()

    run(scenario())


def test_snapshot_files_left_in_torchserves_folder_move_into_torchgates(tmp_path: Path) -> None:
    """Earlier releases wrote them to logs/config itself, where TorchServe fails to start."""

    async def scenario() -> None:
        config = load_config(config_in(tmp_path))
        assert config.snapshot_file is not None
        legacy = tmp_path / "logs/config"
        legacy.mkdir(parents=True)
        tg = await started(config, tmp_path)
        transport = httpx.ASGITransport(app=tg.management_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            assert (await client.delete("/models/n/1.0")).status_code == 200
        versions = sorted(state(tg)["versions"])
        assert "n/1.0" not in versions  # so a restart from config.properties would differ
        await tg.stop()
        config.snapshot_file.replace(legacy / "torchgate-snapshot.json")
        (legacy / "torchgate-snapshot.json.prev-20261207T000000.000000Z").write_text("{}")
        (legacy / ".torchgate-snapshot.json.abc.tmp").write_text("{")
        config.snapshot_file.parent.rmdir()
        tg = await started(load_config(config_in(tmp_path)), tmp_path)
        assert sorted(state(tg)["versions"]) == versions  # restored from the moved file
        await tg.stop()
        assert [p.name for p in legacy.iterdir()] == ["torchgate"]
        assert sorted(p.name for p in config.snapshot_file.parent.iterdir()) == [
            "torchgate-snapshot.json",
            "torchgate-snapshot.json.prev-20261207T000000.000000Z",
        ]
        # One left there beside a snapshot in the new place moves too, kept, not restored.
        (legacy / "torchgate-snapshot.json").write_text("{}")
        tg = await started(load_config(config_in(tmp_path)), tmp_path)
        assert sorted(state(tg)["versions"]) == versions
        await tg.stop()
        assert [p.name for p in legacy.iterdir()] == ["torchgate"]
        kept = config.snapshot_file.with_name("torchgate-snapshot.json.legacy")
        assert kept.read_text() == "{}"

    run(scenario())


# -- restart ------------------------------------------------------------------------------------


def test_a_restart_restores_models_versions_defaults_workers_batching_and_traffic(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        config = load_config(
            config_in(
                tmp_path, CONFIG.replace("load_models=all", "load_models=m-1.0.mar,m-2.0.mar")
            )
        )
        assert config.snapshot_file == tmp_path / "logs/config/torchgate/torchgate-snapshot.json"
        tg = await started(config, tmp_path)
        assert tg.router is not None and tg.router.policy("m") is not None  # torchgate.traffic
        transport = httpx.ASGITransport(app=tg.management_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            calls = [
                ("POST", "/models?url=n-1.0.mar&batch_size=4&max_batch_delay=9&initial_workers=2"),
                ("POST", "/models?url=m-3.0.mar&model_name=m"),
                ("PUT", "/models/m/1.0?min_worker=2&max_worker=3&synchronous=true"),
                ("PUT", "/models/m/2.0?batch_size=8&max_batch_delay=7&synchronous=true"),
                ("PUT", "/models/m/2.0/set-default"),
                ("DELETE", "/models/m/traffic"),
                ("DELETE", "/models/m/3.0"),
            ]
            for method, url in calls:
                response = await client.request(method, url)
                assert response.status_code == 200, (url, response.text)
            policy = {
                "weights": {"1.0": 10, "2.0": 90},
                "sticky_header": "X-Tenant",
                "shadow": {"version": "1.0", "percent": 25},
            }
            response = await client.put("/models/m/traffic", json=policy)
            assert response.status_code == 200
        saved = state(tg)
        assert saved["versions"]["m/1.0"]["workers"] == (2, 2, 3)
        assert saved["versions"]["m/2.0"]["batch"][:2] == (8, 7.0)
        assert saved["versions"]["m/2.0"]["default"] and "m/3.0" not in saved["versions"]
        assert saved["versions"]["m/2.0"]["startup_timeout"] == 45
        assert saved["versions"]["n/1.0"]["workers"] == (2, 2, 2)
        await tg.stop()

        # The config still says 80/20 traffic and default 1.0: the snapshot wins.
        tg = await started(config, tmp_path)
        assert tg.startup_errors == []
        assert state(tg) == saved
        # Restored models are the start-up models (where /invocations without a name goes),
        # as models restored from TorchServe's model_snapshot are.
        assert tg.loader.startup_models == {"m", "n"}
        await tg.stop()

    run(scenario())


def test_a_restored_snapshot_says_what_it_overrides_and_can_be_written_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`serve`: the snapshot wins over load_models/models=, and the log says so as a WARNING.
    `snapshot_restore=False` (`torchgate start` with a named config file, as TorchServe): the
    config loads and the snapshot is only written."""

    async def scenario() -> None:
        config = load_config(
            config_in(tmp_path, CONFIG.replace("load_models=all", "load_models=m-1.0.mar"))
        )
        tg = await started(config, tmp_path)
        await tg.stop()
        config = load_config(
            config_in(tmp_path, CONFIG.replace("load_models=all", "load_models=m-2.0.mar"))
        )
        with caplog.at_level(logging.WARNING, logger="api.snapshot"):
            tg = await started(config, tmp_path)
        assert [f"{v.name}/{v.version}" for v in tg.registry] == ["m/1.0"]  # the snapshot's
        assert "are not used while it exists" in caplog.text
        await tg.stop()
        config.snapshot_restore = False
        tg = await started(config, tmp_path)
        assert [f"{v.name}/{v.version}" for v in tg.registry] == ["m/2.0"]  # the config's
        await tg.stop()
        assert config.snapshot_file is not None
        saved = read_snapshot(config.snapshot_file)
        assert saved is not None and set(saved["models"]["m"]) == {"2.0"}  # still written

    run(scenario())


def test_a_snapshot_not_restored_is_still_written_once_and_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`snapshot_restore=False` (a named config file): written once, after everything loaded,
    and written even when nothing loads, so a stale snapshot of an earlier run cannot come
    back at a later start without a config file."""
    writes: list[int] = []
    real_write = api.snapshot.write_atomic

    def recording(path: Path, data: bytes) -> None:
        writes.append(json.loads(data)["modelCount"])
        real_write(path, data)

    monkeypatch.setattr(api.snapshot, "write_atomic", recording)

    async def scenario() -> None:
        config = load_config(config_in(tmp_path))
        config.snapshot_restore = False
        tg = await started(config, tmp_path)
        await tg.stop()
        assert writes == [2]
        empty = "model_store=model_store\ndisable_token_authorization=true\n"
        config = load_config(config_in(tmp_path, empty))
        config.snapshot_restore = False
        tg = await started(config, tmp_path)
        await tg.stop()
        assert config.snapshot_file is not None
        saved = read_snapshot(config.snapshot_file)
        assert saved is not None and saved["models"] == {}

    run(scenario())


def test_start_writes_the_snapshot_once_after_everything_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[dict[str, Any]] = []
    real_write = api.snapshot.write_atomic

    def recording(path: Path, data: bytes) -> None:
        writes.append(json.loads(data))
        real_write(path, data)

    monkeypatch.setattr(api.snapshot, "write_atomic", recording)

    async def scenario() -> None:
        config = load_config(config_in(tmp_path))
        for _ in range(2):  # from config.properties, then from the snapshot
            tg = await started(config, tmp_path)
            await tg.stop()
        assert len(writes) == 2
        assert writes[0]["modelCount"] == writes[1]["modelCount"] == 2
        assert writes[0]["models"] == writes[1]["models"]
        assert writes[1]["traffic"] == {
            "m": {"weights": {"1.0": 80, "2.0": 20}, "sticky_header": "X-User-Id", "shadow": None}
        }

    run(scenario())


def test_a_version_that_fails_to_restore_does_not_stop_the_others(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = load_config(config_in(tmp_path))
        tg = await started(config, tmp_path)
        await tg.stop()
        assert config.snapshot_file is not None
        whole = config.snapshot_file.read_bytes()
        archive = tmp_path / "model_store" / "m-2.0.mar"
        moved = archive.rename(tmp_path / "m-2.0.mar")  # a model store not all there yet
        tg = await started(config, tmp_path)
        assert sorted(state(tg)["versions"]) == ["m/1.0", "m/3.0", "n/1.0"]
        assert len(tg.startup_errors) == 2  # the version, and the policy that names it
        assert tg.router is not None and tg.router.policy("m") is None
        await tg.stop()
        # The snapshot written since has lost m/2.0 and its policy; the one it came from is
        # kept, and renamed back it restores them once the archive is there again.
        (previous,) = config.snapshot_file.parent.glob(config.snapshot_file.name + ".prev-*")
        assert previous.read_bytes() == whole
        moved.rename(archive)
        previous.replace(config.snapshot_file)
        tg = await started(config, tmp_path)
        assert tg.startup_errors == []
        assert sorted(state(tg)["versions"]) == ["m/1.0", "m/2.0", "m/3.0", "n/1.0"]
        await tg.stop()

    run(scenario())


def test_a_policy_sending_traffic_to_a_version_not_ready_at_start_stands(tmp_path: Path) -> None:
    """A version without a live worker at start-up (no workers by default here, m 1.0 one; a
    first start failing or a remote TorchServe not up yet alike) keeps its share of the policy,
    from config.properties and from the snapshot: the ready versions serve it until it is ready,
    then it serves. (A models= minWorkers of 0 means the default, as in TorchServe.)"""
    text = CONFIG.replace("load_models=all\n", "load_models=all\ndefault_workers_per_model=0\n")
    text = text.replace('"defaultVersion": true}', '"defaultVersion": true, "minWorkers": 1}')
    configured = TrafficPolicy({"1.0": 80, "2.0": 20})

    async def scenario() -> None:
        config = load_config(config_in(tmp_path, text))
        for from_snapshot in (False, True):
            tg = await started(config, tmp_path)
            assert tg.startup_errors == []
            assert not tg.registry.get("m", "2.0").ready
            assert tg.router is not None and tg.router.policy("m") == configured
            assert {tg.router.choose("m", {}).version for _ in range(100)} == {"1.0"}
            if from_snapshot:
                transport = httpx.ASGITransport(app=tg.management_app)
                async with httpx.AsyncClient(
                    transport=transport, base_url="http://localhost"
                ) as client:
                    url = "/models/m/2.0?min_worker=1&synchronous=true"
                    assert (await client.put(url)).status_code == 200
                chosen = {tg.router.choose("m", {}).version for _ in range(200)}
                assert chosen == {"1.0", "2.0"}
            await tg.stop()

    run(scenario())


def test_a_version_without_traffic_that_fails_to_restore_leaves_the_policy(
    tmp_path: Path,
) -> None:
    """As when it is unregistered: its weight-0 entry goes, the rest of the policy stands."""
    text = CONFIG.replace('"1.0": 80, "2.0": 20', '"1.0": 100, "2.0": 0')

    async def scenario() -> None:
        config = load_config(config_in(tmp_path, text))
        tg = await started(config, tmp_path)
        await tg.stop()
        (tmp_path / "model_store" / "m-2.0.mar").unlink()  # a model store not all there yet
        tg = await started(config, tmp_path)
        assert len(tg.startup_errors) == 1  # the version only
        assert tg.router is not None and tg.router.policy("m") == TrafficPolicy({"1.0": 100})
        await tg.stop()

    run(scenario())


def test_a_configured_blank_sticky_header_still_starts_as_not_sticky(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`"sticky_header": ""` meant not sticky before the API refused it: a config written
    then keeps its policy, with a warning, rather than losing it at start-up."""
    text = CONFIG.replace('"2.0": 20}}', '"2.0": 20}, "sticky_header": ""}')

    async def scenario() -> None:
        config = load_config(config_in(tmp_path, text))
        with caplog.at_level(logging.WARNING, logger="api.snapshot"):
            tg = await started(config, tmp_path)
        assert tg.startup_errors == []
        assert tg.router is not None
        assert tg.router.policy("m") == TrafficPolicy({"1.0": 80, "2.0": 20}, sticky_header=None)
        assert 'sticky_header": "" is read as null' in caplog.text
        await tg.stop()

    run(scenario())


def test_snapshots_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = config_in(tmp_path, CONFIG + "torchgate.snapshot_file=\n")
    assert load_config(path).snapshot_file is None
    # Free ports: `serve` checks its listeners before it runs, and the defaults may be taken.
    listeners = "".join(f"{key}={value}\n" for key, value in free_addresses().items())
    custom = config_in(
        tmp_path, CONFIG + listeners + f"torchgate.snapshot_file={tmp_path}/s/x.json\n"
    )
    assert load_config(custom).snapshot_file == tmp_path / "s/x.json"

    seen: list[Config] = []
    monkeypatch.setattr("api.server.run", lambda config, **options: seen.append(config))
    assert cli_main(["serve", "--config", str(custom), "--ncs"]) == 0
    assert cli_main(["serve", "--config", str(custom)]) == 0
    assert seen[0].snapshot_file is None and seen[1].snapshot_file is not None

    async def scenario() -> None:
        tg = await started(seen[0], tmp_path)
        assert tg.snapshotter is None
        await tg.stop()
        assert not (tmp_path / "s").exists()

    run(scenario())


def test_snapshotter_logs_a_failed_write_and_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        config = load_config(config_in(tmp_path))
        tg = await started(config, tmp_path)
        assert isinstance(tg.snapshotter, Snapshotter)
        tg.snapshotter.path = tmp_path / "config.properties" / "not-a-dir.json"
        tg.registry.set_default("m", "2.0")  # the change stands though it could not be saved
        assert tg.registry.default_version("m") == "2.0"
        await tg.stop()

    run(scenario())
    assert "could not write snapshot" in caplog.text


@pytest.mark.parametrize(
    "value", ['{"m": ', '["not", "an", "object"]', '{"m": [1]}', '{"m": "50/50"}']
)
def test_a_malformed_torchgate_traffic_key_is_a_config_error(tmp_path: Path, value: str) -> None:
    path = config_in(tmp_path, f"torchgate.traffic={value}\n")
    with pytest.raises(ConfigError, match=r"torchgate\.traffic"):
        load_config(path)
