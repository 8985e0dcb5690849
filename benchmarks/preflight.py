"""What a benchmark run needs before it starts, and how it stops when told to.

`missing_tools` names what a run would fail on minutes in (TorchServe's launcher next to this
Python, Java, wrk), so the command line can say it in one line before starting anything.

`exit_on_termination` makes SIGTERM (a CI job's timeout, `kill`) and SIGHUP (a closed terminal)
end the run as Ctrl-C does: they become SystemExit, so the servers' context managers run their
`finally` blocks. Without it the default action kills this process alone, and what it started
in sessions of their own lives on: TorchServe's Java frontend and Python workers, torchgate's
frontend, zygote and workers, and their temporary directories.
"""

from __future__ import annotations

import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

TERMINATING = (signal.SIGTERM, signal.SIGHUP)


def torchserve_launcher() -> Path:
    """Where tests.support.torchserve runs TorchServe from: next to this Python."""
    return Path(sys.executable).with_name("torchserve")


def missing_tools(*, torchserve: bool, wrk: bool) -> list[str]:
    """What is missing for a run that starts TorchServe and/or needs wrk; [] when nothing."""
    missing = []
    if torchserve:
        launcher = torchserve_launcher()
        if not launcher.is_file():
            missing.append(f"torchserve is not installed at {launcher} (pip install torchserve)")
        if shutil.which("java") is None:
            missing.append("java is not on PATH (TorchServe needs a JDK, 17 for 0.12)")
    if wrk and shutil.which("wrk") is None:
        missing.append("wrk is not on PATH (scripts/install_tools.sh wrk installs it)")
    return missing


@contextmanager
def exit_on_termination() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit(128 + signal) while inside; the previous handlers
    come back on the way out. After the first signal both are ignored, so that a second one
    cannot cut short the shutdown the first one started (Ctrl-C still can)."""

    def terminate(signum: int, frame: FrameType | None) -> None:
        for each in TERMINATING:
            signal.signal(each, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    previous = {each: signal.signal(each, terminate) for each in TERMINATING}
    try:
        yield
    finally:
        for each, handler in previous.items():
            signal.signal(each, handler)
