"""Reads TorchServe's `config.properties`; every TorchServe key means what it means there.

Keys torchgate understands (TorchServe's defaults unless noted):

    inference_address, management_address, metrics_address    http://127.0.0.1:8080/8081/8082
    grpc_inference_port, grpc_management_port                 7070 / 7071
    grpc_inference_address, grpc_management_address           127.0.0.1
    model_store, load_models ("all", or name=file.mar,...)
    models={"name": {"1.0": {"marName", "defaultVersion", "minWorkers", "maxWorkers",
            "batchSize", "maxBatchDelay", "responseTimeout", "startupTimeout"}}}
    default_workers_per_model (1 here; TorchServe's default is one per GPU or core),
    job_queue_size (100), default_response_timeout (120 s), max_request_size and
    max_response_size (6553500 bytes), disable_token_authorization (false),
    enable_model_api (false), install_py_dep_per_model (false), metrics_config,
    model_metrics_auto_detect (false), allowed_urls (none here: only the model store;
    TorchServe's is file://.*|http(s)?://.*), cors_allowed_origin, cors_allowed_methods and
    cors_allowed_headers (none; api.rest.cors), number_of_gpu,
    service_envelope (kserve, kservev2, body or json: TorchServe's request envelope around
    every handler; none by default);
    certificate_file, private_key_file, keystore, keystore_pass, keystore_type and
    enable_grpc_ssl are read by api.tls; every key's status is in api.config_keys

torchgate's own keys start with `torchgate.` (for example `torchgate.snapshot_file`), so a
file stays usable unchanged by `torchserve --ts-config`:

    torchgate.snapshot_file     where the state snapshot lives (default: with `torchgate serve
                                --config`, logs/config/torchgate/torchgate-snapshot.json beside
                                this file; with `torchgate start`, under $LOG_LOCATION/config;
                                empty: none)
    torchgate.traffic           traffic policies by model, JSON: {"digits": {"weights": {...}}}
                                (see api.core.routing / docs/traffic.md)
    torchgate.intra_op_threads  torch / ONNX Runtime threads per CPU worker (default 1)
    torchgate.archive_max_bytes, torchgate.archive_max_members, torchgate.archive_max_ratio
                                what one archive may unpack to (4 GiB, 10000 members, 100:1)
    torchgate.allowed_hosts     Host names the management API answers besides its own
                                address and localhost, with token auth off (docs/security.md)
    torchgate.worker_preload    modules the worker zygote imports once for every worker to
                                share (default torch,numpy,ts.torch_handler.base_handler,
                                onnxruntime,PIL.Image; missing ones are skipped)
    torchgate.spin_us           microseconds a worker polls for its next batch, and the event
                                loop for a worker's answer, before sleeping (default 250; 0:
                                sleep at once, where polling must not spend CPU; see
                                api.workers.spin)
    torchgate.max_workers_per_model
                                the most workers one model version may have (default
                                max(4, 2 x CPU cores, 4 x number_of_gpu)); scale and register
                                above it answer 400, start-up settings above it are clamped

Inputs (docs/security.md): limit_max_image_pixels (TorchServe's, true; false lifts every pixel
limit), torchgate.max_image_pixels (40000000: the most pixels an image may have for the shipped
handlers, read from its header before decoding), torchgate.max_items_per_request (1024: the
most items in one request: the leading dimension of each input of a KServe v2 request, REST or
gRPC, and the images or texts one request brings the shipped handlers, on any API).

HTTP edge limits, per HTTP listener (api.rest.edge; docs/security.md "HTTP edge"):

    torchgate.max_header_size       request line + headers, bytes (65536); more: 431
    torchgate.header_timeout        seconds for a request's headers to arrive, and the longest
                                    pause inside its body (20); more: 408 and closed
    torchgate.keep_alive_timeout    whole seconds a connection may sit idle (620: longer than
                                    load balancers keep theirs, so they close first)
    torchgate.max_connections       open connections (a quarter of the descriptor limit,
                                    `ulimit -n`); over it the longest-waiting idle or stalled
                                    connection is closed, or the new one gets 503
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import resource
import string
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from api.core.types import ModelSettings
from api.metrics_config import MetricsConfigError, MetricsSpec, load_metrics_spec
from api.workers.main import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_ITEMS_PER_REQUEST
from api.workers.spin import DEFAULT_SPIN_US
from api.workers.zygote import DEFAULT_PRELOAD

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """config.properties is unreadable or holds a value of the wrong form."""


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int
    scheme: str = "http"

    @classmethod
    def parse(cls, value: str) -> Address:
        parts = urlsplit(value if "://" in value else f"http://{value}")
        if not parts.hostname or not parts.port:
            raise ConfigError(f"address needs a host and a port: {value!r}")
        return cls(parts.hostname, parts.port, parts.scheme)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One version listed in `models={...}` (or implied by `load_models`)."""

    name: str
    version: str | None
    mar_name: str
    default: bool
    settings: ModelSettings
    # Extra per-version settings torchgate understands, e.g. {"backend": {...}}.
    extra: dict[str, Any] = field(default_factory=dict)
    # The entry as written (TorchServe keys): api.model_config weighs it against the archive's
    # model-config.yaml.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    """Per HTTP listener; enforced by api.rest.edge. Defaults: `_http_limits({})`."""

    max_header_bytes: int
    header_timeout_s: float
    keep_alive_timeout_s: int  # uvicorn takes whole seconds
    max_connections: int


