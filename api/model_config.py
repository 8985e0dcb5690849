"""model-config.yaml's frontend keys, merged with config.properties and the register API as
TorchServe 0.12 merges them.

An archive built with `torch-model-archiver --config-file model-config.yaml` carries settings
for the frontend (minWorkers, batchSize, ...) beside a section for its handler. The whole file
reaches the handler as `context.model_yaml_config`; this module reads the frontend's keys.
Who wins, key by key (TorchServe's `ModelManager.createModel`, `Model(...)`,
`ModelServer.initModelStore` and `ApiUtils.handleRegister`):

    batchSize, maxBatchDelay          register API parameter > yaml > models={...} > default
    responseTimeout, startupTimeout   yaml (when it sets them: TorchServe's 120 s defaults for
                                      any yaml are not applied, docs/compatibility.md) >
                                      models={...} > register API parameter > default
    minWorkers + maxWorkers           yaml (as a pair, minWorkers <= maxWorkers) >
                                      initial_workers (API) or models={...} (start-up) > default
    jobQueueSize                      yaml > models={...} (torchgate's; TorchServe: none) >
                                      job_queue_size
    sequenceBatching, sequenceMaxIdleMSec, sequenceTimeoutMSec, maxNumSequence,
    maxSequenceJobQueueSize, useVenv  yaml only

A version restored from a snapshot keeps the snapshot's workers, batch and timeouts (TorchServe's
`setModelState`); the yaml-only keys still apply. A value of the wrong type is warned about and
ignored, as TorchServe's `ModelConfig` does; a value below what its setter stores is raised to
that floor (minWorkers 0 counts as 1), with a warning. A models={...} `runtimeType` that is not
Python is refused as the manifest's `runtime` is (`api.backends.archive`). Frontend keys
torchgate does not implement (deviceType, parallelType, continuousBatching, ...) are warned
about, never silently dropped; any other key belongs to the handler.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, Literal

from api.backends.archive import PYTHON_RUNTIMES, ArchiveError
from api.config import MODEL_INT_KEYS, Config
from api.core.types import ModelSettings

log = logging.getLogger(__name__)

Origin = Literal["api", "config", "snapshot"]

_INT_KEYS = (
    *MODEL_INT_KEYS,
    "sequenceMaxIdleMSec",
    "sequenceTimeoutMSec",
    "maxNumSequence",
    "maxSequenceJobQueueSize",
    "maxRetryTimeoutInSec",
)
_BOOL_KEYS = ("sequenceBatching", "useVenv")
# TorchServe 0.12's ModelConfig setters store max(floor, value) for these keys (the others ignore
# a value out of range): a yaml minWorkers of 0 starts one worker there, so here too.
_FLOORS = {
    "minWorkers": 1,
    "batchSize": 1,
    "maxNumSequence": 1,
    "maxSequenceJobQueueSize": 1,
    "sequenceTimeoutMSec": 0,
    "maxRetryTimeoutInSec": 0,
}
# TorchServe 0.12's Manifest.RuntimeType values: LSP runs its C++ backend.
_TORCHSERVE_RUNTIMES = frozenset({"python", "python3", "LSP"})
# TorchServe's other frontend keys (ModelConfig.build): read by TorchServe, not by torchgate.
UNSUPPORTED_KEYS = frozenset(
    {
        "deviceType",
        "deviceIds",
        "parallelLevel",
        "parallelType",
        "torchrun",
        "clientTimeoutInMills",
        "useJobTicket",
        "continuousBatching",
        "asyncCommunication",
    }
)


def frontend_keys(model_config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The frontend keys of a model-config.yaml with usable values; warns about the rest."""
    values: dict[str, Any] = {}
    for key, value in model_config.items():
        if key in _INT_KEYS:
            usable = isinstance(value, int) and not isinstance(value, bool)
            kind = "an integer"
        elif key in _BOOL_KEYS:
            usable, kind = isinstance(value, bool), "true or false"
        elif key in UNSUPPORTED_KEYS:
            log.warning(
                "%s: model-config.yaml key %s=%r is not implemented by torchgate; ignored "
                "(docs/compatibility.md)",
                *(where, key, value),
            )
            continue
        else:
            continue  # the handler's
        if usable:
            values[key] = _raised_to_floor(key, value, where)
        else:
            log.warning("%s: model-config.yaml %s=%r is not %s: ignored", where, key, value, kind)
    return values


def _raised_to_floor(key: str, value: Any, where: str) -> Any:
    """`value` as TorchServe's ModelConfig setter stores it: raised to the key's floor."""
    floor = _FLOORS.get(key)
    if floor is None or value >= floor:
        return value
    log.warning(
        "%s: model-config.yaml %s=%r is below %d: %d is used, as TorchServe does",
        *(where, key, value, floor, floor),
    )
    return floor


