"""What an archive brings besides its handler, against real TorchServe 0.12 and torchgate side by
side on the same model store and config.properties: its requirements.txt
(`install_py_dep_per_model=true`), its model-config.yaml frontend keys (weighed against
models={...} and the register API), and custom handler metrics declared in `metrics_config`
(with `model_metrics_auto_detect=true`) on /metrics in Prometheus format.

Archives are written as TorchServe's examples write them (examples/stateful: requirements.txt +
model-config.yaml; examples/custom_metrics: metrics.yaml + a handler using `context.metrics`).
The requirement is `termcolor`, a small pure-Python package from the package index the machine
reaches, which the test environment does not have.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import ts
import yaml

from tests.support.archives import build_archive
from tests.support.exposition import parse
from tests.support.server import running_torchgate
from tests.support.torchserve import running_torchserve

pytestmark = [pytest.mark.integration, pytest.mark.torchserve]

REQUIREMENT = "termcolor"

DEPS_HANDLER = """
    import termcolor  # imported with the module: the package is there before the worker loads

    def handle(data, context):
        if data is None:
            return None
        return [
            {
                "module": termcolor.__name__,
                "installed_in_model_dir": "site-packages" not in termcolor.__file__,
                "greeting": context.model_yaml_config["handler"]["greeting"],
            }
            for _ in data
        ]
"""

PROBE_HANDLER = """
    import importlib.util

    def handle(data, context):
        if data is None:
            return None
        return [{"sees_termcolor": importlib.util.find_spec("termcolor") is not None} for _ in data]
"""

METRICS_HANDLER = """
    from ts.metrics.metric_type_enum import MetricTypes

    def handle(data, context):
        if data is None:
            return None
        metrics = context.metrics
        # Declared in metrics.yaml: TorchServe's worker has it in its cache before any call.
        metrics.get_metric("InferenceRequestCount", MetricTypes.COUNTER).add_or_update(
            len(data), []
        )
        metrics.add_size("SizeOfImage", 1.5, None, "kB")
        # Not declared: exported only with model_metrics_auto_detect=true.
        metrics.add_counter("UndeclaredCount", 2)
        return ["ok" for _ in data]
"""

DEPS_CONFIG = """
    minWorkers: 1
    maxWorkers: 2
    batchSize: 2
    maxBatchDelay: 7
    responseTimeout: 33
    handler:
      greeting: hello
"""

# For the register API: its parameters against these.
API_CONFIG = """
    minWorkers: 1
    maxWorkers: 1
    batchSize: 3
    maxBatchDelay: 9
    responseTimeout: 44