@dataclass(slots=True)
class Config:
    inference_address: Address = field(default_factory=lambda: Address("127.0.0.1", 8080))
    management_address: Address = field(default_factory=lambda: Address("127.0.0.1", 8081))
    metrics_address: Address = field(default_factory=lambda: Address("127.0.0.1", 8082))
    grpc_inference_address: str = "127.0.0.1"
    grpc_inference_port: int = 7070
    grpc_management_address: str = "127.0.0.1"
    grpc_management_port: int = 7071
    # TorchServe's grpc_{inference,management}_max_connection_age[_grace]_ms, by "inference" /
    # "management"; absent: connections live on (TorchServe's Long.MAX_VALUE).
    grpc_max_connection_age_ms: dict[str, int] = field(default_factory=dict)
    grpc_max_connection_age_grace_ms: dict[str, int] = field(default_factory=dict)
    model_store: Path = Path("model_store")
    # Where `POST /workflows?url=x.war` looks (TorchServe's workflow_store); None: model_store.
    workflow_store: Path | None = None
    load_models: str = ""
    models: list[ModelEntry] = field(default_factory=list)
    default_workers_per_model: int = 1
    job_queue_size: int = 100
    default_response_timeout: float = 120.0
    max_request_size: int = 6553500
    max_response_size: int = 6553500
    disable_token_authorization: bool = False
    # Minutes the inference and management keys live (TorchServe's token_expiration_min).
    token_expiration_min: float = 60.0
    # TorchServe's enable_metrics_api: false leaves the metrics address unbound.
    enable_metrics_api: bool = True
    # TorchServe's disable_system_metrics: true leaves host and GPU metrics out of /metrics.
    disable_system_metrics: bool = False
    # TorchServe's enable_grpc_ssl: both gRPC ports serve TLS with the REST ports' key (api.tls).
    enable_grpc_ssl: bool = False
    enable_model_api: bool = False
    # Stricter than TorchServe's `file://.*|http(s)?://.*`: none, so only archives inside the
    # model store register (see docs/security.md, "Registration and the management API").
    allowed_urls: list[str] = field(default_factory=list)
    number_of_gpu: int | None = None
    # torchgate.intra_op_threads: torch / ONNX Runtime threads per CPU worker (default 1).
    intra_op_threads: int | None = None
    # torchgate.worker_preload: what the worker zygote imports before forking workers.
    worker_preload: tuple[str, ...] = DEFAULT_PRELOAD
    # torchgate.spin_us: how long workers and the event loop poll before sleeping.
    spin_us: int = DEFAULT_SPIN_US
    key_file: Path = Path("key_file.json")
    # None: no snapshot is read or written (`--ncs`; `torchgate serve` without a config file).
    snapshot_file: Path | None = None
    # False: the snapshot is written but not read at start (`torchgate start` with a config
    # file named, as TorchServe reads its last snapshot only when none is).
    snapshot_restore: bool = True
    # torchgate.traffic: {model: policy JSON}, applied at start when there is no snapshot.
    traffic: dict[str, Any] = field(default_factory=dict)
    # torchgate.max_workers_per_model: the bound on one version's workers (None: the default
    # from cores and GPUs, `default_max_workers`).
    max_workers_per_model: int | None = None
    # Registration and the management API (docs/security.md): bounds on what one archive may
    # unpack to, the browser origins allowed to call the management API without token auth
    # (TorchServe's cors_allowed_origin), and Host names beside the listener's own address.
    archive_max_bytes: int = 4 * 1024**3
    archive_max_members: int = 10_000
    archive_max_ratio: float = 100.0
    cors_allowed_origin: tuple[str, ...] = ()
    # TorchServe's cors_allowed_methods / cors_allowed_headers, sent as written (api.rest.cors).
    cors_allowed_methods: str = ""
    cors_allowed_headers: str = ""
    allowed_hosts: tuple[str, ...] = ()
    # Inputs to the shipped handlers and the prediction APIs (docs/security.md).
    limit_max_image_pixels: bool = True
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_items_per_request: int = DEFAULT_MAX_ITEMS_PER_REQUEST
    # TorchServe's service_envelope: ts.torch_handler.request_envelope's module wrapping every
    # handler in its worker (api.workers.main.wrap_in_envelope); None: no envelope.
    service_envelope: str | None = None
    # torchgate.max_header_size / header_timeout / keep_alive_timeout / max_connections.
    http_limits: EdgeLimits = field(default_factory=lambda: _http_limits({}))
    # install_py_dep_per_model: install an archive's requirementsFile for its workers
    # (api.backends.requirements); without it requirements are ignored, as in TorchServe.
    install_py_dep_per_model: bool = False
    # decode_input_request: workers decode JSON and text inputs for handlers (api.workers.items).
    decode_input_request: bool = True
    # metrics_config (TorchServe's metrics.yaml) and model_metrics_auto_detect: the handler
    # metrics workers declare up front and /metrics exports (api.metrics_config).
    metrics_spec: MetricsSpec = field(default_factory=MetricsSpec)
    # Everything that was in the file, for keys read elsewhere (`torchgate.*`).
    raw: dict[str, str] = field(default_factory=dict)
    # The config file's folder: where relative paths in it start (the current one without a file).
    base_dir: Path = field(default_factory=Path.cwd)

    @property
    def models_from_snapshot(self) -> bool:
        """Whether `models` came from TorchServe's model_snapshot key (which, when present,
        alone says what loads): as in TorchServe, their settings then win over an archive's
        model-config.yaml (a snapshot restores, not describes)."""
        return bool(self.raw.get("model_snapshot"))

    def http_addresses(self) -> list[tuple[str, Address]]:
        """(API, address) of each REST listener to serve: inference, management and, unless
        enable_metrics_api=false, metrics (APIs may share an address)."""
        apis = [("inference", self.inference_address), ("management", self.management_address)]
        if self.enable_metrics_api:
            apis.append(("metrics", self.metrics_address))
        return apis

    def model_settings(self, overrides: dict[str, Any] | None = None) -> ModelSettings:
        """Settings for a version: TorchServe's `models={...}` keys over this file's defaults."""
        o = overrides or {}
        min_workers = int(o.get("minWorkers", self.default_workers_per_model))
        return ModelSettings(
            batch_size=int(o.get("batchSize", 1)),
            max_batch_delay_ms=float(o.get("maxBatchDelay", 100)),
            response_timeout_s=float(o.get("responseTimeout", self.default_response_timeout)),
            job_queue_size=int(o.get("jobQueueSize", self.job_queue_size)),
            min_workers=min_workers,
            # 0/0 only when asked for (a registration without initial_workers, as TorchServe).
            max_workers=max(int(o.get("maxWorkers", min_workers)), min_workers)
            or (0 if "maxWorkers" in o else 1),
            startup_timeout_s=float(o.get("startupTimeout", 120)),
        )

    def model_options(self, name: str, version: str) -> dict[str, Any]:
        """The models={...} entry of this version as written, less the values TorchServe
        replaces by their defaults (`_usable_options`); {} when it has none."""
        for entry in self.models:
            if entry.name == name and entry.version == version:
                return entry.options
        return {}

    @property
    def worker_bound(self) -> int:
        if self.max_workers_per_model is not None:
            return self.max_workers_per_model
        return default_max_workers(len(os.sched_getaffinity(0)), self.number_of_gpu or 0)

    @property
    def worker_environment(self) -> dict[str, str]:
        """What TorchServe's frontend sets in its workers' environment, where handlers and
        TorchServe's own Python code read it."""
        return {
            "TEMP": tempfile.gettempdir(),
            "TS_DECODE_INPUT_REQUEST": "true" if self.decode_input_request else "false",
            # ipex_enable and ipex_gpu_enable are not supported (api.config_keys): off.
            "TS_IPEX_ENABLE": "false",
            "TS_IPEX_GPU_ENABLE": "false",
        }

    @property
    def image_pixel_limit(self) -> int | None:
        """The pixel limit workers get; None when `limit_max_image_pixels=false` lifts it."""
        return self.max_image_pixels if self.limit_max_image_pixels else None

    def allows_url(self, url: str) -> bool:
        return any(re.fullmatch(pattern, url) for pattern in self.allowed_urls)


