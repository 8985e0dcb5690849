"""Fuzz the REST APIs from torchgate's own OpenAPI documents against a real server.

One `torchgate serve` (real uvicorn, real worker processes) serves digits 1.0 and 2.0 and a
throwaway `scratch` model, with the model API on. The inference API's document is
`/api-description` (FastAPI's schema plus the plain-ASGI `/predictions` paths), the management
API's is `/openapi.json`. For every operation, schemathesis generates requests that follow the
document (positive) and requests that break it (negative); path parameters are either
generated or the names of real models and versions, so requests reach the handlers and not only
404. Every response must be below 500 and come back within `REQUEST_TIMEOUT`; after the run,
the server still answers /ping and a good prediction.

What is kept from harming the rest of the run (each stays fuzzed, on a target it cannot break):
unregister (DELETE) only ever names models that do not exist; scaling, set-default and
traffic policies reach only `scratch` or generated names; worker counts are clamped to
0..`MAX_FUZZ_WORKERS` (forking hundreds of workers on 2 cores is the worker bound's business).

`test_every_operation_is_fuzzed` fails when the documents gain an operation this file does not
know, so a new route cannot slip past the fuzzer. The 5xx this fuzzing found (a register url
the OS cannot look up; /ping after a scale to 0) have regression tests at the end.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import given
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.support.archives import build_archive
from tests.support.fuzzing import fuzz_settings
from tests.support.server import TorchgateServer, running_torchgate

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
STORE = ROOT / "model_store"

EXAMPLES = 10  # per operation and generation mode (times FUZZ_SCALE)
REQUEST_TIMEOUT = 10.0  # seconds; a request slower than this is a hang
MAX_FUZZ_WORKERS = 2

# A model the fuzzer may scale, re-route and re-default freely: echoes its body's length.
SCRATCH = """
def handle(data, context):
    if data is None:
        return None
    return [len(str(row.get("body") or row.get("data") or "")) for row in data]
