"""Start a real Prometheus server for a test, query it, and leave nothing behind.

    config = scrape_config_from(Path("docker/prometheus.yml"), {"torchgate": "127.0.0.1:18082"})
    with running_prometheus(config) as prometheus:
        prometheus.query('sum by (model) (rate(torchgate_requests_total[15s]))')

The binary is Debian's `prometheus` package (`scripts/install_tools.sh prometheus`, run by
`make test`). Storage goes to a private temporary directory, the web listener to a free
127.0.0.1 port; on exit the server gets SIGTERM, then SIGKILL if it is still there after 10 s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.torchserve import free_ports

START_TIMEOUT_S = 30.0


def prometheus_binary() -> str | None:
    found = shutil.which("prometheus")
    if found is None and Path("/usr/bin/prometheus").exists():
        found = "/usr/bin/prometheus"
    return found


def scrape_config_from(
    path: Path, targets: Mapping[str, str], *, interval: str = "1s"
) -> dict[str, Any]:
    """The config at `path` with each job's targets replaced by `targets[job]`.

    Jobs not named in `targets` are dropped (their servers do not run in the test); intervals
    become `interval` so a test sees data within seconds.
    """
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    config.setdefault("global", {}).update(
        {"scrape_interval": interval, "evaluation_interval": interval}
    )
    jobs = []
    for job in config.get("scrape_configs", []):
        name = job["job_name"]
        if name in targets:
            job["static_configs"] = [{"targets": [targets[name]]}]
            job["scrape_interval"] = interval
            job["scrape_timeout"] = interval
            jobs.append(job)
    config["scrape_configs"] = jobs
    return config


@dataclass(frozen=True)
class Prometheus:
    url: str  # http://127.0.0.1:PORT, no trailing slash
    workdir: Path

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; returns `data`, raises AssertionError when status is not success."""
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:  # 400/422: a bad query; the body says why
            body = json.load(exc)
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector: `[{"metric": {...}, "value": [ts, "1.5"]}, ...]`."""
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result


@contextmanager
def running_prometheus(config: Mapping[str, Any]) -> Iterator[Prometheus]:
    binary = prometheus_binary()
    if binary is None:
        raise RuntimeError("prometheus is not installed: run scripts/install_tools.sh prometheus")
    with tempfile.TemporaryDirectory(prefix="torchgate-prometheus-") as tmp:
        workdir = Path(tmp)
        config_file = workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(dict(config)))
        [port] = free_ports(1)
        log = (workdir / "prometheus.log").open("wb")
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        prometheus = Prometheus(f"http://127.0.0.1:{port}", workdir)
        try:
            _wait_ready(prometheus, process)
            yield prometheus
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
            log.close()


def _wait_ready(prometheus: Prometheus, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = (prometheus.workdir / "prometheus.log").read_text(errors="replace")
            raise RuntimeError(f"prometheus exited with {process.returncode}:\n{log[-3000:]}")
        try:
            with urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"prometheus was not ready within {START_TIMEOUT_S:g} s")
