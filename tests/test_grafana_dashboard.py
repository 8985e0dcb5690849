"""docker/grafana: every dashboard query names metrics and labels torchgate really exports.

The exported names come from the observer `torchgate serve` builds (`build_observability`)
after it has seen requests, rejections and batches, with a model registered and a fake NVML
standing in for a GPU (this machine has none), plus process metrics. Each PromQL expression is
reduced to its selectors (`metric{label=...}`), `by (...)` labels and `label_values(...)` calls;
every metric must be a sample name in that exposition, every label one its samples carry.
tests/integration/test_prometheus.py also runs each query against a real Prometheus.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from api.core.registry import Registry
from api.core.types import (
    API_TORCHSERVE_REST,
    REJECT_QUEUE_FULL,
    InferenceRequest,
    ModelSettings,
    Prediction,
)
from api.observability.compose import build_observability
from api.observability.gpu import GpuCollector
from tests.support.exposition import parse
from tests.support.fake_backend import FakeBackend
from tests.support.fake_nvml import FakeDevice, FakeNvml

GRAFANA = Path(__file__).resolve().parents[1] / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "torchgate.json"
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
            "unless", "offset", "inf", "nan"}  # fmt: skip

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_IDENTIFIER = re.compile(r"(?<![\w.$:])[a-zA-Z_:][a-zA-Z0-9_:]*")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
_MATCHER_NAME = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def exported() -> dict[str, set[str]]:
    """`{sample name: label names}` of what /metrics serves after some traffic."""

    async def main() -> str:
        nvml = FakeNvml([FakeDevice(used=1, total=2, utilization=50)])
        observability = build_observability(access_log=False, gpu=GpuCollector(
            hostname="h", nvml=nvml))  # fmt: skip
        metrics = observability.metrics
        registry = Registry(observability.observer)
        metrics.track(registry)

        async def backend() -> FakeBackend:
            return FakeBackend("m", "1.0")

        await registry.register("m", "1.0", "m.mar", backend, ModelSettings())
        request = InferenceRequest({}, {}, "r", API_TORCHSERVE_REST)
        metrics.request_finished(request, "m", "1.0", 200, 0.001, Prediction(b""))
        metrics.request_rejected("m", "1.0", REJECT_QUEUE_FULL)
        metrics.batch_finished("m", "1.0", 1, 0.001)
        text = metrics.render().decode()
        await registry.close()
        return text

    samples, _ = parse(asyncio.run(main()))
    names: dict[str, set[str]] = {}
    for sample in samples:
        names.setdefault(sample.name, set()).update(sample.labels)
    return names


@pytest.fixture(scope="module")
def exports() -> dict[str, set[str]]:
    return exported()


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", []) if "expr" in t]


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """`(metric, label names matched)` for each selector; functions and keywords left out."""
    found = []
    position = 0
    while match := _IDENTIFIER.search(expr, position):
        name, position = match.group(), match.end()
        rest = expr[position:].lstrip()
        if rest.startswith("(") or name.lower() in KEYWORDS:
            continue  # a function call (or an aggregation), or a keyword
        matchers = ""
        if rest.startswith("{"):  # skip the matchers: their label names are not metrics
            matchers = rest[: rest.index("}") + 1]
            position = expr.index("}", position) + 1
        found.append((name, set(_MATCHER_NAME.findall(matchers))))
    return found


def clean(expr: str) -> str:
    """The expression without strings, ranges, groupings and Grafana variables."""
    expr = _STRING.sub('""', expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = _GROUPING.sub("", expr)
    return re.sub(r"\$\{?\w+\}?", "", expr)


def test_the_dashboard_has_panels_for_what_the_issue_asks(dashboard: dict[str, Any]) -> None:
    titles = " | ".join(p["title"].lower() for p in panels(dashboard))
    for topic in ("throughput", "p50 / p95 / p99", "queue wait", "batch size", "error rate",
                  "gpu memory"):  # fmt: skip
        assert topic in titles, topic
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"model", "version"}


def problems_in(expr: str, exports: dict[str, set[str]]) -> list[str]:
    found = selectors(clean(expr))
    if not found:
        return [f"no metric found in {expr!r}"]
    problems = []
    available = set(TARGET_LABELS)
    for metric, labels in found:
        if metric not in exports:
            problems.append(f"{metric} is not exported")
            continue
        available |= exports[metric]
        if unknown := labels - exports[metric] - TARGET_LABELS:
            problems.append(f"{metric} has no label {sorted(unknown)}")
    for grouping in _GROUPING.findall(_STRING.sub('""', expr)):
        by = {label.strip() for label in grouping.split(",") if label.strip()}
        if unknown := by - available:
            problems.append(f"grouping by {sorted(unknown)} matches nothing")
    return problems


def test_every_query_names_exported_metrics_and_labels(
    dashboard: dict[str, Any], exports: dict[str, set[str]]
) -> None:
    problems = {expr: problems_in(expr, exports) for expr in exprs(dashboard)}
    assert {expr: found for expr, found in problems.items() if found} == {}


def test_variables_read_labels_torchgate_exports(
    dashboard: dict[str, Any], exports: dict[str, set[str]]
) -> None:
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]["query"]
        match = re.fullmatch(r"label_values\((\w+)(?:\{[^}]*\})?,\s*(\w+)\)", query)
        assert match is not None, query
        metric, label = match.groups()
        assert label in exports[metric], query


def test_panels_use_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
                                 .read_text())["datasources"]  # fmt: skip
    uids = {source["uid"] for source in provisioned}
    for panel in panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] in uids, panel["title"]
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "torchgate.yml")
                              .read_text())["providers"][0]  # fmt: skip
    assert provider["type"] == "file" and provider["options"]["path"]


def test_the_checker_catches_misspelt_metrics_and_labels(exports: dict[str, set[str]]) -> None:
    """The parsing above is only worth something if it finds names, and wrong ones."""
    expr = (
        "histogram_quantile(0.99, sum by (le, model) (rate(torchgate_request_latency_second_bucket"
        '{model=~"$model", shadow="false"}[$__rate_interval]))) / 1e6'
    )
    assert selectors(clean(expr)) == [
        ("torchgate_request_latency_second_bucket", {"model", "shadow"})
    ]
    assert problems_in(expr, exports) == [
        "torchgate_request_latency_second_bucket is not exported",
        "grouping by ['le', 'model'] matches nothing",
    ]
    assert problems_in('sum by (modle) (torchgate_queue_depth{versoin="1"})', exports) == [
        "torchgate_queue_depth has no label ['versoin']",
        "grouping by ['modle'] matches nothing",
    ]
    assert problems_in('sum by (job) (rate(process_cpu_seconds_total{job="x"}[1m]))', exports) == []
