"""Observability: Prometheus metrics, GPU metrics, handlers' custom metrics, the access log and
TorchServe's log files.

compose.py          puts them together (`build_observability`, called by `api.app.build`)
metrics.py          the Prometheus observer and /metrics text
gpu.py              GPU metrics per device (NVML)
handler_metrics.py  handlers' `context.metrics` calls
access_log.py       one JSON line per answered request
log_files.py        TorchServe's ts_log.log and model_log.log, for starts from the command line
access_lines.py     TorchServe's access_log.log, beside them
"""