def default_max_workers(cores: int, gpus: int) -> int:
    """Workers past a few per core (or GPU) only add memory and contention: each is a process
    with its own model, and a CPU worker runs one intra-op thread."""
    return max(4, 2 * cores, 4 * gpus)


def read_properties(text: str) -> dict[str, str]:
    """Java .properties, as `java.util.Properties.load` reads them (TorchServe's reader):
    `key=value`, `key: value` or `key value`; `#`/`!` comments; a line ending in an odd number
    of backslashes goes on on the next; `\\t \\n \\r \\f \\uXXXX` escapes, and a backslash
    before any other character is that character (`http\\://host\\:8080`, as TorchServe's
    own config snapshots write addresses). Unlike Java, a value's trailing blanks are dropped
    (TorchServe's integer keys would refuse them)."""
    values: dict[str, str] = {}
    logical: list[str] = []
    for raw_line in _PROPERTY_LINES.split(text):  # Java's ends only: not str.splitlines's
        line = raw_line.lstrip(_PROPERTY_BLANKS)
        if not logical and (not line or line[0] in "#!"):
            continue
        trailing = len(line) - len(line.rstrip("\\"))
        if trailing % 2:
            logical.append(line[:-1])
            continue
        logical.append(line)
        entry, logical = "".join(logical), []
        _add_property(values, entry)
    _add_property(values, "".join(logical))  # the last line asked to go on, and the file ended
    return values


