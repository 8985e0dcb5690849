"""What a start from the command line logs where TorchServe users look: TorchServe's
ts_log.log and model_log.log under $LOG_LOCATION (background and foreground starts alike), a
log folder that cannot be written (one line and exit code 2 for a background start, a warning
and serving on in the foreground), and the start-up warnings for metrics_mode and
system_metrics_cmd.

Servers run as real processes in a private working directory with a private TMPDIR (pid
files), on free ports (`tests.support.torchserve.free_addresses`).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from api.config import load_config, parse_config
from api.config_keys import METRICS_MODE_UNSET, check_keys, report, unset_keys
from tests.support.archives import build_archive
from tests.support.cli import run_torchgate
from tests.support.processes import wait_until
from tests.support.torchserve import free_addresses

ROOT = Path(__file__).resolve().parents[2]

TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d,\d{3}"

# Prints a line on each pipe per request, as the audit's handler did.
PRINTER = """
    import sys

    def handle(data, context):
        if data is None:
            return None
        print("HANDLE-PRINT stdout line", flush=True)
        print("HANDLE-PRINT stderr line", file=sys.stderr, flush=True)
        return ["ok" for _ in data]
"""


@dataclass
class Workdir:
    root: Path

    def environ(self, **extra: str) -> dict[str, str]:
        environ = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(self.root / "tmp")}
        environ.pop("LOG_LOCATION", None)  # TorchServe's default: ./logs
        environ.pop("TS_CONFIG_FILE", None)
        return {**environ, **extra}

    def torchgate(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return run_torchgate(*args, cwd=self.root, env=self.environ(**env))

    def config(self, **values: str) -> tuple[Path, str]:
        """A config on free ports with the printing model; returns it and the inference URL."""
        keys = {
            **free_addresses(),
            "model_store": str(self.root / "store"),
            "disable_token_authorization": "true",
            **values,
        }
        path = self.root / "config.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in keys.items()))
        return path, keys["inference_address"]


@pytest.fixture
def workdir(tmp_path: Path) -> Workdir:
    (tmp_path / "tmp").mkdir()
    (tmp_path / "store").mkdir()
    return Workdir(tmp_path)


def timeless(text: str) -> list[str]:
    return [re.sub(TIME, "<time>", line) for line in text.splitlines()]


@pytest.mark.integration
@pytest.mark.parametrize("background", [True, False], ids=["background", "foreground"])
def test_a_start_writes_torchserves_log_files(workdir: Workdir, background: bool) -> None:
    store = workdir.root / "store"
    build_archive(workdir.root, "printer", "handler.py", {"handler.py": PRINTER}, export_dir=store)
    config, inference = workdir.config(load_models="printer.mar", system_metrics_cmd="/bin/true")
    logs = workdir.root / "logs"
    with _started(workdir, config, background=background):
        answer = httpx.post(f"{inference}/predictions/printer", content=b"x", timeout=30)
        assert answer.status_code == 200, answer.text
        wait_until(lambda: "stderr line" in _read(logs / "model_log.log"), timeout=20)
    model_log = timeless(_read(logs / "model_log.log"))
    assert [line for line in model_log if "HANDLE-PRINT" in line] == [
        "<time> [INFO ] W-9000-printer_1.0-stdout MODEL_LOG - HANDLE-PRINT stdout line",
        "<time> [WARN ] W-9000-printer_1.0-stderr MODEL_LOG - HANDLE-PRINT stderr line",
    ]
    assert all(" MODEL_LOG - " in line for line in model_log)  # workers' output only
    ts_log = timeless(_read(logs / "ts_log.log"))
    assert set(model_log) <= set(ts_log)  # as TorchServe's MODEL_LOG, also in ts_log.log
    said = "\n".join(ts_log)
    assert "[INFO ] MainThread torchgate - torchgate serving 1 model version(s)" in said
    # uvicorn's lines go through the same handlers, with a time, not `INFO:     Started ...`
    assert re.search(r"<time> \[INFO \] MainThread uvicorn.error - Started server process", said)
    assert f"[WARN ] MainThread torchgate.config - {METRICS_MODE_UNSET}" in said
    assert "config key system_metrics_cmd is not supported by torchgate" in said
    access = timeless(_read(logs / "access_log.log"))
    assert re.fullmatch(
        r'<time> - /127\.0\.0\.1:\d+ "POST /predictions/printer HTTP/1\.1" 200 \d+', access[-1]
    ), access
    assert access[-1].split(" - ", 1)[1] in said  # and as an ACCESS_LOG record in ts_log.log
    # Metrics are on the metrics API, not in files (no ts_metrics.log, model_metrics.log).
    assert sorted(p.name for p in logs.iterdir() if p.is_file()) == sorted(
        [
            "ts_log.log",
            "model_log.log",
            "access_log.log",
            *(["torchgate.log"] if background else []),
        ]
    )
    if background:  # the console's own format stays as it was
        console = _read(logs / "torchgate.log")
        assert " INFO uvicorn.error: Started server process" in console
        assert "INFO:     Started server process" not in console
        assert " INFO torchgate.worker: [printer/1.0 w0] HANDLE-PRINT stdout line" in console


@pytest.mark.integration
def test_the_access_log_switch_turns_access_log_file_off_too(workdir: Workdir) -> None:
    store = workdir.root / "store"
    build_archive(workdir.root, "printer", "handler.py", {"handler.py": PRINTER}, export_dir=store)
    config, inference = workdir.config(
        load_models="printer.mar", **{"torchgate.access_log": "false"}
    )
    logs = workdir.root / "logs"
    with _started(workdir, config, background=False):
        answer = httpx.post(f"{inference}/predictions/printer", content=b"x", timeout=30)
        assert answer.status_code == 200, answer.text
        wait_until(lambda: "stderr line" in _read(logs / "model_log.log"), timeout=20)
    assert _read(logs / "access_log.log") == ""
    assert " ACCESS_LOG - " not in _read(logs / "ts_log.log")


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


@contextmanager
def _started(workdir: Workdir, config: Path, *, background: bool) -> Iterator[None]:
    """`torchgate start` (returns once it serves) or `torchgate start --foreground` (serves
    until SIGTERM), stopped on the way out."""
    args = ["start", "--ncs", f"--ts-config={config}"]
    if background:
        started = workdir.torchgate(*args)
        assert started.returncode == 0, started.stderr
        try:
            yield
        finally:
            stopped = workdir.torchgate("stop", f"--ts-config={config}")
            assert stopped.returncode == 0, stopped.stderr
        return
    with open(workdir.root / "console.log", "wb") as console:
        process = subprocess.Popen(
            [sys.executable, "-m", "api.cli", *args, "--foreground"],
            cwd=workdir.root,
            env=workdir.environ(),
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(
            lambda: (
                process.poll() is not None
                or "torchgate serving" in _read(workdir.root / "console.log")
            ),
            timeout=120,
        )
        assert process.poll() is None, _read(workdir.root / "console.log")
        yield
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_a_log_folder_that_cannot_be_written_stops_a_background_start_in_one_line(
    workdir: Workdir,
) -> None:
    """A background start died with a NotADirectoryError traceback; it needs the folder for
    its torchgate.log, and now stops with one line and exit code 2, before serving anything."""
    (workdir.root / "a-file").write_text("")
    config, _ = workdir.config()
    folder = workdir.root / "a-file" / "logs"
    done = workdir.torchgate("start", "--ncs", "--ts-config", str(config), LOG_LOCATION=str(folder))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"torchgate: cannot write logs to {folder}: Not a directory (LOG_LOCATION)"
    )
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "command",
    [["start", "--foreground"], ["--start", "--foreground"], ["serve"]],
    ids=["foreground", "torchserve-form", "serve"],
)
def test_a_log_folder_that_cannot_be_written_leaves_a_foreground_server_serving(
    workdir: Workdir, command: list[str]
) -> None:
    """As TorchServe, whose log4j reports the file it cannot write and serves on: a read-only
    working directory (a container's root) must not stop the server, which says so once."""
    (workdir.root / "a-file").write_text("")
    config, url = workdir.config()
    flag = "--config" if command == ["serve"] else "--ts-config"
    folder = workdir.root / "a-file" / "logs"
    console = workdir.root / "console.log"
    with open(console, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "api.cli", *command, "--ncs", flag, str(config)],
            cwd=workdir.root,
            env=workdir.environ(LOG_LOCATION=str(folder)),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(
            lambda: process.poll() is not None or "torchgate serving" in _read(console),
            timeout=120,
        )
        assert process.poll() is None, _read(console)
        assert httpx.get(url + "/ping", timeout=10).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    text = _read(console)
    warning = f"cannot write logs to {folder}: Not a directory (LOG_LOCATION): serving without"
    assert text.count(warning) == 1, text
    assert "Traceback" not in text


def test_a_config_without_metrics_mode_is_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """TorchServe's default, log, sends its metrics to ts_metrics.log and leaves GET /metrics
    empty: a config written for it finds them on the metrics API here, and is told so."""
    with caplog.at_level(logging.INFO, logger="torchgate.config"):
        report(parse_config({"job_queue_size": "9"}, base_dir=tmp_path))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [METRICS_MODE_UNSET]
    assert "ts_metrics.log" in METRICS_MODE_UNSET and "/metrics" in METRICS_MODE_UNSET
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="torchgate.config"):
        report(parse_config({"metrics_mode": "prometheus"}, base_dir=tmp_path))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_the_repositorys_own_config_is_not_warned_about_metrics_mode() -> None:
    assert unset_keys(load_config(ROOT / "config.properties").raw) == []


def test_system_metrics_cmd_is_unsupported_and_warned_about() -> None:
    """TorchServe 0.12 runs it instead of its system metrics collector; torchgate cannot."""
    (warning,) = check_keys({"system_metrics_cmd": "/opt/metrics.sh"})
    assert warning.startswith("config key system_metrics_cmd is not supported by torchgate")
