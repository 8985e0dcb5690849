"""Observability: Prometheus metrics, GPU metrics, handlers' custom metrics and the access log.

compose.py          puts them together (`build_observability`, called by `api.app.build`)
metrics.py          the Prometheus observer and /metrics text
gpu.py              GPU metrics per device (NVML)
handler_metrics.py  handlers' `context.metrics` calls
access_log.py       one JSON line per answered request
"""
