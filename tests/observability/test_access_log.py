"""`api.observability.access_log`: one JSON line per answered request.

Switched by config, flag and level.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import httpx
import pytest

from api.app import build
from api.config import parse_config
from api.core.types import API_V2_REST, InferenceRequest, Prediction
from api.observability import access_log
from api.observability.access_log import ACCESS_LOGGER, AccessLog
from api.observability.compose import access_log_setting
from tests.support.fake_backend import load_fake_backend, write_fake_archive

# 2025-06-01T12:00:00.123456Z
NOW = 1748779200.123456


def log_with(lines: list[bytes]) -> AccessLog:
    return AccessLog(lines.append, clock=lambda: NOW)


def test_a_line_carries_every_field_as_json() -> None:
    lines: list[bytes] = []
    request = InferenceRequest({"body": b""}, {}, "req-1", API_V2_REST)
    prediction = Prediction(b"", queue_seconds=0.000_4567, batch_size=4)
    log_with(lines).request_finished(request, "digits", "2.0", 200, 0.001_2345, prediction)

    [line] = lines  # one write per line, the newline included
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {
        "time": "2025-06-01T12:00:00.123Z",
        "request_id": "req-1",
        "model": "digits",
        "version": "2.0",
        "api": "v2-rest",
        "status": 200,
        "latency_ms": 1.234,
        "queue_ms": 0.456,
        "batch_size": 4,
        "shadow": False,
    }


def test_a_request_that_failed_before_a_batch_has_no_queue_wait_or_batch() -> None:
    lines: list[bytes] = []
    request = InferenceRequest({}, {}, 'quote"and\\slash')
    log_with(lines).request_finished(request, "m", "1.0", 504, 120.0, None, shadow=True)
    entry = json.loads(lines[0])
    assert entry["request_id"] == 'quote"and\\slash'  # escaped by orjson, read back intact
    assert (entry["status"], entry["queue_ms"], entry["batch_size"]) == (504, None, None)
    assert entry["latency_ms"] == 120000.0 and entry["shadow"] is True


def test_time_is_utc_with_milliseconds_and_follows_the_clock() -> None:
    now = [NOW]
    lines: list[bytes] = []
    log = AccessLog(lines.append, clock=lambda: now[0])
    request = InferenceRequest({}, {}, "r")
    for step in (0.0, 0.0004, 0.9, 3600.0):
        now[0] = NOW + step
        log.request_finished(request, "m", "1", 200, 0.0, None)
    assert [json.loads(line)["time"] for line in lines] == [
        "2025-06-01T12:00:00.123Z",
        "2025-06-01T12:00:00.123Z",
        "2025-06-01T12:00:01.023Z",
        "2025-06-01T13:00:00.123Z",
    ]


def test_a_broken_stdout_turns_the_log_off_instead_of_failing_requests(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = []

    def broken(line: bytes) -> None:
        calls.append(line)
        raise BrokenPipeError(32, "Broken pipe")

    log = AccessLog(broken)
    request = InferenceRequest({}, {}, "r")
    log.request_finished(request, "m", "1", 200, 0.0, None)
    log.request_finished(request, "m", "1", 200, 0.0, None)
    assert len(calls) == 1 and not log.enabled
    assert "access log disabled" in caplog.text


def test_config_key_and_logger_level_switch_it() -> None:
    assert access_log_setting({}) is True
    assert access_log_setting({"torchgate.access_log": "false"}) is False
    assert access_log_setting({"torchgate.access_log": " True "}) is True
    logger = logging.getLogger(ACCESS_LOGGER)
    before = logger.level
    try:
        logger.setLevel(logging.INFO)
        assert AccessLog.wanted(True) and not AccessLog.wanted(False)
        logger.setLevel(logging.WARNING)  # --log-level warning
        assert not AccessLog.wanted(True)
    finally:
        logger.setLevel(before)


def post(
    tmp_path: Path, raw: dict[str, str], *, access_log: bool | None = None
) -> list[httpx.Response]:
    """Serve a fake model built from `raw` config keys and post two requests to it."""

    async def main() -> list[httpx.Response]:
        store = tmp_path / "model_store"
        write_fake_archive(store, "m", "1.0")
        config = parse_config(
            {"model_store": str(store), "load_models": "all",
             "disable_token_authorization": "true", "torchgate.snapshot_file": "", **raw},
            base_dir=tmp_path,
        )  # fmt: skip
        tg = build(
            config, work_dir=tmp_path / "w", backend_loader=load_fake_backend,
            access_log=access_log,
        )  # fmt: skip
        await tg.start()
        transport = httpx.ASGITransport(app=tg.inference_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://i") as client:
            responses = [
                await client.post("/predictions/m", content=b"a", headers={"X-Request-Id": "c1"}),
                await client.post("/predictions/m", content=b"b"),
            ]
        await tg.stop()
        return responses

    return asyncio.run(main())


def logged(capfd: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in capfd.readouterr().out.splitlines() if line]


def test_served_requests_are_logged_to_stdout_with_their_request_id(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    responses = post(tmp_path, {})  # on by default
    lines = logged(capfd)
    generated = responses[1].headers["x-request-id"]
    assert [line["request_id"] for line in lines] == ["c1", generated]
    assert all(line["model"] == "m" and line["status"] == 200 for line in lines)


def test_switched_off_by_config_and_back_on_by_the_flag(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    post(tmp_path / "off", {"torchgate.access_log": "false"})
    assert logged(capfd) == []
    post(tmp_path / "on", {"torchgate.access_log": "false"}, access_log=True)  # --access-log
    assert len(logged(capfd)) == 2


def test_off_below_info_level(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.WARNING)
    try:
        post(tmp_path, {})
    finally:
        logging.getLogger(ACCESS_LOGGER).setLevel(logging.NOTSET)
    assert logged(capfd) == []


def test_lines_of_one_loop_turn_go_out_in_one_write(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    writes: list[bytes] = []

    def record(fd: int, data: memoryview) -> int:
        writes.append(bytes(data))
        return len(data)

    monkeypatch.setattr(access_log.os, "write", record)
    with (tmp_path / "out").open("w") as out:
        monkeypatch.setattr(access_log.sys, "stdout", out)
        write = access_log.stdout_writer()

        async def one_turn() -> None:
            for n in range(3):
                write(b'{"n":%d}\n' % n)
            assert writes == []  # nothing yet: the flush runs at the end of this turn
            await asyncio.sleep(0)

        asyncio.run(one_turn())
        assert writes == [b'{"n":0}\n{"n":1}\n{"n":2}\n']
        write(b'{"n":3}\n')  # no running loop: written at once
        assert writes[-1] == b'{"n":3}\n'
