"""Every config.properties key torchgate knows: TorchServe 0.12's and torchgate's own.

Each key is one of

    supported          means what it means in TorchServe (or, for `torchgate.*`, what
                       docs/ say)
    ignored-harmless   accepted; has no effect here and needs none (a JVM or Netty setting);
                       an INFO line at start names each one the file sets
    unsupported        not implemented: a warning at start says so and what to do instead

A key whose value is TorchServe's default is never warned about, whatever its status (an
`ipex_enable=false` changes nothing), unless the key lists the values torchgate serves as
TorchServe does (`Key.values`): `metrics_mode=log`, TorchServe's default, is served as
prometheus here, so saying it gets a warning, and so does leaving it out (`unset_keys`): a
TorchServe user's metrics then go to `ts_metrics.log`, which torchgate does not write. Unknown
keys get a warning naming the nearest known key (`inferance_address` -> `inference_address`).
`report(config)` logs the warnings and the effective configuration (secrets masked) at start;
`docs/compatibility.md` lists the same table.
"""

from __future__ import annotations

import difflib
import logging
import os
import shutil
import sys
from dataclasses import dataclass

from api.config import Config

log = logging.getLogger("torchgate.config")

SUPPORTED = "supported"
IGNORED = "ignored-harmless"
UNSUPPORTED = "unsupported"


@dataclass(frozen=True, slots=True)
class Key:
    name: str
    status: str
    note: str
    # TorchServe's default, lower case: a value equal to it is never warned about.
    default: str | None = None
    # A supported key's values that do what they do in TorchServe (None: all); any other
    # value is served as the note says, with a warning at start.
    values: frozenset[str] | None = None


def _keys(status: str, *entries: tuple[str, ...]) -> list[Key]:
    """(name, note) or (name, note, TorchServe's default) -> Key."""
    return [Key(e[0], status, e[1], e[2] if len(e) > 2 else None) for e in entries]


