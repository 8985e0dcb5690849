"""`api.observability.log_files`: TorchServe's ts_log.log and model_log.log, in its layout."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from logging.handlers import RotatingFileHandler
from pathlib import Path

import pytest

from api.observability import log_files
from api.workers import output as output_module

# log4j's `%d{ISO8601} [%-5p] %t %c - %m%n`: `2026-12-08T00:00:29,343 [INFO ] main x - ...`
TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d,\d{3}"


@pytest.fixture
def installed(tmp_path: Path) -> Iterator[Path]:
    """The handlers on the root logger, at DEBUG, for one test; taken off again after it."""
    root = logging.getLogger()
    level = root.level
    handlers = log_files.install(tmp_path / "logs")
    root.setLevel(logging.DEBUG)
    try:
        yield tmp_path / "logs"
    finally:
        root.setLevel(level)
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_every_frontend_line_is_written_in_torchserves_layout(installed: Path) -> None:
    logger = logging.getLogger("torchgate.test_log_files")
    logger.info("serving %d model(s)", 2)
    logger.warning("a warning")  # log4j says WARN, not WARNING
    logger.error("an error")
    logger.debug("a detail")
    logger.critical("the end")  # log4j's FATAL
    written = lines(installed / "ts_log.log")
    assert [re.sub(TIME, "<time>", line) for line in written] == [
        "<time> [INFO ] MainThread torchgate.test_log_files - serving 2 model(s)",
        "<time> [WARN ] MainThread torchgate.test_log_files - a warning",
        "<time> [ERROR] MainThread torchgate.test_log_files - an error",
        "<time> [DEBUG] MainThread torchgate.test_log_files - a detail",
        "<time> [FATAL] MainThread torchgate.test_log_files - the end",
    ]
    assert (installed / "model_log.log").read_text() == ""  # only workers' output goes there


def test_the_time_is_iso8601_with_a_comma_before_the_milliseconds() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.created, record.msecs = 1_796_688_029.343, 343.0
    expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created)) + ",343"
    assert log_files.TorchServeFormatter().format(record) == f"{expected} [INFO ] MainThread x - m"


def test_a_traceback_follows_its_line(installed: Path) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("torchgate.test_log_files").exception("it failed")
    text = (installed / "ts_log.log").read_text()
    assert re.match(rf"{TIME} \[ERROR\] MainThread torchgate.test_log_files - it failed\n", text)
    assert "Traceback (most recent call last):" in text and "ValueError: boom" in text


def test_worker_output_goes_to_model_log_as_torchserve_writes_it(
    installed: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """TorchServe's frontend logs a worker's stdout at INFO and its stderr at WARN under
    MODEL_LOG, on the pipe's thread `W-<port>-<model>_<version>-stdout|stderr`, to
    model_log.log and ts_log.log; the console keeps torchgate's `[model/version wN]` line.
    The worker's own log lines (`LEVEL name: message` on stderr) keep their level."""
    name = log_files.worker_name(9001, "auditprint", "1.0")
    out = output_module.LogLines("auditprint/1.0 w0", worker_name=name)
    err = output_module.LogLines("auditprint/1.0 w0", stderr=True, worker_name=name)
    with caplog.at_level(logging.DEBUG, logger=output_module.worker_log.name):
        out.data_received(b"HANDLE-PRINT stdout line\n")
        err.data_received(b"HANDLE-PRINT stderr line\nINFO x: up\nERROR x: boom\n")
    expected = [
        "<time> [INFO ] W-9001-auditprint_1.0-stdout MODEL_LOG - HANDLE-PRINT stdout line",
        "<time> [WARN ] W-9001-auditprint_1.0-stderr MODEL_LOG - HANDLE-PRINT stderr line",
        "<time> [INFO ] W-9001-auditprint_1.0-stderr MODEL_LOG - INFO x: up",
        "<time> [ERROR] W-9001-auditprint_1.0-stderr MODEL_LOG - ERROR x: boom",
    ]
    for file in ("model_log.log", "ts_log.log"):
        assert [re.sub(TIME, "<time>", line) for line in lines(installed / file)] == expected
    assert [r.getMessage() for r in caplog.records] == [
        "[auditprint/1.0 w0] HANDLE-PRINT stdout line",
        "[auditprint/1.0 w0] HANDLE-PRINT stderr line",
        "[auditprint/1.0 w0] INFO x: up",
        "[auditprint/1.0 w0] ERROR x: boom",
    ]


