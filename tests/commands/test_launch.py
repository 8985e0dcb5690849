"""`torchgate start`'s choices before anything starts: which snapshot it reads and writes."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from api.commands.launch import add_server_flags, config_path, prepare


def options(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_server_flags(parser)
    return parser.parse_known_args(list(argv))[0]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TS_CONFIG_FILE", raising=False)
    monkeypatch.delenv("LOG_LOCATION", raising=False)
    (tmp_path / "store").mkdir()
    return tmp_path


def test_a_named_config_file_writes_its_snapshot_and_does_not_read_it(workdir: Path) -> None:
    named = workdir / "named.properties"
    named.write_text("model_store=store\n")
    config = prepare(options("--ts-config", str(named)), config_path(str(named)))
    assert config.snapshot_file == workdir / "logs/config/torchgate/torchgate-snapshot.json"
    assert config.snapshot_restore is False


def test_state_is_kept_where_torchserve_keeps_it_not_beside_the_config(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KServe mounts config.properties' folder read-only: TorchServe writes key_file.json to
    its working directory and snapshots under $LOG_LOCATION/config, and so does `start`."""
    mounted = workdir / "mnt" / "config"
    mounted.mkdir(parents=True)
    (mounted / "config.properties").write_text(f"model_store={workdir / 'store'}\n")
    monkeypatch.setenv("LOG_LOCATION", str(workdir / "logs-here"))
    named = mounted / "config.properties"
    config = prepare(options("--ts-config", str(named)), config_path(str(named)))
    assert config.key_file == workdir / "key_file.json"
    assert config.snapshot_file == workdir / "logs-here/config/torchgate/torchgate-snapshot.json"
    # torchgate's own keys still say where, as they do for `torchgate serve`.
    (mounted / "config.properties").write_text(
        f"model_store={workdir / 'store'}\ntorchgate.key_file=keys.json\n"
    )
    config = prepare(options("--ts-config", str(named)), config_path(str(named)))
    assert config.key_file == mounted / "keys.json"


def test_keys_that_cannot_be_written_stop_the_start_with_one_line(workdir: Path) -> None:
    from api.app import build
    from api.config import ConfigError, load_config

    named = workdir / "named.properties"
    named.write_text("model_store=store\ntorchgate.key_file=no/such/folder/key_file.json\n")
    with pytest.raises(ConfigError, match="cannot write token authorization keys"):
        build(load_config(named), access_log=False)


def test_a_snapshot_folder_that_cannot_be_written_stops_the_start_with_one_line(
    workdir: Path,
) -> None:
    """Not a traceback at every later change, with no snapshot ever kept."""
    from api.app import build
    from api.config import ConfigError, load_config

    (workdir / "a-file").write_text("")  # a folder cannot be made below it (root or not)
    named = workdir / "named.properties"
    named.write_text(
        "model_store=store\ndisable_token_authorization=true\n"
        "torchgate.snapshot_file=a-file/config/snapshot.json\n"
    )
    with pytest.raises(ConfigError, match=r"cannot write snapshots to .*a-file/config"):
        build(load_config(named), access_log=False)


def test_without_a_config_file_the_last_snapshot_is_read_from_log_location(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = prepare(options("--model-store", "store"), config_path(None))
    assert config.snapshot_file == workdir / "logs/config/torchgate/torchgate-snapshot.json"
    assert config.snapshot_restore is True
    monkeypatch.setenv("LOG_LOCATION", str(workdir / "elsewhere"))
    config = prepare(options("--model-store", "store"), config_path(None))
    assert config.snapshot_file == workdir / "elsewhere/config/torchgate/torchgate-snapshot.json"


def test_an_implicit_config_properties_keeps_its_own_snapshot_setting(workdir: Path) -> None:
    """./config.properties read without being named: not named, so its snapshot is read; and
    `torchgate.snapshot_file=` (empty) there still means no snapshot at all."""
    (workdir / "config.properties").write_text("model_store=store\ntorchgate.snapshot_file=\n")
    config = prepare(options(), config_path(None))
    assert config.snapshot_file is None


def test_the_start_command_names_what_failed_to_load_from_the_snapshot_too(
    workdir: Path,
) -> None:
    """`torchgate start` echoes on stderr each model (and traffic policy) the server could not
    load, whether config.properties or the last snapshot asked for it."""
    from api.commands.launch import _load_failures

    log = workdir / "torchgate.log"
    log.write_text("before this start: could not load model: old.mar: gone\n")
    offset = log.stat().st_size
    with log.open("a") as file:
        file.write(
            "2026-12-07 ERROR api.model_loader: could not load model: a.mar: Model not found\n"
            "2026-12-07 ERROR api.snapshot: could not restore from snapshot: b 1.0: missing\n"
            "2026-12-07 ERROR api.snapshot: could not apply the traffic policy for b: 404\n"
            "2026-12-07 ERROR api.core.registry: c/1.0 worker 0 failed to start: ValueError\n"
            "2026-12-07 INFO api.server: serving\n"
        )
    assert _load_failures(log, offset) == [
        "could not load model: a.mar: Model not found",
        "could not restore from snapshot: b 1.0: missing",
        "could not apply the traffic policy for b: 404",
        "c/1.0 worker 0 failed to start: ValueError",
    ]


def test_torchserves_own_snapshot_is_named_with_how_to_start_from_it(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """TorchServe would start from its last snapshot; torchgate says so rather than start from
    config.properties in silence."""
    folder = workdir / "logs/config"
    folder.mkdir(parents=True)
    for name in ("20261206120000000-startup.cfg", "20261207093000123-snapshot.cfg"):
        (folder / name).write_text("model_store=store\n")
    prepare(options("--model-store", "store"), config_path(None))
    last = folder / "20261207093000123-snapshot.cfg"
    assert f"--ts-config {last}" in capsys.readouterr().err
    (folder / "torchgate-snapshot.json").write_text("{}")  # an earlier torchgate's: restored
    prepare(options("--model-store", "store"), config_path(None))
    assert "TorchServe's snapshot" not in capsys.readouterr().err
    named = workdir / "named.properties"  # a named file says what loads: nothing to say
    named.write_text("model_store=store\n")
    prepare(options("--ts-config", str(named)), config_path(str(named)))
    assert "TorchServe's snapshot" not in capsys.readouterr().err
