"""Process groups and adoption: what a handler starts cannot outlive its worker or the zygote.

Real processes (`sh`, `sleep`). The subreaper test runs in a child Python: a pytest process
that adopted orphans would collect other tests' processes too.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from api.workers import descendants
from tests.support.processes import alive, process_table, wait_until


def members(group: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `group`."""
    return [pid for pid, fields in process_table() if int(fields[2]) == group and fields[0] != "Z"]


def test_killing_a_group_ends_the_helpers_left_in_it() -> None:
    leader = subprocess.Popen(["sh", "-c", "sleep 60 & wait"], start_new_session=True)
    wait_until(lambda: len(members(leader.pid)) == 2)  # sh and its sleep
    descendants.kill_group(leader.pid)
    assert leader.wait(timeout=10) == -9
    wait_until(lambda: not members(leader.pid), timeout=10)
    descendants.kill_group(leader.pid)  # an empty group: nothing to do, no error


def test_adopted_lists_children_the_caller_did_not_fork_as_workers() -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:
        assert child.pid in descendants.adopted(())
        assert child.pid not in descendants.adopted({child.pid})
    finally:
        child.kill()
        child.wait()


def test_a_subreaper_ends_and_reaps_the_orphans_below_it() -> None:
    script = textwrap.dedent(
        """
        import os, subprocess, time
        from api.workers import descendants

        descendants.become_subreaper()
        # sh exits at once: its background processes become orphans, adopted by this one. One
        # ends by itself, one ignores SIGTERM.
        subprocess.run(
            ["sh", "-c", "sleep 60 & sleep 0.2 & (trap '' TERM; exec sleep 60) &"], check=True
        )
        time.sleep(0.1)
        orphans = descendants.adopted(())
        assert len(orphans) == 3, orphans
        time.sleep(0.5)  # the short one has ended: a zombie until reaped
        descendants.reap_adopted(())
        left = descendants.adopted(())
        assert len(left) == 2, left
        started = time.monotonic()
        descendants.end_adopted(())
        took = time.monotonic() - started
        assert descendants.adopted(()) == []
        assert not any(os.path.exists(f"/proc/{pid}") for pid in left)
        # SIGTERM first; SIGKILL only for the one that ignored it, after the grace period.
        assert descendants.TERM_GRACE_S <= took < descendants.SHUTDOWN_S, took
        print(*left)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    assert not any(alive(int(pid)) for pid in result.stdout.split())
