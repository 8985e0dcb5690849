"""`metrics_config` (TorchServe's metrics.yaml) and `model_metrics_auto_detect`.

TorchServe reads the `model_metrics` section of its metrics.yaml twice: each Python worker
creates those metrics in its metrics cache up front (so a handler's
`context.metrics.get_metric("InferenceRequestCount", MetricTypes.COUNTER)` finds them), and the
frontend exports, in `metrics_mode=prometheus`, only the metrics declared there, unless
`model_metrics_auto_detect=true` lets it take any metric a handler sends. The section looks like

    dimensions:
      - &model_name "ModelName"
      - &level "Level"
    model_metrics:
      counter:
        - name: InferenceRequestCount
          unit: count
          dimensions: []
      gauge:
        - name: SizeOfImage
          unit: kB
          dimensions: [*model_name, *level]
      histogram: [...]

torchgate does the same with `metrics_config=` set: workers pre-create the declared metrics
(`api.workers.main`), and /metrics drops undeclared handler metrics (one warning each) unless
auto-detect is on (`api.handler_metrics`). As TorchServe's frontend, /metrics looks a handler
metric up by its name only: an update of a declared metric is recorded under the declared type,
unit and dimensions whatever type the handler wrote it with (`MetricsSpec.declared`). Without
`metrics_config`, workers get TorchServe's default declarations (HandlerTime and PredictionTime)
and /metrics exports every handler metric, as torchgate always has (TorchServe would drop
undeclared ones; docs/compatibility.md). The
`ts_metrics` section describes TorchServe's own frontend metrics: torchgate exports its own
(TorchServe's names), so that section is not read, and says so.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

KINDS = ("counter", "gauge", "histogram")


class MetricsConfigError(ValueError):
    """metrics_config names a file that is not a usable metrics.yaml."""


@dataclass(frozen=True, slots=True)
class DeclaredMetric:
    """One entry of model_metrics; pickled into each worker's spec."""

    name: str
    unit: str
    kind: str  # counter, gauge or histogram
    dimensions: tuple[str, ...]


# TorchServe's ts/configs/metrics.yaml model_metrics, used without metrics_config.
DEFAULT_MODEL_METRICS = (
    DeclaredMetric("HandlerTime", "ms", "gauge", ("ModelName", "Level")),
    DeclaredMetric("PredictionTime", "ms", "gauge", ("ModelName", "Level")),
)


@dataclass(frozen=True, slots=True)
class MetricsSpec:
    """Which handler metrics exist up front, and which /metrics exports."""

    model_metrics: tuple[DeclaredMetric, ...] = DEFAULT_MODEL_METRICS
    # The metrics_config file; None: TorchServe's defaults, and every metric is exported.
    source: Path | None = None
    auto_detect: bool = False
    # model_metrics by name; for a name declared under several types the last of counter,
    # gauge, histogram, the order in which TorchServe's MetricCache puts them in its map.
    _by_name: Mapping[str, DeclaredMetric] = field(
        init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        by_name: dict[str, DeclaredMetric] = {}
        for kind in KINDS:
            by_name.update((m.name, m) for m in self.model_metrics if m.kind == kind)
        object.__setattr__(self, "_by_name", by_name)

    def declared(self, name: str) -> DeclaredMetric | None:
        """The declaration of the handler metric `name`, looked up by name only, as TorchServe's
        frontend does (`MetricCache.getMetricBackend(name)`): /metrics records its every update
        under the declared type, unit and dimensions, whatever type the handler wrote."""
        return self._by_name.get(name)

    def exports(self, name: str) -> bool:
        """Whether /metrics shows the handler metric `name` (of any type)."""
        return self.source is None or self.auto_detect or name in self._by_name


def load_metrics_spec(path: Path | None, *, auto_detect: bool) -> MetricsSpec:
    """Read `path` (a metrics.yaml); raises MetricsConfigError naming the problem."""
    if path is None:
        return MetricsSpec(auto_detect=auto_detect)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise MetricsConfigError(f"metrics_config {path}: cannot read it: {exc}") from exc
    if not isinstance(document, dict):
        raise MetricsConfigError(f"metrics_config {path}: not a YAML mapping")
    if "ts_metrics" in document:
        log.warning(
            "metrics_config %s: the ts_metrics section is not read: torchgate exports its own "
            "frontend metrics under TorchServe's names (docs/compatibility.md)",
            path,
        )
    section = document.get("model_metrics")
    if not isinstance(section, dict) or not section:
        # TorchServe's workers refuse to start with "Missing `model_metrics` specification".
        raise MetricsConfigError(f"metrics_config {path}: no model_metrics section")
    return MetricsSpec(tuple(_declared(path, section)), path, auto_detect)


def _declared(path: Path, section: dict[str, Any]) -> list[DeclaredMetric]:
    metrics = []
    for kind, entries in section.items():
        if kind not in KINDS:
            raise MetricsConfigError(
                f"metrics_config {path}: model_metrics.{kind} is not one of {', '.join(KINDS)}"
            )
        for entry in entries or []:
            try:
                name, unit, dimensions = entry["name"], entry["unit"], entry["dimensions"]
            except (KeyError, TypeError) as exc:
                raise MetricsConfigError(
                    f"metrics_config {path}: model_metrics.{kind} entry {entry!r} needs name, "
                    f"unit and dimensions"
                ) from exc
            if not isinstance(name, str) or not isinstance(unit, str):
                raise MetricsConfigError(
                    f"metrics_config {path}: {entry!r}: name and unit must be strings"
                )
            if not isinstance(dimensions, list) or not all(isinstance(d, str) for d in dimensions):
                raise MetricsConfigError(
                    f"metrics_config {path}: {name}: dimensions must be a list of names"
                )
            metrics.append(DeclaredMetric(name, unit, kind, tuple(dimensions)))
    return metrics
