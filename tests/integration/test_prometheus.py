"""A real Prometheus scrapes a real `torchgate serve`, configured from docker/prometheus.yml.

torchgate serves a one-line handler archive (built here with torch-model-archiver) that also
records a custom metric; traffic runs in a thread while the test asks Prometheus' HTTP API for
the request rate and the p99 latency per model, the TorchServe-named counters, the handler's
metric, and evaluates every query of the Grafana dashboard. Everything is bounded in time and
both servers are stopped at the end.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.archives import build_archive
from tests.support.prometheus import (
    Prometheus,
    prometheus_binary,
    running_prometheus,
    scrape_config_from,
)
from tests.support.server import running_torchgate

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        prometheus_binary() is None,
        reason="prometheus is not installed (make test runs scripts/install_tools.sh prometheus)",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "torchgate.json"
WINDOW = "20s"  # rate() window: several 1 s scrapes
HANDLER = """\
def handle(data, context):
    if data is None:
        return None
    context.metrics.add_counter("EchoRequests", len(data))
    return [{"ok": True} for _ in data]
"""


@dataclass(frozen=True)
class Gateway:
    inference_url: str
    metrics_target: str  # host:port, as Prometheus wants it


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    work = tmp_path_factory.mktemp("prom-it")
    store = work / "store"
    build_archive(work, "echo", "echo_handler.py", {"echo_handler.py": HANDLER}, export_dir=store)
    config = (
        f"model_store={store}\nload_models=echo.mar\n"
        'models={"echo": {"1.0": {"marName": "echo.mar", "batchSize": 4, "maxBatchDelay": 2}}}\n'
        "torchgate.access_log=false\n"
    )
    with running_torchgate(config, args=["--ncs", "--log-level", "warning"]) as tg:
        yield Gateway(tg.inference_url, tg.metrics_url.removeprefix("http://"))


@pytest.fixture(scope="module")
def prometheus(gateway: Gateway) -> Iterator[Prometheus]:
    config = scrape_config_from(
        ROOT / "docker" / "prometheus.yml", {"torchgate": gateway.metrics_target}
    )
    with running_prometheus(config) as server:
        yield server


@pytest.fixture(scope="module")
def traffic(gateway: Gateway) -> Iterator[Callable[[], int]]:
    """Requests in a background thread for the module's duration; returns the count sent."""
    stop = threading.Event()
    sent = [0]
    failures: list[str] = []  # asserted here, in the test's thread, not in the sender's

    def send() -> None:
        with httpx.Client(base_url=gateway.inference_url, timeout=10) as client:
            while not stop.is_set():
                response = client.post(
                    "/predictions/echo", json={"x": 1}, headers={"X-Request-Id": f"it-{sent[0]}"}
                )
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text}")
                sent[0] += 1
                time.sleep(0.002)  # a steady few hundred requests/s, not a CPU hog

    def count() -> int:
        assert not failures, failures[:3]
        return sent[0]

    thread = threading.Thread(target=send, name="traffic", daemon=True)
    thread.start()
    yield count
    stop.set()
    thread.join(15)
    assert not failures, failures[:3]


def test_prometheus_yml_names_the_compose_services() -> None:
    import yaml

    config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
        for job in config["scrape_configs"]
    }
    assert targets == {"torchgate": ["gateway:8082"], "torchserve": ["torchserve:8082"]}


def test_request_rate_and_p99_latency_per_model(
    prometheus: Prometheus, traffic: Callable[[], int]
) -> None:
    rate = _wait_for(prometheus, f"sum by (model) (rate(torchgate_requests_total[{WINDOW}]))")
    assert [s["metric"] for s in rate] == [{"model": "echo"}]
    assert 0 < _value(rate[0]) < 10_000

    p99 = _wait_for(
        prometheus,
        "histogram_quantile(0.99, sum by (le, model) "
        f"(rate(torchgate_request_latency_seconds_bucket[{WINDOW}])))",
    )
    assert [s["metric"] for s in p99] == [{"model": "echo"}]
    assert 0 < _value(p99[0]) < 1.0
    assert traffic() > 0

    up = prometheus.query('up{job="torchgate"}')
    assert [_value(s) for s in up] == [1.0]


def test_torchserve_names_and_handler_metrics_are_scraped(
    prometheus: Prometheus, traffic: Callable[[], int]
) -> None:
    for expr in (
        f"sum by (model_name, model_version) (rate(ts_inference_requests_total[{WINDOW}]))",
        f"sum by (model_name) (rate(ts_inference_latency_microseconds[{WINDOW}]))",
        f"sum by (model_name) (rate(ts_queue_latency_microseconds[{WINDOW}]))",
    ):
        result = _wait_for(prometheus, expr)
        assert result[0]["metric"]["model_name"] == "echo"
        assert _value(result[0]) > 0

    # TorchServe's type metadata survives the scrape: these are counters, as TorchServe writes.
    metadata = prometheus.api("metadata", metric="ts_inference_latency_microseconds")
    assert metadata["ts_inference_latency_microseconds"][0]["type"] == "counter"

    handler = _wait_for(prometheus, 'EchoRequests{ModelName="echo"}')
    assert _value(handler[0]) > 0
    assert handler[0]["metric"]["Level"] == "Model"


def test_every_dashboard_query_evaluates(
    prometheus: Prometheus, traffic: Callable[[], int]
) -> None:
    _wait_for(prometheus, f"sum(rate(torchgate_requests_total[{WINDOW}]))")
    dashboard = json.loads(DASHBOARD.read_text())
    empty = []
    for expr in _dashboard_exprs(dashboard):
        concrete = (
            expr.replace("$__rate_interval", WINDOW).replace("$model", ".*")
            .replace("$version", ".*")
        )  # fmt: skip
        if not prometheus.query(concrete):  # raises on a query Prometheus rejects
            empty.append(expr)
    # Without a GPU the GPU series are absent; this traffic has no errors and no rejections.
    unexplained = [e for e in empty if not re.search(r"_gpu_|rejected|4\.\.\|5\.\.", e)]
    assert unexplained == []
    assert len(empty) <= 5


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        for nested in [panel, *panel.get("panels", [])]:
            exprs += [t["expr"] for t in nested.get("targets", []) if t.get("expr")]
    return exprs


def _wait_for(prometheus: Prometheus, expr: str, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Poll until the query returns a non-empty vector with a positive finite first value."""
    deadline = time.monotonic() + timeout_s
    result: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        result = prometheus.query(expr)
        if result and math.isfinite(_value(result[0])) and _value(result[0]) > 0:
            return result
        time.sleep(0.5)
    raise AssertionError(f"{expr} gave no positive value within {timeout_s:g} s: {result}")


def _value(sample: dict[str, Any]) -> float:
    return float(sample["value"][1])
