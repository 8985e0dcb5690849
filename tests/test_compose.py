"""docker-compose.yml: valid Compose, and the same stack tests/integration/test_stack.py runs.

There is no Docker engine in CI, so the file is checked statically: against the Compose
Specification's JSON schema (vendored: tests/schemas/compose-spec.json, from
compose-spec/compose-spec `schema/compose-spec.json`), and against the config files and
commands the process-level test runs (both read them through `tests.support.compose`).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from api.config import Address
from export.build import ALL
from tests.support import torchserve as torchserve_support
from tests.support.compose import (
    GATEWAY,
    PROMETHEUS,
    ROOT,
    TORCHSERVE,
    argv,
    bind_source,
    gateway_config,
    load_compose,
    mounts,
    port_of,
    prometheus_config,
    properties,
    rewrite_gateway_config,
    service,
    torchserve_backends,
    torchserve_config,
    torchserve_urls_in_compose,
)

SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"
BUILDER = "model-builder"
GATEWAY_GPU = "gateway-gpu"
GRAFANA = "grafana"
LONG_RUNNING = (TORCHSERVE, GATEWAY, GATEWAY_GPU, PROMETHEUS, GRAFANA)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def test_valid_against_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_the_schema_rejects_what_it_should(compose: dict[str, Any]) -> None:
    """The vendored schema is the real one, not a permissive stand-in."""
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    broken = yaml.safe_load(yaml.safe_dump(compose))
    broken["services"][GATEWAY]["depends_on"][TORCHSERVE]["condition"] = "service_ready"
    broken["services"][GATEWAY]["helthcheck"] = {}
    assert len(list(validator.iter_errors(broken))) >= 2


def test_services_and_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {BUILDER, TORCHSERVE, GATEWAY, GATEWAY_GPU, PROMETHEUS, GRAFANA}
    conditions = {
        name: {dep: spec["condition"] for dep, spec in svc.get("depends_on", {}).items()}
        for name, svc in services.items()
    }
    assert conditions[BUILDER] == {}
    assert conditions[TORCHSERVE] == {BUILDER: "service_completed_successfully"}
    for gateway in (GATEWAY, GATEWAY_GPU):
        assert conditions[gateway] == {
            BUILDER: "service_completed_successfully",
            TORCHSERVE: "service_healthy",
        }
    assert conditions[PROMETHEUS] == {GATEWAY: "service_healthy"}
    assert conditions[GRAFANA] == {PROMETHEUS: "service_healthy"}
    for name in LONG_RUNNING:
        healthcheck = services[name]["healthcheck"]
        assert healthcheck["test"][0] == "CMD" and healthcheck.get("disable") is not True, name
    assert services[BUILDER]["restart"] == "no"


def test_gpu_profile(compose: dict[str, Any]) -> None:
    gpu = service(compose, GATEWAY_GPU)
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.gateway-gpu"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert argv(gpu) == argv(service(compose, GATEWAY))
    assert mounts(gpu)[:2] == mounts(service(compose, GATEWAY))[:2]  # same store, same config
    for name, svc in compose["services"].items():
        if name != GATEWAY_GPU:
            assert "profiles" not in svc, f"{name} must start without a profile"


def test_only_inference_ports_are_public(compose: dict[str, Any]) -> None:
    gateway = properties(gateway_config(compose))
    inference = port_of(gateway, "inference_address")
    grpc_inference = int(gateway["grpc_inference_port"])
    public, local = set(), set()
    for name, svc in compose["services"].items():
        for entry in svc.get("ports", []):
            parts = str(entry).split(":")
            assert len(parts) in (2, 3), f"{name}: publish as [IP:]HOST:CONTAINER, got {entry}"
            if len(parts) == 3:
                assert parts[0] == "127.0.0.1", f"{name}: {entry} binds beyond loopback"
                local.add((name, int(parts[2])))
            else:
                public.add((name, int(parts[1])))
    assert public == {
        (GATEWAY, inference),
        (GATEWAY, grpc_inference),
        (GATEWAY_GPU, inference),
        (GATEWAY_GPU, grpc_inference),
    }
    metrics = port_of(gateway, "metrics_address")
    assert (GATEWAY, metrics) not in local  # Prometheus scrapes it over the compose network
    assert "ports" not in service(compose, TORCHSERVE)  # the gateway's backend only


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        image = svc["image"]
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag and tag != "latest", f"{name}: pin {image} to a tag"
        if "build" in svc:
            assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()


def test_gateway_runs_the_config_the_stack_test_runs(compose: dict[str, Any]) -> None:
    gateway = service(compose, GATEWAY)
    config_path = gateway_config(compose)
    assert config_path == ROOT / "docker" / "gateway.config.properties"
    # The test runs `torchgate serve --config <copy>`: no other arguments to carry over.
    assert argv(gateway) == ["serve", "--config", "/etc/torchgate/config.properties"]
    config = properties(config_path)
    # Its healthcheck asks the inference port the config listens on.
    ping = " ".join(gateway["healthcheck"]["test"])
    assert f"127.0.0.1:{port_of(config, 'inference_address')}/ping" in ping
    # The model store: the shared volume, at the path the config names, read-only here.
    store = {m.target: m for m in mounts(gateway)}[config["model_store"]]
    assert store.source == "model-store" and store.read_only
    # Token keys go to the writable state volume.
    key_dir = str(Path(config["torchgate.key_file"]).parent)
    state = {m.target: m for m in mounts(gateway)}[key_dir]
    assert not state.read_only and not state.is_bind
    for address in ("inference_address", "management_address", "metrics_address"):
        assert Address.parse(config[address]).host == "0.0.0.0"


def test_builder_fills_the_store_both_servers_read(compose: dict[str, Any]) -> None:
    builder = service(compose, BUILDER)
    args = argv(builder)
    assert args[:2] == ["export", "--all"]
    out = args[args.index("--out") + 1]
    assert {m.target: m.source for m in mounts(builder)}[out] == "model-store"
    built = {spec.archive_file for spec in ALL}
    for name, config_path in (
        (GATEWAY, gateway_config(compose)),
        (TORCHSERVE, torchserve_config(compose)),
    ):
        config = properties(config_path)
        store = {m.target: m for m in mounts(service(compose, name))}[config["model_store"]]
        assert store.source == "model-store" and store.read_only, name
        wanted = {item.rpartition("=")[2] for item in config["load_models"].split(",")}
        assert wanted <= built, f"{name} loads archives the builder does not make"


def test_torchserve_runs_as_the_stack_test_starts_it(compose: dict[str, Any]) -> None:
    torchserve = service(compose, TORCHSERVE)
    assert torchserve_config(compose) == ROOT / "docker" / "torchserve" / "config.properties"
    args = argv(torchserve)
    assert args == [
        "torchserve",
        "--start",
        "--ncs",
        "--foreground",
        "--ts-config",
        "/home/model-server/config.properties",
    ]
    # tests/support/torchserve.py starts TorchServe with the same flags.
    helper = inspect.getsource(torchserve_support.running_torchserve)
    assert '"--start", "--ncs", "--foreground", "--ts-config"' in helper
    config = properties(torchserve_config(compose))
    ping = " ".join(torchserve["healthcheck"]["test"])
    assert f"127.0.0.1:{port_of(config, 'inference_address')}/ping" in ping
    exposed = {int(p) for p in torchserve["expose"]}
    ports = {"inference_address", "management_address", "metrics_address"}
    assert {port_of(config, key) for key in ports} <= exposed


def test_gateway_reaches_torchserve_where_it_listens(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    gateway = properties(gateway_config(compose))
    backends = torchserve_backends(gateway)
    assert set(backends) == {"digits/2.0"}
    urls = torchserve_urls_in_compose(compose)
    spec = backends["digits/2.0"]
    assert spec["inference_url"] == urls["inference"]
    assert spec["management_url"] == urls["management"]
    torchserve = properties(torchserve_config(compose))
    served = json.loads(torchserve["models"])
    assert spec["model_version"] in served[spec["model_name"]]
    # The stack test's rewrite knows every URL the gateway config uses.
    local = {urls["inference"]: "http://127.0.0.1:1", urls["management"]: "http://127.0.0.1:2"}
    written = rewrite_gateway_config(
        gateway_config(compose),
        tmp_path / "config.properties",
        model_store=tmp_path,
        key_file=tmp_path / "keys.json",
        urls=local,
    )
    rewritten = json.loads(written["models"])["digits"]["2.0"]["torchgate.backend"]
    assert rewritten["inference_url"] == "http://127.0.0.1:1"


def test_prometheus_scrapes_both_servers(compose: dict[str, Any]) -> None:
    assert prometheus_config(compose) == ROOT / "docker" / "prometheus.yml"
    scrape = yaml.safe_load(prometheus_config(compose).read_text())
    targets = {
        job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
        for job in scrape["scrape_configs"]
    }
    gateway = properties(gateway_config(compose))
    torchserve = properties(torchserve_config(compose))
    assert targets["torchgate"] == [f"{GATEWAY}:{port_of(gateway, 'metrics_address')}"]
    assert targets["torchserve"] == [f"{TORCHSERVE}:{port_of(torchserve, 'metrics_address')}"]
    assert torchserve.get("metrics_mode") == "prometheus"


def test_grafana_mounts_its_provisioning(compose: dict[str, Any]) -> None:
    grafana = service(compose, GRAFANA)
    provisioning = bind_source(grafana, "/etc/grafana/provisioning")
    assert (provisioning / "datasources").is_dir() and (provisioning / "dashboards").is_dir()
    providers = yaml.safe_load((provisioning / "dashboards" / "torchgate.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    assert list(bind_source(grafana, path).glob("*.json"))
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert datasources["datasources"][0]["url"] == f"http://{PROMETHEUS}:9090"