def _add_property(values: dict[str, str], entry: str) -> None:
    if not entry:
        return  # blank lines joined by continuations: no entry, as in Java
    key, value = _split_property(entry)
    values[_unescape_property(key)] = _unescape_property(value).rstrip(_PROPERTY_BLANKS)


_PROPERTY_BLANKS = " \t\f"
_PROPERTY_LINES = re.compile(r"\r\n|\r|\n")


def _split_property(entry: str) -> tuple[str, str]:
    """The key (up to an unescaped `=`, `:` or blank) and the raw value after the separator."""
    index = 0
    while index < len(entry) and entry[index] not in "=:" + _PROPERTY_BLANKS:
        index += 2 if entry[index] == "\\" else 1
    key, rest = entry[:index], entry[index:].lstrip(_PROPERTY_BLANKS)
    if rest[:1] in ("=", ":"):
        rest = rest[1:].lstrip(_PROPERTY_BLANKS)
    return key, rest


_PROPERTY_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}


def _unescape_property(text: str) -> str:
    if "\\" not in text:
        return text
    out: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char != "\\":
            out.append(char)
            index += 1
            continue
        escaped = text[index + 1 : index + 2]
        if escaped == "u":
            digits = text[index + 2 : index + 6]
            if len(digits) != 4 or any(d not in string.hexdigits for d in digits):
                raise ConfigError(f"malformed \\uxxxx escape in {text!r}")
            out.append(chr(int(digits, 16)))
            index += 6
            continue
        out.append(_PROPERTY_ESCAPES.get(escaped, escaped))  # "" for a lone final backslash
        index += 2
    return "".join(out)


