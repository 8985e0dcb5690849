"""`api.observability.access_lines`: TorchServe's access_log.log, its lines and how they are
written (those of `FLUSH_S` together, copied to ts_log.log at INFO, rolled and failing as the
other log files). The lines beside TorchServe's own: tests/integration/test_access_log_file.py."""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.observability import access_lines, log_files
from api.observability.access_lines import AccessLines
from tests.support.aio import run

TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d,\d{3}"


@pytest.fixture
def root_level() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    level = root.level
    yield root
    root.setLevel(level)


def timeless(path: Path) -> list[str]:
    return [re.sub(TIME, "<time>", line) for line in path.read_text().splitlines()]


def test_lines_are_torchserves(tmp_path: Path) -> None:
    lines = AccessLines(tmp_path)
    started = time.monotonic() - 0.0125
    lines.http(("127.0.0.1", 53422), "POST", "/predictions/nope?x=1", "1.1", 404, started)
    lines.http(None, "GET", "/ping", "1.0", 200, time.monotonic())
    lines.grpc("ipv4:127.0.0.1:36204", "/inference.GRPCInferenceService/ServerLive", 0, started)
    lines.grpc("ipv6:[::1]:36205", "/inference.GRPCInferenceService/ModelInfer", 5, started)
    lines.close()
    written = [re.sub(r" \d+$", " <ms>", line) for line in timeless(tmp_path / "access_log.log")]
    assert written == [
        '<time> - /127.0.0.1:53422 "POST /predictions/nope?x=1 HTTP/1.1" 404 <ms>',
        '<time> - /unknown "GET /ping HTTP/1.0" 200 <ms>',
        '<time> - /127.0.0.1:36204 "gRPC inference.GRPCInferenceService/ServerLive HTTP/2.0" '
        "0 <ms>",
        '<time> - /::1:36205 "gRPC inference.GRPCInferenceService/ModelInfer HTTP/2.0" 5 <ms>',
    ]
    first_ms = int(timeless(tmp_path / "access_log.log")[0].rsplit(" ", 1)[1])
    assert 12 <= first_ms < 1000  # whole milliseconds since `started`


def test_lines_wait_for_one_write_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write per turn of the event loop was most of their cost on the hot path: the lines
    of `FLUSH_S` go out together."""
    lines = AccessLines(tmp_path)
    writes: list[str] = []
    write_text = lines._file.write_text

    def counted(text: str) -> None:
        writes.append(text)
        write_text(text)

    lines._file.write_text = counted  # type: ignore[method-assign]

    async def answer_batches() -> None:
        monkeypatch.setattr(access_lines, "FLUSH_S", 1000.0)
        for n in range(3):
            lines.http(("127.0.0.1", 1000 + n), "GET", "/ping", "1.1", 200, time.monotonic())
            await asyncio.sleep(0)  # turns of the loop go by: still together
        assert writes == []
        lines.flush()  # as the timer would
        assert len(writes) == 1 and writes[0].count("\n") == 3
        monkeypatch.setattr(access_lines, "FLUSH_S", 0.01)
        lines.http(("127.0.0.1", 2000), "GET", "/ping", "1.1", 200, time.monotonic())
        await asyncio.sleep(0.5)  # fifty times FLUSH_S: the timer wrote it
        assert len(writes) == 2

    run(answer_batches())
    lines.close()
    assert len((tmp_path / "access_log.log").read_text().splitlines()) == 4


def test_a_flush_due_on_a_loop_that_closed_is_made_on_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its timer went with the loop: lines after it waited for `close` (an in-process
    server's next `asyncio.run`)."""
    monkeypatch.setattr(access_lines, "FLUSH_S", 0.01)
    lines = AccessLines(tmp_path)

    async def answer(port: int) -> None:
        lines.http(("127.0.0.1", port), "GET", "/ping", "1.1", 200, time.monotonic())

    run(answer(1))  # the loop ends before FLUSH_S: its flush never runs

    async def answer_and_wait() -> None:
        await answer(2)
        await asyncio.sleep(0.5)

    run(answer_and_wait())
    assert len((tmp_path / "access_log.log").read_text().splitlines()) == 2
    lines.close()


def test_close_writes_what_waits(tmp_path: Path) -> None:
    async def answer_and_stop() -> None:
        lines = AccessLines(tmp_path)
        lines.http(("127.0.0.1", 1), "GET", "/ping", "1.1", 200, time.monotonic())
        lines.close()  # the server's stop: before FLUSH_S has passed

    run(answer_and_stop())
    assert len((tmp_path / "access_log.log").read_text().splitlines()) == 1


def test_ts_log_gets_the_lines_as_access_log_records_at_info(
    tmp_path: Path, root_level: logging.Logger
) -> None:
    ts_log = log_files.LogFile(tmp_path / "ts_log.log")
    lines = AccessLines(tmp_path, ts_log=ts_log)
    root_level.setLevel(logging.INFO)
    lines.http(("127.0.0.1", 53400), "GET", "/ping", "1.1", 200, time.monotonic())
    lines.flush()
    root_level.setLevel(logging.WARNING)  # --log-level warning: INFO records are left out
    lines.http(("127.0.0.1", 53401), "GET", "/ping", "1.1", 200, time.monotonic())
    lines.close()
    ts_log.close()
    assert timeless(tmp_path / "ts_log.log") == [
        '<time> [INFO ] MainThread ACCESS_LOG - /127.0.0.1:53400 "GET /ping HTTP/1.1" 200 0'
    ]
    assert len(timeless(tmp_path / "access_log.log")) == 2  # its own logger: always written


class _FullDisk:
    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None:
        pass

    def tell(self) -> int:
        return 0

    def close(self) -> None:
        pass


def test_a_file_that_cannot_be_written_says_so_once_and_when_it_is_again(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    lines = AccessLines(tmp_path)
    working, lines._file.stream = lines._file.stream, _FullDisk()  # type: ignore[assignment]
    for _ in range(3):
        lines.http(("127.0.0.1", 1), "GET", "/lost", "1.1", 200, time.monotonic())
        lines.flush()
    lines._file.stream = working
    lines.http(("127.0.0.1", 1), "GET", "/written", "1.1", 200, time.monotonic())
    lines.close()
    errors = capfd.readouterr().err
    assert errors.count("cannot write") == 1, errors
    assert "access_log.log: [Errno 28] No space left on device (lines are lost)" in errors
    assert errors.count("access_log.log again") == 1
    assert "Traceback" not in errors
    assert [line.split('"')[1] for line in timeless(tmp_path / "access_log.log")] == [
        "GET /written HTTP/1.1"
    ]
