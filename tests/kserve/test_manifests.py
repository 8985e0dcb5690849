"""Every manifest under deploy/ against published schemas, and against torchgate itself.

- Built-in kinds (Deployment, Service, ConfigMap, PodDisruptionBudget, HorizontalPodAutoscaler)
  validate strictly against Kubernetes' own schemas (`kubernetes-validate`, unknown fields
  refused).
- KServe's kinds validate against schemas generated from the `kserve` SDK's model classes
  (KServe's published OpenAPI, as `openapi_types` / `attribute_map`): every field known and of
  its type, unknown fields refused; the Kubernetes types inside them (Container, Probe, ...)
  against Kubernetes' strict schemas (with their required fields).
- What the manifests say about torchgate holds: the probe paths answer, the config.properties
  they carry parses, the ports they name are the ones it listens on, and the metrics the
  autoscaler reads are metrics torchgate exports.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kserve
import kubernetes_validate
import pytest
import yaml

from api.config import parse_config, read_properties

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.33.0"
KSERVE_KINDS = {
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}
RUNTIME_ARGS = [
    "start",
    "--foreground",
    "--ncs",
    "--model-store=/mnt/models/model-store",
    "--ts-config=/mnt/models/config/config.properties",
]


def documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            if document:
                found.append((f"{path.relative_to(ROOT)}#{index}", document))
    return found


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


@cache
def k8s_definitions() -> dict[str, Any]:
    schemas = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    text = (schemas / f"v{K8S_VERSION}-local-strict" / "_definitions.json").read_text()
    definitions: dict[str, Any] = json.loads(text)["$defs"]
    return definitions


@cache
def k8s_names() -> dict[str, str]:
    """SDK class name (`V1Container`, `K8sIoApiAppsV1DeploymentStrategy`) -> definition."""
    names: dict[str, str] = {}
    for key in sorted(k8s_definitions(), key=lambda k: (".core." not in k, ".meta." not in k)):
        *group, version, kind = key.split(".")
        names.setdefault(version[0].upper() + version[1:] + kind, key)
        long = "".join(part[:1].upper() + part[1:] for part in ["k8s", "io", *group[3:]])
        names.setdefault(long + version[0].upper() + version[1:] + kind, key)
    return names


@cache
def kserve_schema(class_name: str) -> dict[str, Any]:
    """A JSON schema for one of the SDK's model classes, Kubernetes types by reference."""
    defs: dict[str, Any] = dict(k8s_definitions())

    def schema_of(type_name: str) -> dict[str, Any]:
        if type_name.startswith("list["):
            return {"type": "array", "items": schema_of(type_name[5:-1])}
        if type_name.startswith("dict("):
            value = type_name[5:-1].split(",", 1)[1].strip()
            return {"type": "object", "additionalProperties": schema_of(value)}
        simple: dict[str, dict[str, Any]] = {
            "str": {"type": "string"},
            "int": {"type": "integer"},
            "bool": {"type": "boolean"},
            "float": {"type": "number"},
            "object": {},
            "ResourceQuantity": {"type": ["string", "integer", "number"]},
            "V1Time": {"type": "string"},
        }
        if type_name in simple:
            return simple[type_name]
        if hasattr(kserve.models, type_name) and type_name not in defs:
            defs[type_name] = {}  # placeholder against recursion
            model = getattr(kserve.models, type_name)
            defs[type_name] = {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    model.attribute_map[attribute]: schema_of(attribute_type)
                    for attribute, attribute_type in model.openapi_types.items()
                },
            }
        if type_name in defs:
            return {"$ref": f"#/$defs/{type_name}"}
        if type_name in k8s_names():
            return {"$ref": f"#/$defs/{k8s_names()[type_name]}"}
        return {}  # Knative status types: never written in a manifest

    root = schema_of(class_name)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$defs": defs, **root}


@pytest.mark.parametrize(("where", "document"), documents(), ids=lambda v: str(v)[:60])
def test_manifest_validates(where: str, document: dict[str, Any]) -> None:
    key = (document["apiVersion"], document["kind"])
    if key in KSERVE_KINDS:
        class_name = KSERVE_KINDS[key]
        jsonschema.Draft202012Validator(kserve_schema(class_name)).validate(document)
    else:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_schema_refuses_unknown_fields() -> None:
    """The generated schema has teeth: a misspelt field fails, as `kubectl apply` would."""
    (runtime,) = by_kind("ClusterServingRuntime")
    validator = jsonschema.Draft202012Validator(kserve_schema("V1alpha1ClusterServingRuntime"))
    bad = json.loads(json.dumps(runtime))
    bad["spec"]["supportedModelFormats"][0]["autoselect"] = True
    with pytest.raises(jsonschema.ValidationError, match="autoselect"):
        validator.validate(bad)
    bad = json.loads(json.dumps(runtime))
    bad["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/"
    with pytest.raises(jsonschema.ValidationError, match="paht"):
        validator.validate(bad)


def test_runtime_is_a_kserve_torchserve_drop_in() -> None:
    (runtime,) = by_kind("ClusterServingRuntime")
    spec = runtime["spec"]
    assert {"name": "pytorch", "version": "1"}.items() <= spec["supportedModelFormats"][0].items()
    assert set(spec["protocolVersions"]) == {"v1", "v2", "grpc-v2"}
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"
    assert [*container["command"], *container["args"]] == ["torchgate", *RUNTIME_ARGS]
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] != 0
    assert security["allowPrivilegeEscalation"] is False
    (service,) = by_kind("InferenceService")
    predictor = service["spec"]["predictor"]
    assert predictor["model"]["runtime"] == runtime["metadata"]["name"]
    assert 0 < predictor["canaryTrafficPercent"] < 100
    assert predictor["model"]["storageUri"]