KEYS: dict[str, Key] = {
    key.name: key
    for key in [
        # TorchServe's default is log: handler metrics go to model_metrics.log, not /metrics.
        Key(
            "metrics_mode",
            SUPPORTED,
            "prometheus: every metric on the metrics port; no metric log files are written",
            "log",
            frozenset({"prometheus"}),
        ),
        *_keys(
            SUPPORTED,
            ("inference_address", "REST inference listener; https:// serves TLS"),
            ("management_address", "REST management listener; https:// serves TLS"),
            ("metrics_address", "REST metrics listener (/metrics); https:// serves TLS"),
            ("grpc_inference_address", "gRPC inference bind address"),
            ("grpc_inference_port", "gRPC inference port (7070)"),
            ("grpc_management_address", "gRPC management bind address"),
            ("grpc_management_port", "gRPC management port (7071)"),
            ("enable_grpc_ssl", "TLS on both gRPC ports with the REST key and certificate"),
            ("certificate_file", "PEM certificate chain for https:// and gRPC TLS"),
            ("private_key_file", "PEM private key (PKCS8 or PKCS1, unencrypted)"),
            ("keystore", "PKCS12 keystore; JKS is refused with the keytool command"),
            ("keystore_pass", "keystore password (changeit)"),
            ("keystore_type", "PKCS12 only (JKS: convert with keytool)", "pkcs12"),
            ("cors_allowed_origin", "Access-Control-Allow-Origin on every answer"),
            ("cors_allowed_methods", "Access-Control-Allow-Methods on every answer"),
            ("cors_allowed_headers", "Access-Control-Allow-Headers on every answer"),
            ("model_store", "folder of .mar archives"),
            ("load_models", "archives loaded at start (all, or name=file.mar,...)"),
            ("models", "per-version settings JSON, as TorchServe"),
            ("model_snapshot", "snapshot JSON whose models load at start (replaces load_models)"),
            ("default_workers_per_model", "workers per model (1 here; TorchServe: one per core)"),
            ("default_response_timeout", "seconds a worker may take per batch (120)"),
            ("job_queue_size", "queued requests per model before 503 (100)"),
            ("max_request_size", "largest request body on every port, bytes (6553500)"),
            ("max_response_size", "largest answer (each streamed part), bytes (6553500)"),
            ("number_of_gpu", "GPUs workers are spread over"),
            ("disable_token_authorization", "token authorization off when true"),
            ("token_expiration_min", "minutes an inference/management token lives (60)"),
            ("enable_model_api", "register/unregister over the management API"),
            ("allowed_urls", "regexes registration URLs must match (none here: model store)"),
            ("limit_max_image_pixels", "PIL's decompression-bomb limit in the handlers"),
            ("enable_metrics_api", "the metrics listener; false leaves its address unbound"),
            ("decode_input_request", "workers decode JSON/text for handlers unless false", "true"),
            # Implemented by their own modules (model archives, workflows, metrics, envelopes).
            ("service_envelope", "json or kserve/kservev2 request envelopes"),
            ("workflow_store", "folder of .war workflow archives"),
            ("install_py_dep_per_model", "pip-installs an archive's requirements.txt"),
            ("metrics_config", "metrics.yaml of the handlers' custom metrics"),
            ("model_metrics_auto_detect", "custom metrics registered on first use"),
            ("enable_envvars_config", "TS_* environment variables override keys"),
            ("use_env_allowed_urls", "TS_ALLOWED_URLS counts only with it"),
            ("disable_system_metrics", "true leaves host and GPU metrics out of /metrics"),
            ("grpc_inference_max_connection_age_ms", "gRPC connections closed at this age"),
            ("grpc_management_max_connection_age_ms", "gRPC connections closed at this age"),
            ("grpc_inference_max_connection_age_grace_ms", "time calls get to end at that age"),
            ("grpc_management_max_connection_age_grace_ms", "time calls get to end at that age"),
        ),
        *_keys(
            IGNORED,
            ("number_of_netty_threads", "Netty: torchgate runs on one asyncio loop"),
            ("netty_client_threads", "Netty: torchgate runs on one asyncio loop"),
            ("async_logging", "log4j setting"),
            ("prefer_direct_buffer", "Netty buffer setting"),
            ("use_native_io", "Netty epoll setting"),
            ("io_ratio", "Netty setting"),
            ("model_server_home", "where TorchServe's Java frontend lives"),
            ("initial_worker_port", "workers talk over pipes, not TCP ports"),
            ("initial_distribution_port", "torchrun ports: no distributed workers"),
            ("metric_time_interval", "system metrics are sampled per scrape"),
            ("cpp_log_config", "TorchServe's C++ backend logging"),
            ("unregister_model_timeout", "unregistering drains queued requests, then stops"),
            ("ts_open_inference_protocol", "KServe v2 (OIP) is always served on REST and gRPC"),
            ("python", "workers run this interpreter (another one is warned about)"),
            ("metrics_format", "in KServe's example config; TorchServe 0.12 does not read it"),
            ("version", "written by TorchServe into its snapshots"),
            ("tsConfigFile", "written by TorchServe into its snapshots"),
        ),
        *_keys(
            UNSUPPORTED,
            ("debug", "no debug mode (workers stay as configured)", "false"),
            ("default_startup_timeout", "use startupTimeout per model in models={...}", "120"),
            ("blacklist_env_vars", "workers inherit the whole environment", ""),
            (
                "system_metrics_cmd",
                "TorchServe runs this command instead of its system metrics collector; "
                "torchgate samples CPU, memory, disk and GPU itself at each /metrics scrape "
                "(disable_system_metrics=true leaves them out)",
                "",
            ),
            (
                "vmargs",
                "JVM flags of TorchServe's Java frontend (-Xmx, -Dlog4j.configurationFile): "
                "torchgate runs no JVM and logs with Python logging (--log-level)",
                "",
            ),
            ("default_service_handler", "every archive names its handler"),
            ("ipex_enable", "no Intel Extension for PyTorch launch", "false"),
            ("ipex_gpu_enable", "no Intel Extension for PyTorch launch", "false"),
            ("cpu_launcher_enable", "no CPU launcher (one thread per worker here)", "false"),
            ("cpu_launcher_args", "no CPU launcher"),
            ("plugins_path", "Java plugins cannot run here"),
            ("ts_header_key_sequence_id", "sequence header names are TorchServe's defaults"),
            ("ts_header_key_sequence_start", "sequence header names are TorchServe's defaults"),
            ("ts_header_key_sequence_end", "sequence header names are TorchServe's defaults"),
        ),
        *_keys(
            SUPPORTED,
            ("torchgate.snapshot_file", "where torchgate's state snapshot lives"),
            ("torchgate.traffic", "traffic policies by model (docs/traffic.md)"),
            ("torchgate.intra_op_threads", "torch/ONNX Runtime threads per CPU worker"),
            ("torchgate.worker_preload", "modules the worker zygote imports once"),
            ("torchgate.spin_us", "microseconds workers and event loop poll before sleeping"),
            ("torchgate.max_workers_per_model", "the most workers one version may have"),
            ("torchgate.archive_max_bytes", "bytes one archive may unpack to"),
            ("torchgate.archive_max_members", "files one archive may hold"),
            ("torchgate.archive_max_ratio", "compression ratio one archive may have"),
            ("torchgate.allowed_hosts", "Host names the management API takes, token auth off"),
            ("torchgate.key_file", "where token authorization keeps its keys"),
            ("torchgate.access_log", "the access logs: JSON lines, access_log.log (true)"),
            ("torchgate.max_image_pixels", "pixels an image may have for shipped handlers"),
            ("torchgate.max_items_per_request", "items in one request"),
            ("torchgate.max_header_size", "request line and headers, bytes"),
            ("torchgate.header_timeout", "seconds for a request's headers"),
            ("torchgate.keep_alive_timeout", "seconds an idle connection stays open"),
            ("torchgate.max_connections", "open connections per listener"),
        ),
    ]
}

