"""Work folders of killed servers are removed at the next start, and only theirs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from api.backends.workdir import PREFIX, make_work_dir, remove_orphans


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def folder(root: Path, pid: int, payload: int = 1024) -> Path:
    path = root / f"{PREFIX}{pid}-abc123"
    (path / "digits-1.0-xyz").mkdir(parents=True)
    (path / "digits-1.0-xyz" / "model.onnx").write_bytes(b"\0" * payload)
    return path


def test_folders_of_dead_servers_go_and_live_ones_stay(tmp_path: Path) -> None:
    gone = folder(tmp_path, dead_pid(), payload=3 << 20)
    mine = make_work_dir(tmp_path)
    assert mine.name.startswith(f"{PREFIX}{os.getpid()}-")
    parent = folder(tmp_path, os.getppid())  # another live process: another server's
    unrelated = [tmp_path / "torchgate-models", tmp_path / f"{PREFIX}notapid-x", tmp_path / "x"]
    for path in unrelated:
        path.mkdir()
    assert remove_orphans(tmp_path) == [gone]
    assert not gone.exists()
    assert mine.exists() and parent.exists()
    assert all(path.exists() for path in unrelated)


def test_a_reused_pid_does_not_keep_a_dead_servers_folder(tmp_path: Path) -> None:
    """The folder was last written long before the process now holding its pid started."""
    stale = folder(tmp_path, os.getpid())
    os.utime(stale, (1_000_000, 1_000_000))  # 1970: before this test process started
    fresh = make_work_dir(tmp_path)
    assert remove_orphans(tmp_path) == [stale]
    assert fresh.exists()


def test_a_link_or_file_with_the_name_is_never_followed(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.mkdir()
    (target / "keep").write_text("x")
    pid = dead_pid()
    (tmp_path / f"{PREFIX}{pid}-link").symlink_to(target)
    (tmp_path / f"{PREFIX}{pid}-file").write_text("x")
    assert remove_orphans(tmp_path) == []
    assert (target / "keep").exists()


def test_a_missing_temp_dir_is_not_an_error(tmp_path: Path) -> None:
    assert remove_orphans(tmp_path / "absent") == []
