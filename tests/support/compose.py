"""docker-compose.yml as the tests read it: what each service runs and which repo files it mounts.

tests/test_compose.py checks the stack through these helpers and
tests/integration/test_stack.py runs it through them, as local processes:

    compose = load_compose()
    gateway_config(compose)       # docker/gateway.config.properties, found via the command
    torchserve_config(compose)    # docker/torchserve/config.properties
    prometheus_config(compose)    # docker/prometheus.yml
    rewrite_gateway_config(gateway_config(compose), target, model_store=..., key_file=...,
                           urls={compose_url: local_url})

So a changed command, config path or TorchServe address in the compose file or a config file
changes what the process-level test runs, or fails it: the two cannot drift apart.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from api.backends import BACKEND_KEY
from api.config import Address, read_properties
from tests.support.torchserve import write_test_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
GATEWAY = "gateway"
TORCHSERVE = "torchserve"
PROMETHEUS = "prometheus"


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load(path.read_text())
    return compose


def service(compose: Mapping[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = compose["services"][name]
    return found


@dataclass(frozen=True, slots=True)
class Mount:
    source: str
    target: str
    read_only: bool

    @property
    def is_bind(self) -> bool:
        return self.source.startswith((".", "/"))


def mounts(svc: Mapping[str, Any]) -> list[Mount]:
    """The service's volumes, short syntax (`SOURCE:TARGET[:ro]`) only, as this file uses."""
    found = []
    for entry in svc.get("volumes", []):
        assert isinstance(entry, str), f"use the short volume syntax: {entry!r}"
        source, target, *mode = entry.split(":")
        found.append(Mount(source, target, mode == ["ro"]))
    return found


def bind_source(svc: Mapping[str, Any], target: str) -> Path:
    """The repository file bind-mounted at `target` in the container."""
    for mount in mounts(svc):
        if mount.target == target:
            assert mount.is_bind, f"{target} is not a bind mount of a repository file"
            return (ROOT / mount.source).resolve()
    raise AssertionError(f"nothing is mounted at {target}")


def argv(svc: Mapping[str, Any]) -> list[str]:
    """entrypoint + command, as compose gives them (both must be in exec form here)."""
    parts: list[str] = []
    for key in ("entrypoint", "command"):
        value = svc.get(key) or []
        assert isinstance(value, list), f"{key} must be a list (exec form): {value!r}"
        parts += [str(v) for v in value]
    return parts


def _after(args: list[str], flag: str) -> str:
    for index, arg in enumerate(args):
        if arg == flag:
            return args[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {args}")


def gateway_config(compose: Mapping[str, Any]) -> Path:
    svc = service(compose, GATEWAY)
    return bind_source(svc, _after(argv(svc), "--config"))


def torchserve_config(compose: Mapping[str, Any]) -> Path:
    svc = service(compose, TORCHSERVE)
    return bind_source(svc, _after(argv(svc), "--ts-config"))


def prometheus_config(compose: Mapping[str, Any]) -> Path:
    svc = service(compose, PROMETHEUS)
    return bind_source(svc, _after(argv(svc), "--config.file"))


def properties(path: Path) -> dict[str, str]:
    return read_properties(path.read_text())


def port_of(config: Mapping[str, str], key: str) -> int:
    return Address.parse(config[key]).port


def torchserve_urls_in_compose(compose: Mapping[str, Any]) -> dict[str, str]:
    """{"inference": "http://torchserve:8080", "management": ...}: the service as others see it."""
    config = properties(torchserve_config(compose))
    return {
        api: f"http://{TORCHSERVE}:{port_of(config, f'{api}_address')}"
        for api in ("inference", "management", "metrics")
    }


def torchserve_backends(gateway_properties: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The gateway's TorchServe-backed versions: {"model/version": backend spec}."""
    models = json.loads(gateway_properties.get("models", "{}"))
    found = {}
    for name, versions in models.items():
        for version, settings in versions.items():
            backend = settings.get(BACKEND_KEY)
            if isinstance(backend, dict) and backend.get("kind") == "torchserve":
                found[f"{name}/{version}"] = backend
    return found


def rewrite_gateway_config(
    source: Path,
    target: Path,
    *,
    model_store: Path,
    key_file: Path,
    urls: Mapping[str, str],
) -> dict[str, str]:
    """Copy the gateway's config with its TorchServe URLs mapped through `urls` (each URL must be
    there: one the mapping does not know points at something the stack does not run), the model
    store and key file made local. Addresses are left to `running_torchgate`."""
    raw = properties(source)
    models = json.loads(raw["models"])
    for versions in models.values():
        for settings in versions.values():
            backend = settings.get(BACKEND_KEY)
            if not isinstance(backend, dict) or backend.get("kind") != "torchserve":
                continue
            for key in ("inference_url", "management_url"):
                url = backend.get(key)
                if url is None:
                    continue
                base = f"{urlsplit(url).scheme}://{urlsplit(url).netloc}"
                assert base in urls, f"{source}: {key} {url} is not a service of the stack"
                backend[key] = urls[base] + url[len(base) :]
    return write_test_config(
        source,
        target,
        {
            "models": json.dumps(models),
            "model_store": str(model_store),
            "torchgate.key_file": str(key_file),
        },
    )