def test_probes_and_ports_match_torchgate() -> None:
    """Probe paths are torchgate's v2 health routes; container ports are where it listens."""
    from api.rest.v2 import v2_router

    routes = {route.path for route in v2_router(None).routes}  # type: ignore[arg-type, attr-defined]
    (configmap,) = [c for c in by_kind("ConfigMap") if c["metadata"]["name"] == "torchgate-config"]
    config = parse_config(read_properties(configmap["data"]["config.properties"]), base_dir=ROOT)
    pods = [d["spec"]["template"]["spec"] for d in by_kind("Deployment")]
    containers = [c for pod in pods for c in pod["containers"]]
    containers += by_kind("ClusterServingRuntime")[0]["spec"]["containers"]
    for container in containers:
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in container:
                assert container[probe]["httpGet"]["path"] in routes
    for deployment in by_kind("Deployment"):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {
            "http": config.inference_address.port,
            "grpc": config.grpc_inference_port,
            "metrics": config.metrics_address.port,
        }
        assert container["args"][-1] == "--ts-config=/etc/torchgate/config.properties"
        limits = container["resources"]["limits"]
        assert ("nvidia.com/gpu" in limits) == ("gpu" in deployment["metadata"]["name"])
    assert config.models and config.traffic  # the ConfigMap loads models and a policy


def test_deployments_environment_variables_apply(tmp_path: Path) -> None:
    """A TS_* variable a Deployment sets takes effect: the ConfigMap it mounts says
    enable_envvars_config=true (torchgate, as TorchServe, ignores them otherwise), the name is
    one TorchServe reads, and it sets what the Deployment means (GPU pods: number_of_gpu=1)."""
    from api.config import ENVIRONMENT_KEYS, Overrides, load_config

    configmaps = {c["metadata"]["name"]: c for c in by_kind("ConfigMap")}
    for deployment in by_kind("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {item["name"]: item["value"] for item in container.get("env", [])}
        (volume,) = [v for v in pod["volumes"] if "configMap" in v]
        file = tmp_path / deployment["metadata"]["name"] / "config.properties"
        file.parent.mkdir()
        file.write_text(configmaps[volume["configMap"]["name"]]["data"]["config.properties"])
        overrides = Overrides(model_store=Path("/mnt/models/model-store"))
        config = load_config(file, overrides=overrides, environ=env)
        for name in (n for n in env if n.startswith("TS_")):
            assert name in ENVIRONMENT_KEYS, f"{name}: not a variable TorchServe reads"
        gpu = "nvidia.com/gpu" in container["resources"]["limits"]
        assert config.number_of_gpu == (1 if gpu else None), deployment["metadata"]["name"]


def test_kserve_storage_example_loads() -> None:
    example = DEPLOY / "kserve" / "storage" / "config" / "config.properties"
    config = parse_config(read_properties(example.read_text()), base_dir=example.parent)
    assert [(m.name, m.version, m.mar_name) for m in config.models] == [
        ("digits", "1.0", "digits.mar")
    ]
    assert config.load_models == "digits.mar"


def test_autoscaling_reads_metrics_torchgate_exports() -> None:
    from api.core.registry import Registry
    from api.observability.metrics import RegistryCollector

    collector = RegistryCollector(Registry(), "host")  # no model: every family, empty
    exported = {family.name for family in collector.collect()}
    (adapter,) = [c for c in by_kind("ConfigMap") if c["metadata"]["name"] == "prometheus-adapter"]
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    served = set()
    for rule in rules:
        series = re.match(r"^(\w+)\{", rule["seriesQuery"])
        assert series and series.group(1) in exported
        served.add(rule["name"]["as"])
    (hpa,) = by_kind("HorizontalPodAutoscaler")
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    assert wanted == {"torchgate_inflight_requests", "torchgate_queue_depth"} and wanted <= served
    deployments = {d["metadata"]["name"] for d in by_kind("Deployment")}
    assert hpa["spec"]["scaleTargetRef"]["name"] in deployments


def test_the_runtime_listens_on_kserves_ports_and_declares_none() -> None:
    """REST on 8080 and gRPC v2 on 8081, KServe's ports (its TorchServe docs point an
    InferenceService's `h2c` port at 8081); no container port declared, as Knative serves one
    and an InferenceService's own would make two; the management API on loopback only."""
    (runtime,) = by_kind("ClusterServingRuntime")
    (container,) = runtime["spec"]["containers"]
    assert "ports" not in container
    env = {item["name"]: item["value"] for item in container["env"]}
    raw = {
        "enable_envvars_config": "true",
        "model_store": "/mnt/models/model-store",
    }
    config = parse_config(
        {**raw, **{_key(name): value for name, value in env.items()}}, base_dir=ROOT
    )
    assert (config.inference_address.port, config.grpc_inference_port) == (8080, 8081)
    assert config.management_address.host == "127.0.0.1"
    assert config.management_address.port not in (8080, 8081, 8082)


def _key(variable: str) -> str:
    """config.properties' key for a TS_* variable, as TorchServe maps them."""
    from api.config import ENVIRONMENT_KEYS

    return ENVIRONMENT_KEYS.get(variable, variable)