"""

MODELS = {
    "digits": {
        "1.0": {"marName": "digits.mar", "defaultVersion": True, "batchSize": 8},
        "2.0": {"marName": "digits_v2.mar", "batchSize": 8},
    },
    "scratch": {"1.0": {"marName": "scratch.mar", "responseTimeout": 5}},
}
REAL_NAMES = ["digits", "scratch"]
REAL_VERSIONS = ["1.0", "2.0", "all"]

# Operation -> the model names its fuzzing may use besides generated ones. Empty: generated
# names only (never a loaded model); None: the operation has no model in its path.
INFERENCE_OPERATIONS: dict[str, list[str] | None] = {
    "GET /ping": None,
    "OPTIONS /": None,
    "GET /api-description": None,
    "GET /v2": None,
    "GET /v2/health/live": None,
    "GET /v2/health/ready": None,
    "GET /v2/models": None,
    "GET /v2/models/{model}": REAL_NAMES,
    "GET /v2/models/{model}/versions/{version}": REAL_NAMES,
    "GET /v2/models/{model}/ready": REAL_NAMES,
    "GET /v2/models/{model}/versions/{version}/ready": REAL_NAMES,
    "POST /predictions/{model_name}": REAL_NAMES,
    "POST /predictions/{model_name}/{model_version}": REAL_NAMES,
    "POST /v2/models/{model}/infer": REAL_NAMES,
    "POST /v2/models/{model}/versions/{version}/infer": REAL_NAMES,
    "GET /": None,
    "GET /v1/models": None,
    "GET /v1/models/{model}": REAL_NAMES,
    "POST /v1/models/{model}:predict": REAL_NAMES,
    "POST /v1/models/{model}:explain": REAL_NAMES,
}
# `POST /token` is there only with token authorization on, and this server runs with it off.
MANAGEMENT_OPERATIONS: dict[str, list[str] | None] = {
    "GET /models": None,
    "POST /models": None,
    "GET /models/{model_name}": REAL_NAMES,
    "GET /models/{model_name}/all": REAL_NAMES,
    "GET /models/{model_name}/{version}": REAL_NAMES,
    "GET /models/{model_name}/traffic": REAL_NAMES,
    "PUT /models/{model_name}/traffic": ["scratch"],
    "DELETE /models/{model_name}/traffic": ["scratch"],
    "PUT /models/{model_name}": ["scratch"],
    "PUT /models/{model_name}/{version}": ["scratch"],
    "PUT /models/{model_name}/{version}/set-default": ["scratch"],
    "DELETE /models/{model_name}": [],
    "DELETE /models/{model_name}/{version}": [],
    # Workflows: the fuzz store holds no .war, so registrations fail; names are generated.
    "POST /workflows": None,
    "GET /workflows": None,
    "GET /workflows/{workflow_name}": None,
    "DELETE /workflows/{workflow_name}": None,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchgateServer]:
    work = tmp_path_factory.mktemp("fuzz-rest")
    store = work / "store"
    store.mkdir()
    for name in ("digits.mar", "digits_v2.mar"):
        (store / name).symlink_to(STORE / name)
    build_archive(work, "scratch", "scratch.py", {"scratch.py": SCRATCH}, export_dir=store)
    config = {
        "model_store": str(store),
        "load_models": "digits.mar,digits_v2.mar,scratch.mar",
        "models": json.dumps(MODELS),
        "enable_model_api": "true",
        "max_request_size": "200000",
    }
    with running_torchgate("".join(f"{k}={v}\n" for k, v in config.items())) as tg:
        yield tg


@pytest.fixture(scope="module")
def documents(server: TorchgateServer) -> dict[str, dict[str, Any]]:
    return {
        server.inference_url: httpx.get(f"{server.inference_url}/api-description").json(),
        server.management_url: httpx.get(f"{server.management_url}/openapi.json").json(),
    }


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def operations(document: dict[str, Any]) -> set[str]:
    return {
        f"{method.upper()} {path}"
        for path, item in document["paths"].items()
        for method in item
        if method in ("get", "put", "post", "delete", "options", "patch", "head")
    }


def test_every_operation_is_fuzzed(
    server: TorchgateServer, documents: dict[str, dict[str, Any]]
) -> None:
    assert operations(documents[server.inference_url]) == set(INFERENCE_OPERATIONS)
    assert operations(documents[server.management_url]) == set(MANAGEMENT_OPERATIONS)


def case_strategy(operation: schemathesis.APIOperation, names: list[str] | None) -> Any:
    """Generated cases, plus cases whose model (and version) are real ones from `names`."""
    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    strategies = [operation.as_strategy(generation_mode=mode) for mode in modes]
    path_names = {p.name for p in operation.path_parameters}
    model_key = next((k for k in ("model_name", "model") if k in path_names), None)
    version_key = next((k for k in ("model_version", "version") if k in path_names), None)
    if names and model_key:
        versions: list[str | None] = list(REAL_VERSIONS) if version_key else [None]
        for name, version in itertools.product(names, versions):
            fixed = {model_key: name} | ({version_key: version} if version_key else {})
            strategies.append(
                operation.as_strategy(
                    generation_mode=GenerationMode.POSITIVE, path_parameters=fixed
                )
            )
    return st.one_of(strategies)


def clamp_workers(case: schemathesis.Case) -> None:
    for key in ("min_worker", "max_worker", "initial_workers"):
        value = (case.query or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            case.query[key] = min(max(value, 0), MAX_FUZZ_WORKERS)


def fuzz(
    base_url: str,
    document: dict[str, Any],
    label: str,
    names: list[str] | None,
    session: requests.Session,
) -> None:
    method, path = label.split(" ", 1)
    operation = schemathesis.openapi.from_dict(document)[path][method]

    @fuzz_settings(EXAMPLES * 2)
    @given(case=case_strategy(operation, names))
    def run(case: schemathesis.Case) -> None:
        clamp_workers(case)
        try:
            response = case.call(base_url=base_url, session=session, timeout=REQUEST_TIMEOUT)
        except requests.Timeout:
            pytest.fail(f"no answer in {REQUEST_TIMEOUT} s:\n{case.as_curl_command()}")
        assert response.status_code < 500, (
            f"{response.status_code} {response.text[:500]}\n{case.as_curl_command()}"
        )

    run()


def healthy_after(server: TorchgateServer) -> None:
    assert httpx.get(f"{server.inference_url}/ping", timeout=30).status_code == 200
    answer = httpx.post(
        f"{server.inference_url}/predictions/digits/1.0", json=[0.0] * 64, timeout=30
    )
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("label", sorted(INFERENCE_OPERATIONS))
def test_inference_api(
    label: str,
    server: TorchgateServer,
    documents: dict[str, dict[str, Any]],
    session: requests.Session,
) -> None:
    base = server.inference_url
    fuzz(base, documents[base], label, INFERENCE_OPERATIONS[label], session)
    healthy_after(server)


@pytest.mark.parametrize("label", sorted(MANAGEMENT_OPERATIONS))
def test_management_api(
    label: str,
    server: TorchgateServer,
    documents: dict[str, dict[str, Any]],
    session: requests.Session,
) -> None:
    base = server.management_url
    fuzz(base, documents[base], label, MANAGEMENT_OPERATIONS[label], session)
    healthy_after(server)


# Found by this fuzzing: a url with a NUL byte or a name past NAME_MAX answered 500 (from
# Path.resolve); one model scaled to 0 on purpose turned /ping unhealthy for the whole server.
@pytest.mark.parametrize("url", ["model\x00.mar", "a" * 300 + ".mar"])
def test_register_url_the_os_cannot_look_up_is_refused(server: TorchgateServer, url: str) -> None:
    answer = httpx.post(f"{server.management_url}/models", params={"url": url}, timeout=30)
    assert answer.status_code == 400, answer.text


def test_ping_stays_healthy_after_scale_to_zero(server: TorchgateServer) -> None:
    scale = f"{server.management_url}/models/scratch?synchronous=true"
    try:
        assert httpx.put(f"{scale}&min_worker=0", timeout=30).status_code == 200
        ping = httpx.get(f"{server.inference_url}/ping", timeout=30)
        assert ping.status_code == 200, ping.text
    finally:
        assert httpx.put(f"{scale}&min_worker=1&max_worker=1", timeout=30).status_code == 200