def test_a_worker_without_a_torchserve_name_is_logged_as_any_frontend_line(
    installed: Path,
) -> None:
    """A pool used without the registry (tests, tools) names no worker: its lines are plain
    ts_log.log lines, and model_log.log stays empty."""
    output_module.LogLines("m/1.0 w0").data_received(b"printed\n")
    (line,) = lines(installed / "ts_log.log")
    assert re.fullmatch(
        rf"{TIME} \[INFO \] MainThread torchgate.worker - \[m/1.0 w0\] printed", line
    )
    assert (installed / "model_log.log").read_text() == ""


def test_importing_the_server_installs_no_log_files() -> None:
    """Only a start from the command line asks `api.server.run` for them: servers tests run
    in process write nothing into the working directory (the repository)."""
    import api.server  # noqa: F401

    root = logging.getLogger()
    assert not [h for h in root.handlers if isinstance(h, RotatingFileHandler)]


def test_files_roll_at_100_mb_keeping_5_as_torchserves(installed: Path) -> None:
    handlers = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, RotatingFileHandler) and Path(h.baseFilename).parent == installed
    ]
    assert sorted(Path(h.baseFilename).name for h in handlers) == ["model_log.log", "ts_log.log"]
    assert {(h.maxBytes, h.backupCount) for h in handlers} == {(100 * 1024 * 1024, 5)}


def test_the_folder_defaults_to_logs_in_the_working_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LOG_LOCATION", raising=False)
    assert log_files.log_folder() == Path("logs")
    monkeypatch.setenv("LOG_LOCATION", "/var/log/ts")
    assert log_files.log_folder() == Path("/var/log/ts")


def test_a_folder_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    for folder in (tmp_path / "a-file", tmp_path / "a-file" / "logs"):
        with pytest.raises(NotADirectoryError) as caught:
            log_files.check_folder(folder)
        assert log_files.describe_failure(folder, caught.value) == (
            f"cannot write logs to {folder}: Not a directory (LOG_LOCATION)"
        )
    log_files.check_folder(tmp_path / "new" / "logs")
    assert sorted(p.name for p in (tmp_path / "new" / "logs").iterdir()) == [
        "access_log.log",
        "model_log.log",
        "ts_log.log",
    ]


def test_worker_load_time_and_the_logs_name_a_worker_alike() -> None:
    assert log_files.worker_name(9000, "digits", "1.0") == "W-9000-digits_1.0"
    assert log_files.worker_stream("W-9000-digits_1.0", stderr=True) == "W-9000-digits_1.0-stderr"


class _FullDisk:
    """A file on a full disk: every write fails as ENOSPC does."""

    def write(self, text: str) -> int:
        raise OSError(28, "No space left on device")

    def flush(self) -> None:
        pass

    def tell(self) -> int:
        return 0


def test_a_file_that_cannot_be_written_says_so_once_not_a_traceback_per_line(
    installed: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The standard handler printed `--- Logging error ---` and a traceback to stderr for
    every record (on the event loop) while a disk was full; now one line, and one when the
    file is written again."""
    [ts_log] = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, log_files.LogFile) and h.baseFilename.endswith("ts_log.log")
    ]
    working, ts_log.stream = ts_log.stream, _FullDisk()  # type: ignore[assignment]
    log = logging.getLogger("torchgate.test")
    for n in range(5):
        log.info("lost %d", n)
    ts_log.stream = working
    log.info("written again")
    errors = capfd.readouterr().err
    assert errors.count("cannot write") == 1, errors
    assert "No space left on device (lines are lost)" in errors
    assert errors.count("ts_log.log again") == 1
    assert "Traceback" not in errors and "Logging error" not in errors
    assert lines(installed / "ts_log.log")[-1].endswith("torchgate.test - written again")


def test_a_file_rolls_over_by_its_size_alone(tmp_path: Path) -> None:
    handler = log_files.LogFile(tmp_path / "ts_log.log")
    handler.maxBytes = 100
    handler.setFormatter(log_files.TorchServeFormatter())
    try:
        for n in range(10):
            handler.emit(logging.makeLogRecord({"msg": f"line {n} " + "x" * 30}))
    finally:
        handler.close()
    assert (tmp_path / "ts_log.log.1").exists()
    assert (tmp_path / "ts_log.log").stat().st_size < 100 + 100  # one record (93 bytes) past