def resolve_settings(
    config: Config,
    model_config: Mapping[str, Any],
    *,
    name: str,
    version: str,
    origin: Origin,
    settings: ModelSettings,
    api: Mapping[str, Any] | None = None,
) -> ModelSettings:
    """The version's settings with TorchServe's precedence (see the module docstring).

    `settings` is what the caller built without the archive (config.properties' defaults with
    the API's parameters, a models={...} entry, or a snapshot's entry); `api` the register
    API's parameters as TorchServe keys (batchSize, maxBatchDelay, responseTimeout,
    minWorkers/maxWorkers for initial_workers), given only for origin "api".
    """
    where = f"Model {name} version {version}"
    yaml = frontend_keys(model_config, where)
    if origin != "snapshot":
        _check_runtime_type(config.model_options(name, version), where)
        settings = config.model_settings(_merged(config, yaml, name, version, origin, api or {}))
    elif "jobQueueSize" in yaml and yaml["jobQueueSize"] > 0:
        settings = dataclasses.replace(settings, job_queue_size=yaml["jobQueueSize"])
    return _yaml_only_keys(settings, yaml, where)


def _check_runtime_type(entry: Mapping[str, Any], where: str) -> None:
    """A models={...} `runtimeType`, which TorchServe puts over the manifest's `runtime` (a
    restored snapshot keeps the manifest's). A TorchServe runtime torchgate cannot run (LSP, its
    C++ backend) is refused as that manifest `runtime` is: serving the model with Python would
    not be what was configured. A value TorchServe does not know is logged and ignored there
    (the manifest's runtime is used): here it is warned about and ignored."""
    if "runtimeType" not in entry:
        return
    runtime = entry["runtimeType"]
    known = isinstance(runtime, str) and runtime in _TORCHSERVE_RUNTIMES
    if known and runtime in PYTHON_RUNTIMES:
        return
    if known:
        raise ArchiveError(
            f"{where}: models={{...}} runtimeType {runtime!r} is not supported (only python)"
        )
    log.warning(
        "%s: models={...} runtimeType=%r is not a TorchServe runtime (python, python3, LSP): "
        "ignored, the manifest's runtime is used, as TorchServe does",
        *(where, runtime),
    )


def _merged(
    config: Config,
    yaml: Mapping[str, Any],
    name: str,
    version: str,
    origin: Origin,
    api: Mapping[str, Any],
) -> dict[str, Any]:
    """TorchServe keys for `Config.model_settings`, each from the layer that wins it."""
    entry = config.model_options(name, version)
    positive = {k: v for k, v in yaml.items() if k in _INT_KEYS and v > 0}
    merged: dict[str, Any] = {}

    def first(key: str, *layers: Mapping[str, Any]) -> None:
        for layer in layers:
            if key in layer:
                merged[key] = layer[key]
                return

    first("batchSize", api, positive, entry)
    first("maxBatchDelay", api, positive, entry)
    first("responseTimeout", positive, entry, api)
    first("startupTimeout", positive, entry, api)
    first("jobQueueSize", positive, entry)
    # minWorkers is >= 1 when set (_FLOORS); unset it is 0 in TorchServe, so never a pair.
    low, high = yaml.get("minWorkers", 0), yaml.get("maxWorkers", 0)
    if 0 < low <= high:
        merged["minWorkers"], merged["maxWorkers"] = low, high
    else:
        if "minWorkers" in yaml or "maxWorkers" in yaml:
            log.warning(
                "Model %s version %s: model-config.yaml minWorkers=%s maxWorkers=%s ignored "
                "(TorchServe uses them only as a pair, with minWorkers <= maxWorkers)",
                name,
                version,
                yaml.get("minWorkers"),
                yaml.get("maxWorkers"),
            )
        workers = api if origin == "api" else entry
        first("minWorkers", workers)
        first("maxWorkers", workers)
    return merged


def _yaml_only_keys(settings: ModelSettings, yaml: Mapping[str, Any], where: str) -> ModelSettings:
    """The keys only model-config.yaml sets (no other layer has them)."""
    changes: dict[str, Any] = {}
    if "sequenceBatching" in yaml:
        changes["sequence_batching"] = yaml["sequenceBatching"]
    if "useVenv" in yaml:
        changes["use_venv"] = yaml["useVenv"]
    if "maxRetryTimeoutInSec" in yaml:
        # TorchServe 0.12 stores max(0, value): with 0 it gives a failing worker up at once, so
        # here such a worker stops counting toward /ping at once (torchgate still retries it).
        changes["max_retry_timeout_s"] = yaml["maxRetryTimeoutInSec"]
    # As TorchServe's Model: the sequence limits are read only with sequenceMaxIdleMSec > 0.
    # Its code raises maxNumSequence to batchSize x maxWorkers, but both are still 0 when it
    # does, so the configured value is enforced as it is (checked against TorchServe 0.12).
    idle = yaml.get("sequenceMaxIdleMSec", 0)
    if idle > 0:
        changes["sequence_max_idle_ms"] = idle
        changes["sequence_timeout_ms"] = yaml.get("sequenceTimeoutMSec", 0)  # floored already
        changes["max_sequence_job_queue_size"] = yaml.get("maxSequenceJobQueueSize", 1)
        changes["max_num_sequence"] = yaml.get("maxNumSequence", 1)
    elif yaml.get("sequenceBatching"):
        log.warning(
            "%s: sequenceBatching without sequenceMaxIdleMSec > 0: TorchServe then keeps no "
            "sequence limits (maxNumSequence, maxSequenceJobQueueSize ignored)",
            where,
        )
    return dataclasses.replace(settings, **changes) if changes else settings
