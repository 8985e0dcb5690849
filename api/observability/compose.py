"""Puts metrics and the access log together; `api.app.build` calls `build_observability`.

    observer (what the core calls)  = Observers(PrometheusObserver, AccessLog)  or the first alone
    PrometheusObserver collectors    + SystemCollector, GpuCollector, HandlerMetrics,
                                       RegistryCollector (track()), rendered off the loop
    HandlerMetrics.on_metric         -> every local backend's `context.metrics`

The access log is on unless `torchgate.access_log=false` (config.properties) or
`torchgate serve --no-access-log`, and only while the `torchgate.access` logger takes INFO
(`--log-level warning` silences it with the rest).
"""

from __future__ import annotations

from dataclasses import dataclass

from api.core.types import Observer, Observers
from api.observability.access_log import AccessLog
from api.observability.gpu import GpuCollector
from api.observability.handler_metrics import HandlerMetrics
from api.observability.metrics import PrometheusObserver
from api.observability.system import SystemCollector

ACCESS_LOG_KEY = "torchgate.access_log"


@dataclass(eq=False)
class Observability:
    metrics: PrometheusObserver
    handler_metrics: HandlerMetrics
    access_log: AccessLog | None
    # What the registry, batchers and dataplane call.
    observer: Observer


def access_log_setting(raw: dict[str, str]) -> bool:
    """`torchgate.access_log` from config.properties; on when absent."""
    return raw.get(ACCESS_LOG_KEY, "true").strip().lower() not in ("false", "0", "no", "off")


def build_observability(
    *, access_log: bool, system_metrics: bool = True, gpu: GpuCollector | None = None
) -> Observability:
    """`system_metrics` False (TorchServe's disable_system_metrics=true): no host (CPU,
    memory, disk) or GPU metrics, as TorchServe then collects none."""
    metrics = PrometheusObserver()
    handler_metrics = HandlerMetrics(hostname=metrics.hostname)
    metrics.add_collector(handler_metrics)
    metrics.add_text(handler_metrics.counters_text)
    if system_metrics:
        metrics.add_collector(SystemCollector(hostname=metrics.hostname))
        metrics.add_collector(gpu or GpuCollector(hostname=metrics.hostname))
    log = AccessLog() if AccessLog.wanted(access_log) else None
    observer: Observer = metrics if log is None else Observers(metrics, log)
    return Observability(metrics, handler_metrics, log, observer)
