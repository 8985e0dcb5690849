"""The Makefile and scripts/install_tools.sh, checked without running what they install.

- `make tools` installs every command a test skips without: Prometheus, wrk, HAProxy and Java
  (TorchServe's JVM: the tests that compare with a real TorchServe skip when `java` is missing).
- install_tools.sh installs the Debian package that provides each command (`java` comes from
  `default-jre-headless`), and does nothing for a command already there.
- The protos stamp depends on every .proto, nested ones included.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install_tools.sh"
BASH = shutil.which("bash")
MAKE = shutil.which("make")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.skipif(BASH is None, reason="no bash")
def test_install_tools_maps_commands_to_debian_packages() -> None:
    assert BASH is not None
    result = run(BASH, str(SCRIPT), "--packages", "java", "wrk", "prometheus", "haproxy")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["default-jre-headless", "wrk", "prometheus", "haproxy"]


@pytest.mark.skipif(BASH is None, reason="no bash")
def test_install_tools_is_a_no_op_for_commands_present(tmp_path: Path) -> None:
    """A command on PATH: exit 0 without apt-get (a fake one here records any call)."""
    assert BASH is not None
    marker = tmp_path / "apt-get-ran"
    for name, body in (("mytool", "exit 0"), ("apt-get", f"touch {marker}"), ("sudo", '"$@"')):
        (tmp_path / name).write_text(f"#!/bin/sh\n{body}\n")
        (tmp_path / name).chmod(0o755)
    env = {**os.environ, "PATH": str(tmp_path)}
    result = run(BASH, str(SCRIPT), "mytool", env=env)
    assert result.returncode == 0, result.stderr
    assert not marker.exists()


@pytest.mark.skipif(MAKE is None, reason="no make")
def test_make_tools_installs_java_too() -> None:
    assert MAKE is not None
    result = run(MAKE, "-n", "tools")  # -n: prints the recipe, runs nothing
    assert result.returncode == 0, result.stderr
    (command,) = [line for line in result.stdout.splitlines() if "install_tools.sh" in line]
    tools = command.split("install_tools.sh", 1)[1].split("||")[0].split()
    assert {"prometheus", "wrk", "haproxy", "java"} <= set(tools), command


@pytest.mark.skipif(MAKE is None, reason="no make")
def test_protos_stamp_depends_on_every_proto() -> None:
    assert MAKE is not None
    # -p prints make's database (prerequisites expanded), -q runs no recipe.
    result = run(MAKE, "-p", "-q", "api/rpc/generated/.stamp")
    (rule,) = [
        line for line in result.stdout.splitlines() if line.startswith("api/rpc/generated/.stamp:")
    ]
    prerequisites = set(rule.split(":", 1)[1].split())
    protos = {str(p.relative_to(ROOT)) for p in (ROOT / "api/rpc/protos").rglob("*.proto")}
    assert "api/rpc/protos/google/rpc/status.proto" in protos
    assert protos <= prerequisites, protos - prerequisites