def load_config(
    path: str | os.PathLike[str] | None,
    *,
    overrides: Overrides | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read a config.properties; relative model_store paths resolve against the file's folder.

    In TorchServe's order (ConfigManager): the file, its `$$VAR$$` references replaced by
    environment variables, then the command line's `overrides`, then `TS_<KEY>` environment
    variables when the file says `enable_envvars_config=true`. The model and workflow stores
    given on the command line or in the environment resolve against the working directory;
    TLS files from the environment against the file's folder, as when written in it.
    """
    env = os.environ if environ is None else environ
    if path is None:
        raw: dict[str, str] = {}
    else:
        file = Path(path)
        try:
            raw = read_properties(file.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {file}: {exc}") from exc
    raw = _resolve_references(raw, env)
    if overrides is not None:
        raw.update(overrides.properties())
    if raw.get("enable_envvars_config", "false").strip().lower() == "true":
        raw.update(_environment_properties(raw, env))
    if path is None:
        if not raw:
            return Config()
        config = parse_config(raw, base_dir=Path.cwd())
        if "torchgate.snapshot_file" not in raw:
            config.snapshot_file = None  # as without a file: no snapshot
        return config
    return parse_config(raw, base_dir=Path(path).resolve().parent)


@dataclass(frozen=True, slots=True)
class Overrides:
    """What TorchServe's command line sets over config.properties (`torchgate start`)."""

    model_store: Path | None = None
    models: tuple[str, ...] = ()  # NAME=URL or URL or "all", as `--models`
    workflow_store: Path | None = None
    disable_token_auth: bool = False  # the flag can only turn authorization off
    enable_model_api: bool = False  # and only turn the model API on

    def properties(self) -> dict[str, str]:
        values: dict[str, str] = {}
        if self.model_store is not None:
            values["model_store"] = str(Path(self.model_store).absolute())
        if self.workflow_store is not None:
            values["workflow_store"] = str(Path(self.workflow_store).absolute())
        if self.models:
            values["load_models"] = ",".join(
                "all" if m.lower() == "all" else m for m in self.models
            )
        if self.disable_token_auth:
            values["disable_token_authorization"] = "true"
        if self.enable_model_api:
            values["enable_model_api"] = "true"
        return values


# TorchServe 0.12's ConfigManager reads these variables (its `TS_*` constants) over the file
# when enable_envvars_config=true; the name is not always TS_ + the key in capitals.
ENVIRONMENT_KEYS: dict[str, str] = {
    **{
        f"TS_{key.upper()}": key
        for key in [
            "debug",
            "inference_address",
            "management_address",
            "metrics_address",
            "load_models",
            "blacklist_env_vars",
            "default_workers_per_model",
            "default_response_timeout",
            "default_startup_timeout",
            "unregister_model_timeout",
            "number_of_netty_threads",
            "netty_client_threads",
            "job_queue_size",
            "number_of_gpu",
            "metrics_config",
            "metrics_mode",
            "model_metrics_auto_detect",
            "disable_system_metrics",
            "ipex_enable",
            "cpu_launcher_enable",
            "cpu_launcher_args",
            "ipex_gpu_enable",
            "async_logging",
            "cors_allowed_origin",
            "cors_allowed_methods",
            "cors_allowed_headers",
            "decode_input_request",
            "keystore",
            "keystore_pass",
            "keystore_type",
            "certificate_file",
            "private_key_file",
            "max_request_size",
            "max_response_size",
            "limit_max_image_pixels",
            "default_service_handler",
            "service_envelope",
            "model_server_home",
            "model_store",
            "prefer_direct_buffer",
            "allowed_urls",
            "install_py_dep_per_model",
            "enable_metrics_api",
            "grpc_inference_address",
            "grpc_management_address",
            "grpc_inference_port",
            "grpc_management_port",
            "grpc_inference_max_connection_age_ms",
            "grpc_management_max_connection_age_ms",
            "grpc_inference_max_connection_age_grace_ms",
            "grpc_management_max_connection_age_grace_ms",
            "enable_grpc_ssl",
            "initial_worker_port",
            "initial_distribution_port",
            "workflow_store",
            "cpp_log_config",
            "disable_token_authorization",
            "enable_model_api",
        ]
    },
    "TS_OPEN_INFERENCE_PROTOCOL": "ts_open_inference_protocol",
    "TS_TOKEN_EXPIRATION_TIME_MIN": "token_expiration_min",
    "TS_HEADER_KEY_SEQUENCE_ID": "ts_header_key_sequence_id",
    "TS_HEADER_KEY_SEQUENCE_START": "ts_header_key_sequence_start",
    "TS_HEADER_KEY_SEQUENCE_END": "ts_header_key_sequence_end",
}
# Polling longer than this wastes more CPU than a wake-up costs.
MAX_SPIN_US = 10_000
_PATH_KEYS = frozenset({"model_store", "workflow_store"})
_REFERENCE = re.compile(r"\$\$([^$]+[^$])\$\$")


def _environment_properties(raw: dict[str, str], environ: Mapping[str, str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for name, key in ENVIRONMENT_KEYS.items():
        if name not in environ:
            continue
        # As TorchServe: TS_ALLOWED_URLS counts only with use_env_allowed_urls=true.
        if key == "allowed_urls" and raw.get("use_env_allowed_urls", "").lower() != "true":
            log.warning("TS_ALLOWED_URLS is ignored without use_env_allowed_urls=true")
            continue
        value = environ[name]
        values[key] = str(Path(value).absolute()) if key in _PATH_KEYS and value else value
    return values


def _resolve_references(raw: dict[str, str], environ: Mapping[str, str]) -> dict[str, str]:
    """`key=$$NAME$$` takes the value of environment variable NAME (TorchServe's syntax)."""

    def value_of(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in environ:
            raise ConfigError(f"config.properties refers to $${name}$$, which is not set")
        return environ[name]

    return {key: _REFERENCE.sub(value_of, value) for key, value in raw.items()}


def parse_config(raw: dict[str, str], *, base_dir: Path) -> Config:
    config = Config(raw=raw, base_dir=base_dir)
    try:
        for key in ("inference_address", "management_address", "metrics_address"):
            if key in raw:
                setattr(config, key, Address.parse(raw[key]))
        for key in (
            "grpc_inference_port",
            "grpc_management_port",
            "default_workers_per_model",
            "job_queue_size",
            "max_request_size",
            "max_response_size",
        ):
            if key in raw:
                setattr(config, key, _number(raw, key, int))
        for kind in ("inference", "management"):
            for suffix, ages in (
                ("", config.grpc_max_connection_age_ms),
                ("_grace", config.grpc_max_connection_age_grace_ms),
            ):
                key = f"grpc_{kind}_max_connection_age{suffix}_ms"
                if key in raw:
                    ages[kind] = _number(raw, key, int)
                    if ages[kind] <= 0:  # TorchServe's gRPC server refuses it at start too
                        raise ValueError(f"{key}={raw[key]!r} must be above 0")
        for key in ("grpc_inference_address", "grpc_management_address", "load_models"):
            if key in raw:
                setattr(config, key, raw[key])
        for key in (
            "disable_token_authorization",
            "enable_model_api",
            "install_py_dep_per_model",
            "decode_input_request",
            "enable_metrics_api",
            "disable_system_metrics",
        ):
            if key in raw:
                setattr(config, key, raw[key].strip().lower() == "true")
        if "token_expiration_min" in raw:
            config.token_expiration_min = _number(raw, "token_expiration_min", float)
            if not config.token_expiration_min > 0:
                raise ValueError(
                    f"token_expiration_min={raw['token_expiration_min']!r} must be above 0"
                )
        config.enable_grpc_ssl = raw.get("enable_grpc_ssl", "").strip().lower() == "true"
        if "default_response_timeout" in raw:
            config.default_response_timeout = _number(raw, "default_response_timeout", float)
        if "number_of_gpu" in raw:
            config.number_of_gpu = _number(raw, "number_of_gpu", int)
        if "torchgate.intra_op_threads" in raw:
            config.intra_op_threads = _number(raw, "torchgate.intra_op_threads", int)
        if "torchgate.max_workers_per_model" in raw:
            bound = raw["torchgate.max_workers_per_model"]
            if not bound.isdigit() or int(bound) < 1:
                raise ValueError(f"torchgate.max_workers_per_model must be >= 1, not {bound!r}")
            config.max_workers_per_model = int(bound)
        if config.default_workers_per_model > config.worker_bound:
            # Else every registration without initial_workers would be refused.
            log.warning(
                "default_workers_per_model=%d is above torchgate.max_workers_per_model=%d: clamped",
                config.default_workers_per_model,
                config.worker_bound,
            )
            config.default_workers_per_model = config.worker_bound
        if "torchgate.spin_us" in raw:
            spin = _number(raw, "torchgate.spin_us", int)
            if not 0 <= spin <= MAX_SPIN_US:
                raise ValueError(
                    f"torchgate.spin_us must be 0..{MAX_SPIN_US} microseconds, not {spin}"
                )
            config.spin_us = spin
        if "torchgate.worker_preload" in raw:
            preload = raw["torchgate.worker_preload"].split(",")
            config.worker_preload = tuple(name.strip() for name in preload if name.strip())
        _registration_keys(raw, config)
    except ValueError as exc:
        raise ConfigError(f"bad value in config.properties: {exc}") from exc
    store = Path(raw.get("model_store", "model_store"))
    config.model_store = store if store.is_absolute() else base_dir / store
    if raw.get("workflow_store"):
        workflows = Path(raw["workflow_store"])
        config.workflow_store = workflows if workflows.is_absolute() else base_dir / workflows
    key_file = Path(raw.get("torchgate.key_file", "key_file.json"))
    config.key_file = key_file if key_file.is_absolute() else base_dir / key_file
    config.models = _models(raw.get("models"), config)
    config.metrics_spec = _metrics_spec(raw, base_dir)
    _kserve_keys(raw, config)
    snapshot = raw.get(
        "torchgate.snapshot_file", "logs/config/torchgate/torchgate-snapshot.json"
    )  # a folder of its own: TorchServe reads every file in logs/config as its snapshot
    if snapshot:
        config.snapshot_file = base_dir / snapshot  # an absolute path stays as it is
    config.traffic = _traffic(raw.get("torchgate.traffic"))
    _input_limits(raw, config)
    config.http_limits = _http_limits(raw)
    config.service_envelope = _service_envelope(raw.get("service_envelope"))
    return config


SERVICE_ENVELOPES = ("kserve", "kservev2", "body", "json")


def _service_envelope(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    if value.strip() not in SERVICE_ENVELOPES:
        raise ConfigError(
            f"service_envelope must be one of {', '.join(SERVICE_ENVELOPES)}, got {value!r}"
        )
    return value.strip()


_N = TypeVar("_N", int, float)


def _number(raw: dict[str, str], key: str, kind: type[_N]) -> _N:
    """The value of `key`; a ValueError that names the key and the value otherwise."""
    try:
        return kind(raw[key])
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise ValueError(f"{key}={raw[key]!r} is not {noun}") from None


def _metrics_spec(raw: dict[str, str], base_dir: Path) -> MetricsSpec:
    """metrics_config: relative to this file's folder, else (as TorchServe) to the cwd."""
    auto_detect = raw.get("model_metrics_auto_detect", "false").strip().lower() == "true"
    path = Path(raw["metrics_config"]) if raw.get("metrics_config") else None
    if path is not None and not path.is_absolute() and (base_dir / path).exists():
        path = base_dir / path
    try:
        return load_metrics_spec(path, auto_detect=auto_detect)
    except MetricsConfigError as exc:
        raise ConfigError(str(exc)) from exc


def _registration_keys(raw: dict[str, str], config: Config) -> None:
    """allowed_urls, the archive limits, cors_allowed_origin and torchgate.allowed_hosts."""
    if "allowed_urls" in raw:
        config.allowed_urls = [u.strip() for u in raw["allowed_urls"].split(",") if u.strip()]
        for pattern in config.allowed_urls:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"allowed_urls: {pattern!r} is not a regex: {exc}") from exc
    for key, attribute in (
        ("torchgate.archive_max_bytes", "archive_max_bytes"),
        ("torchgate.archive_max_members", "archive_max_members"),
    ):
        if key in raw:
            value = _registration_number(raw, key, int)
            if value < 1:
                raise ConfigError(f"{key} must be a positive number, got {raw[key]!r}")
            setattr(config, attribute, value)
    if "torchgate.archive_max_ratio" in raw:
        ratio = _registration_number(raw, "torchgate.archive_max_ratio", float)
        if not ratio >= 1:  # also refuses nan
            raise ConfigError(f"torchgate.archive_max_ratio must be >= 1, got {ratio!r}")
        config.archive_max_ratio = ratio
    if "cors_allowed_origin" in raw:
        config.cors_allowed_origin = _csv(raw["cors_allowed_origin"])
    config.cors_allowed_methods = raw.get("cors_allowed_methods", "").strip()
    config.cors_allowed_headers = raw.get("cors_allowed_headers", "").strip()
    if "torchgate.allowed_hosts" in raw:
        config.allowed_hosts = tuple(h.lower() for h in _csv(raw["torchgate.allowed_hosts"]))


def _registration_number(raw: dict[str, str], key: str, kind: type[_N]) -> _N:
    try:
        return kind(raw[key])
    except ValueError as exc:
        raise ConfigError(f"{key} must be a number, got {raw[key]!r}") from exc


def _csv(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _input_limits(raw: dict[str, str], config: Config) -> None:
    """The keys of docs/security.md's "Inputs" section; a bad value is refused, never guessed."""
    if "limit_max_image_pixels" in raw:
        value = raw["limit_max_image_pixels"].strip().lower()
        if value not in ("true", "false"):
            raise ConfigError(f"limit_max_image_pixels must be true or false, got {value!r}")
        config.limit_max_image_pixels = value == "true"
    for key, attribute in (
        ("torchgate.max_image_pixels", "max_image_pixels"),
        ("torchgate.max_items_per_request", "max_items_per_request"),
    ):
        if key in raw:
            try:
                number = int(raw[key])
            except ValueError:
                raise ConfigError(f"{key} must be a positive integer, got {raw[key]!r}") from None
            if number < 1:
                raise ConfigError(f"{key} must be a positive integer, got {number}")
            setattr(config, attribute, number)


def _http_limits(raw: dict[str, str]) -> EdgeLimits:
    """The HTTP edge limits; by default each listener may use a quarter of the descriptors."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    default_connections = max(16, soft // 4) if soft != resource.RLIM_INFINITY else 16384

    def read(key: str, kind: type[int] | type[float], default: float, least: float) -> Any:
        text = raw.get(f"torchgate.{key}")
        if text is None:
            return default
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not least <= value < float("inf"):
            raise ConfigError(f"torchgate.{key} must be a number >= {least}, not {text!r}")
        return value

    return EdgeLimits(
        max_header_bytes=read("max_header_size", int, 64 * 1024, 1024),
        header_timeout_s=read("header_timeout", float, 20.0, 0.01),
        # TorchServe never closes an idle connection. A balancer that reuses one the server has
        # just closed answers its client 502, so the server must outwait the balancer's own
        # idle timeout (AWS ALB 60 s, nginx 75 s, Google Cloud's 600 s). Idle connections
        # cost little: at max_connections the longest-waiting one makes way.
        keep_alive_timeout_s=read("keep_alive_timeout", int, 620, 1),
        max_connections=read("max_connections", int, default_connections, 1),
    )


def _traffic(text: str | None) -> dict[str, Any]:
    """`torchgate.traffic`'s shape; each policy's content is checked when it is applied."""
    if not text:
        return {}
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"torchgate.traffic is not valid JSON: {exc}") from exc
    if not isinstance(spec, dict) or not all(isinstance(p, dict) for p in spec.values()):
        raise ConfigError('torchgate.traffic must be a JSON object of {"model": {policy}}')
    return spec


def _kserve_keys(raw: dict[str, str], config: Config) -> None:
    """`model_snapshot` (TorchServe's snapshot format, which KServe's examples use to name their
    models): as in TorchServe, when present it alone says what loads, each model and version
    with its settings, and load_models and models= are not read (docs/kubernetes.md)."""
    snapshot = raw.get("model_snapshot")
    if snapshot:
        try:
            models = json.loads(snapshot).get("models")
        except (json.JSONDecodeError, AttributeError) as exc:
            raise ConfigError(f"model_snapshot is not a JSON object: {exc}") from exc
        config.models = _model_entries(models or {}, config)
        config.load_models = ",".join(entry.mar_name for entry in config.models)


def _models(text: str | None, config: Config) -> list[ModelEntry]:
    if not text:
        return []
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"models= is not valid JSON: {exc}") from exc
    return _model_entries(spec, config, defaults_for_invalid=True)


def _model_entries(
    spec: Any, config: Config, *, defaults_for_invalid: bool = False
) -> list[ModelEntry]:
    """models={...}'s {name: {version: settings}} (or a model_snapshot's "models") as entries.

    `defaults_for_invalid`: models={...}'s rule (`_usable_options`). A model_snapshot restores
    its values as they are (TorchServe's setModelState), so a bad one there is refused."""
    if not isinstance(spec, dict):
        raise ConfigError("models= must be a JSON object of {name: {version: settings}}")
    entries = []
    for name, versions in spec.items():
        if not isinstance(versions, dict):
            raise ConfigError(f"models.{name} must be an object of versions")
        for version, settings in versions.items():
            if not isinstance(settings, dict):
                raise ConfigError(f"models.{name}.{version} must be an object")
            if defaults_for_invalid:
                settings = _usable_options(settings, name, version)
            try:
                model_settings = config.model_settings(settings)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"models.{name}.{version}: {exc}") from exc
            entries.append(
                ModelEntry(
                    name=name,
                    version=version,
                    mar_name=str(settings.get("marName", f"{name}.mar")),
                    default=bool(settings.get("defaultVersion", False)),
                    settings=model_settings,
                    extra={k: v for k, v in settings.items() if k.startswith("torchgate")},
                    options=settings,
                )
            )
    return entries


# The models={...} keys TorchServe reads with ConfigManager.getJsonIntValue, and jobQueueSize,
# which torchgate reads the same way (TorchServe 0.12 does not read it from models=): the
# frontend's per-version numbers, which model-config.yaml may set too (`api.model_config`).
MODEL_INT_KEYS = (
    "minWorkers",
    "maxWorkers",
    "batchSize",
    "maxBatchDelay",
    "responseTimeout",
    "startupTimeout",
    "jobQueueSize",
)


def _usable_options(settings: dict[str, Any], name: str, version: str) -> dict[str, Any]:
    """A models={...} entry without the numbers TorchServe's getJsonIntValue replaces by the
    default (<= 0; min/max workers default to default_workers_per_model), each warned about:
    TorchServe starts the model with its defaults, so refusing to start the whole server would be
    harsher than the server this one replaces. A value that is no number at all ("abc", true,
    null) stops TorchServe's start (Gson's NumberFormatException, which it does not catch): it
    is refused here too."""
    usable = dict(settings)
    for key in MODEL_INT_KEYS:
        if key not in usable:
            continue
        number = _gson_int(usable[key], f"models.{name}.{version}.{key}")
        if number > 0:
            usable[key] = number
            continue
        log.warning(
            "models={...} model %s version %s: %s=%r is not above 0: the default is used "
            "instead, as TorchServe does",
            *(name, version, key, usable.pop(key)),
        )
    return usable


def _gson_int(value: Any, where: str) -> int:
    """`value` as Gson's getAsInt reads a JSON number or a string of one (2.5 is 2, "8" is 8);
    ConfigError where it throws (a boolean, null, an object, "2.5", "abc")."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]+", value):
        return int(value)
    raise ConfigError(f"{where} must be an integer, not {value!r}")