"""

MODEL_METRICS = {
    "counter": [{"name": "InferenceRequestCount", "unit": "count", "dimensions": []}],
    "gauge": [{"name": "SizeOfImage", "unit": "kB", "dimensions": ["ModelName", "Level"]}],
}

MODELS = {
    # model-config.yaml wins over these at start-up.
    "deps": {
        "1.0": {
            "marName": "deps.mar",
            "minWorkers": 1,
            "maxWorkers": 1,
            "batchSize": 4,
            "maxBatchDelay": 50,
            "responseTimeout": 99,
        }
    }
}


@dataclass(frozen=True)
class Urls:
    inference: str
    management: str
    metrics: str


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("archive-env")
    store = work / "store"
    store.mkdir()
    build_archive(
        work,
        "deps",
        "handler.py",
        {
            "handler.py": DEPS_HANDLER,
            "model-config.yaml": DEPS_CONFIG,
            "requirements.txt": f"{REQUIREMENT}\n",
        },
        config="model-config.yaml",
        requirements="requirements.txt",
        export_dir=store,
    )
    build_archive(work, "probe", "handler.py", {"handler.py": PROBE_HANDLER}, export_dir=store)
    build_archive(work, "metered", "handler.py", {"handler.py": METRICS_HANDLER}, export_dir=store)
    build_archive(
        work,
        "configured",
        "handler.py",
        {"handler.py": PROBE_HANDLER, "model-config.yaml": API_CONFIG},
        config="model-config.yaml",
        export_dir=store,
    )
    build_archive(
        work,
        "badreq",
        "handler.py",
        {"handler.py": PROBE_HANDLER, "requirements.txt": "torchgate-no-such-package==0.0.1\n"},
        requirements="requirements.txt",
        export_dir=store,
    )
    # TorchServe's own metrics.yaml (its frontend reads ts_metrics) with the example's
    # model_metrics.
    metrics = yaml.safe_load((Path(ts.__file__).parent / "configs" / "metrics.yaml").read_text())
    metrics["model_metrics"] = MODEL_METRICS
    (work / "metrics.yaml").write_text(yaml.safe_dump(metrics))
    (work / "config.properties").write_text(
        "\n".join(
            [
                f"model_store={store}",
                "load_models=deps.mar,probe.mar,metered.mar",
                "install_py_dep_per_model=true",
                "enable_model_api=true",
                "metrics_mode=prometheus",
                f"metrics_config={work / 'metrics.yaml'}",
                "model_metrics_auto_detect=true",
                "default_workers_per_model=1",
                f"models={json.dumps(MODELS)}",
                "",
            ]
        )
    )
    return store


@pytest.fixture(scope="module")
def servers(store: Path) -> Iterator[dict[str, Urls]]:
    config = store.parent / "config.properties"
    # Started side by side: each spends most of its start-up installing requirements and
    # loading workers, so waiting for one before starting the other would double that.
    with ThreadPoolExecutor(1) as pool, ExitStack() as stack:
        starting = running_torchgate(config)
        torchgate_ready = pool.submit(starting.__enter__)
        try:
            torchserve = stack.enter_context(running_torchserve(store, config))
        finally:
            torchgate = torchgate_ready.result()
            stack.push(starting.__exit__)
        yield {
            "torchserve": Urls(
                torchserve.inference_url, torchserve.management_url, torchserve.metrics_url
            ),
            "torchgate": Urls(
                torchgate.inference_url, torchgate.management_url, torchgate.metrics_url
            ),
        }


def both(servers: dict[str, Urls], method: str, api: str, path: str) -> dict[str, httpx.Response]:
    return {
        name: httpx.request(method, getattr(urls, api) + path, timeout=120)
        for name, urls in servers.items()
    }


def frontend_settings(response: httpx.Response) -> dict[str, object]:
    described = response.json()[0]
    keys = ("batchSize", "maxBatchDelay", "responseTimeout", "minWorkers", "maxWorkers")
    return {key: described[key] for key in keys}


def test_requirements_are_installed_for_their_model_only(servers: dict[str, Urls]) -> None:
    deps = both(servers, "POST", "inference", "/predictions/deps")
    probe = both(servers, "POST", "inference", "/predictions/probe")
    for name in servers:
        assert deps[name].status_code == 200, deps[name].text
        assert deps[name].json() == {
            "module": "termcolor",
            "installed_in_model_dir": True,
            "greeting": "hello",
        }
        assert probe[name].json() == {"sees_termcolor": False}, name


def test_model_config_yaml_wins_over_models_at_startup(servers: dict[str, Urls]) -> None:
    described = both(servers, "GET", "management", "/models/deps")
    expected = {
        "batchSize": 2,
        "maxBatchDelay": 7,
        "responseTimeout": 33,
        "minWorkers": 1,
        "maxWorkers": 2,
    }
    for name, response in described.items():
        assert frontend_settings(response) == expected, name


def test_register_api_parameters_against_model_config_yaml(servers: dict[str, Urls]) -> None:
    # batch_size and max_batch_delay beat the yaml; its responseTimeout and workers beat the
    # API's (TorchServe's ModelManager.createModel and ApiUtils.handleRegister).
    query = (
        "/models?url=configured.mar&batch_size=5&max_batch_delay=11&response_timeout=77"
        "&initial_workers=1&synchronous=true"
    )
    registered = both(servers, "POST", "management", query)
    for name, response in registered.items():
        assert response.status_code == 200, (name, response.text)
    described = both(servers, "GET", "management", "/models/configured")
    assert frontend_settings(described["torchgate"]) == frontend_settings(described["torchserve"])
    assert frontend_settings(described["torchgate"]) == {
        "batchSize": 5,
        "maxBatchDelay": 11,
        "responseTimeout": 44,
        "minWorkers": 1,
        "maxWorkers": 1,
    }


def test_failing_requirements_fail_the_registration(servers: dict[str, Urls]) -> None:
    answers = both(servers, "POST", "management", "/models?url=badreq.mar&initial_workers=1")
    ts_answer, tg_answer = answers["torchserve"], answers["torchgate"]
    assert tg_answer.status_code == ts_answer.status_code, ts_answer.text
    assert tg_answer.json()["type"] == ts_answer.json()["type"]
    assert ts_answer.json()["message"] in tg_answer.json()["message"]
    assert "torchgate-no-such-package" in tg_answer.json()["message"]  # pip's own words
    # TorchServe is wrong here: it adds the version before installing and leaves it registered
    # without workers, so registering the fixed archive answers 409. torchgate registers nothing.
    described = both(servers, "GET", "management", "/models/badreq")
    assert described["torchserve"].status_code == 200
    assert described["torchgate"].status_code == 404
    # Both keep serving the other models.
    for response in both(servers, "POST", "inference", "/predictions/probe").values():
        assert response.status_code == 200


def test_declared_and_detected_handler_metrics(servers: dict[str, Urls]) -> None:
    for response in both(servers, "POST", "inference", "/predictions/metered").values():
        assert response.status_code == 200, response.text
    found = {}
    for name, urls in servers.items():
        samples, types = parse(httpx.get(urls.metrics + "/metrics", timeout=30).text)
        wanted = ("InferenceRequestCount", "SizeOfImage", "UndeclaredCount")
        found[name] = {
            (s.name, types.get(s.name), tuple(sorted(s.labels.items())), s.value)
            for s in samples
            if s.name in wanted
        }
    # Same names, types, labels (Hostname included) and values; only the label order differs.
    assert found["torchgate"] == found["torchserve"]
    assert {entry[0] for entry in found["torchgate"]} == {
        "InferenceRequestCount",
        "SizeOfImage",
        "UndeclaredCount",
    }


def snapshot_config(store: Path, tmp_path: Path, version: str, settings: dict[str, int]) -> Path:
    """A config.properties whose model_snapshot names configured.mar as `version`, one worker,
    with `settings` (the batch and timeout keys a TorchServe snapshot always has)."""
    entry = {"defaultVersion": True, "marName": "configured.mar", "minWorkers": 1, "maxWorkers": 1}
    snapshot = {"name": "startup.cfg", "modelCount": 1}
    snapshot["models"] = {"configured": {version: {**entry, **settings}}}
    config = tmp_path / "config.properties"
    config.write_text(f"model_store={store}\nmodel_snapshot={json.dumps(snapshot)}\n")
    return config


def test_a_model_snapshot_key_wins_over_model_config_yaml(store: Path, tmp_path: Path) -> None:
    # KServe's layout names its models in config.properties' model_snapshot. TorchServe
    # restores a snapshot's settings as they are: the archive's yaml (batchSize 3,
    # maxBatchDelay 9, responseTimeout 44) does not override them, unlike models={...}.
    settings = {"batchSize": 4, "maxBatchDelay": 50, "responseTimeout": 77}
    config = snapshot_config(store, tmp_path, "1.0", settings)
    with running_torchserve(store, config) as ts, running_torchgate(config) as tg:
        for name, management in (
            ("torchserve", ts.management_url),
            ("torchgate", tg.management_url),
        ):
            described = httpx.get(management + "/models/configured", timeout=60)
            assert frontend_settings(described) == {
                **settings,
                "minWorkers": 1,
                "maxWorkers": 1,
            }, name


def test_a_model_snapshot_entry_registers_its_archives_version(store: Path, tmp_path: Path) -> None:
    # TorchServe registers the archive's own version (1.0 here) whatever the entry's key says;
    # the key only finds the entry's settings. torchgate registered it as "2.0".
    settings = {"batchSize": 4, "maxBatchDelay": 5, "responseTimeout": 60}
    config = snapshot_config(store, tmp_path, "2.0", settings)
    with running_torchserve(store, config) as ts, running_torchgate(config) as tg:
        for name, management in (
            ("torchserve", ts.management_url),
            ("torchgate", tg.management_url),
        ):
            described = httpx.get(management + "/models/configured/all", timeout=60).json()
            assert [(d["modelVersion"], d["batchSize"]) for d in described] == [("1.0", 4)], name