SECRET_KEYS = frozenset({"keystore_pass"})
MASK = "********"


def check_keys(raw: dict[str, str]) -> list[str]:
    """One warning line per unknown key and per unsupported key set to a non-default value."""
    warnings = []
    for name, value in raw.items():
        key = KEYS.get(name)
        if key is None:
            near = difflib.get_close_matches(name, list(KEYS), n=1, cutoff=0.75)
            hint = f"; did you mean {near[0]}?" if near else ""
            warnings.append(f"unknown config key {name}{hint} (ignored)")
        elif key.status == UNSUPPORTED and value.strip().lower() != (key.default or "\0"):
            warnings.append(f"config key {name} is not supported by torchgate: {key.note}")
        elif key.values is not None and value.strip().lower() not in key.values:
            warnings.append(f"config key {name}={value} is not supported by torchgate: {key.note}")
        elif name == "python" and not _runs_here(value):
            warnings.append(
                f"config key python={value} is not supported by torchgate: workers are forked "
                f"from the interpreter torchgate runs on ({sys.executable}); install the "
                f"handlers' packages there"
            )
    return warnings


# TorchServe's default metrics_mode is log: its metrics go to ts_metrics.log and
# model_metrics.log, and its GET /metrics answers nothing. A config that never says
# metrics_mode was written for that, and finds its metrics elsewhere here.
METRICS_MODE_UNSET = (
    "config key metrics_mode is not set: TorchServe's default (log) writes its metrics to "
    "ts_metrics.log and model_metrics.log; torchgate writes neither and serves every metric "
    "on the metrics API (/metrics), as metrics_mode=prometheus (set it to silence this)"
)


def unset_keys(raw: dict[str, str]) -> list[str]:
    """One warning line per key whose absence means something torchgate does otherwise
    (`check_keys` sees only the keys the file sets)."""
    return [] if "metrics_mode" in raw else [METRICS_MODE_UNSET]


def _runs_here(python: str) -> bool:
    """Whether `python` (TorchServe's interpreter for its workers) runs in this environment."""
    found = shutil.which(python.strip())
    return found is not None and _environment_of(found) == _environment_of(sys.executable)


def _environment_of(executable: str) -> str:
    """A virtual environment's folder for its interpreters (they are links to one base
    interpreter, so the file alone cannot tell two venvs apart), else the interpreter's file."""
    path = os.path.abspath(executable)
    root = os.path.dirname(os.path.dirname(path))
    if os.path.exists(os.path.join(root, "pyvenv.cfg")):
        return os.path.realpath(root)
    return os.path.realpath(path)


def ignored_keys(raw: dict[str, str]) -> list[str]:
    """`name (why)` for each ignored-harmless key the file sets: said once at start, so no
    key is dropped in silence."""
    return [
        f"{name} ({key.note})"
        for name in raw
        if (key := KEYS.get(name)) is not None
        and key.status == IGNORED
        and (name != "python" or _runs_here(raw[name]))  # else check_keys warns
    ]


def effective_config(config: Config) -> list[str]:
    """`key: value` lines of what torchgate runs with: the main settings, then every key the
    file set (secrets masked)."""
    lines = [
        f"inference_address: {config.inference_address}",
        f"management_address: {config.management_address}",
        f"metrics_address: {config.metrics_address}",
        f"grpc_inference: {config.grpc_inference_address}:{config.grpc_inference_port}",
        f"grpc_management: {config.grpc_management_address}:{config.grpc_management_port}",
        f"model_store: {config.model_store}",
        f"load_models: {config.load_models or 'N/A'}",
        f"default_workers_per_model: {config.default_workers_per_model}",
        f"job_queue_size: {config.job_queue_size}",
        f"default_response_timeout: {config.default_response_timeout:g}",
        f"max_request_size: {config.max_request_size}",
        f"max_response_size: {config.max_response_size}",
        f"disable_token_authorization: {str(config.disable_token_authorization).lower()}",
        f"enable_model_api: {str(config.enable_model_api).lower()}",
        f"snapshot_file: {config.snapshot_file or 'N/A'}",
    ]
    shown = {line.split(":", 1)[0] for line in lines}
    for name in sorted(config.raw):
        if name in shown:
            continue
        value = config.raw[name]
        if name in SECRET_KEYS or "pass" in name.lower() or "secret" in name.lower():
            value = MASK
        elif len(value) > 200:
            value = value[:200] + "..."
        lines.append(f"{name}: {value}")
    return lines


def report(config: Config) -> None:
    """At start: the warnings of `check_keys` and `unset_keys`, then the effective
    configuration."""
    for line in [*check_keys(config.raw), *unset_keys(config.raw)]:
        log.warning(line)
    ignored = ignored_keys(config.raw)
    if ignored:
        log.info("config keys with no effect in torchgate: %s", "; ".join(ignored))
    log.info("effective configuration:\n  %s", "\n  ".join(effective_config(config)))
