"""torchgate as KServe's PyTorch runtime: KServe v1 and v2 through the `kserve` SDK's own clients.

One real torchgate (worker processes, uvicorn, gRPC) serves a KServe storage layout
(config/config.properties with `model_snapshot`, model-store/) as is; one real TorchServe 0.12
with `service_envelope=kserve` (what KServe's runtime sets for v1) answers the same v1
requests, for the differential tests.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from cloudevents.http import CloudEvent, from_http, to_binary, to_structured
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

from tests.support.aio import run
from tests.support.kserve import build_layout, start_together
from tests.support.server import TorchgateServer, running_torchgate
from tests.support.torchserve import TorchServe, running_torchserve

pytestmark = pytest.mark.integration

MAX_ITEMS = 8


@dataclass(frozen=True)
class Servers:
    tg: TorchgateServer
    ts: TorchServe
    layout: Path


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    root = tmp_path_factory.mktemp("kserve-layout")
    config = build_layout(
        root, "echo", ["1.0"], extra={"torchgate.max_items_per_request": str(MAX_ITEMS)}
    )
    with ExitStack() as stack:
        # Started as KServe's runtime starts it (deploy/kserve/runtime.yaml).
        kserve_args = ["--ncs", f"--model-store={root / 'model-store'}"]
        tg, ts = start_together(
            stack,
            [
                running_torchgate(config, command="start", args=kserve_args),
                # TorchServe's own v1 endpoint, unwrapped by the envelope KServe's runtime sets.
                running_torchserve(
                    root / "model-store",
                    models="echo=echo_v1_0.mar",
                    # Its metrics API in Prometheus form (0.12's default is log lines).
                    extra_config={"service_envelope": "kserve", "metrics_mode": "prometheus"},
                ),
            ],
        )
        assert isinstance(tg, TorchgateServer) and isinstance(ts, TorchServe)
        yield Servers(tg, ts, root)


def v1_client() -> InferenceRESTClient:
    return InferenceRESTClient(RESTConfig(protocol="v1", timeout=30))


def test_v2_lists_models(servers: Servers) -> None:
    """KServe's model server answers GET /v2/models with its models' names."""
    reply = httpx.get(f"{servers.tg.inference_url}/v2/models")
    assert (reply.status_code, reply.json()) == (200, {"models": ["echo"]})


def test_v1_lists_models_and_readiness(servers: Servers) -> None:
    url = servers.tg.inference_url
    assert httpx.get(f"{url}/v1/models").json() == {"models": ["echo"]}
    assert httpx.get(f"{url}/v1/models/echo").json() == {"name": "echo", "ready": True}

    async def sdk() -> tuple[bool, bool]:
        client = v1_client()
        try:
            return await client.is_server_live(url), await client.is_model_ready(url, "echo")
        finally:
            await client.close()

    assert run(sdk()) == (True, True)


def test_v1_unknown_model_is_kserve_404(servers: Servers) -> None:
    url = servers.tg.inference_url
    for reply in (
        httpx.get(f"{url}/v1/models/nope"),
        httpx.post(f"{url}/v1/models/nope:predict", json={"instances": [1]}),
        # 404 whatever the body holds: KServe looks the model up before parsing it.
        httpx.post(f"{url}/v1/models/nope:predict", json={"rows": [1]}),
        httpx.post(f"{url}/v1/models/nope:predict", content=b"not json"),
    ):
        assert reply.status_code == 404
        assert reply.headers["content-type"] == "application/json"
        assert reply.json() == {"error": "Model with name nope does not exist."}

    async def sdk() -> str:
        client = v1_client()
        try:
            await client.infer(url, {"instances": [1]}, model_name="nope")
        except httpx.HTTPStatusError as exc:
            return str(exc)
        finally:
            await client.close()
        return ""

    assert "Model with name nope does not exist." in run(sdk())


def test_v1_predict_and_explain_with_the_sdk(servers: Servers) -> None:
    url = servers.tg.inference_url
    instances = [{"data": "a"}, {"data": "b"}, [1, 2], 3]

    async def sdk() -> tuple[Any, Any]:
        client = v1_client()
        try:
            predicted = await client.infer(url, {"instances": instances}, model_name="echo")
            explained = await client.explain(url, "echo", {"instances": instances[:1]})
            return predicted, explained
        finally:
            await client.close()

    predicted, explained = run(sdk())
    assert predicted == {
        "predictions": [
            {"echo": "a", "version": "1.0", "explain": "False"},
            {"echo": "b", "version": "1.0", "explain": "False"},
            {"echo": [1, 2], "version": "1.0", "explain": "False"},
            {"echo": 3, "version": "1.0", "explain": "False"},
        ]
    }
    assert explained == {"explanations": [{"echo": "a", "version": "1.0", "explain": "True"}]}


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (b"{not json", 400, "Unrecognized request format"),
        (b'{"inputs": [1]}', 400, 'Expected "instances" to be a list'),
        (b'{"instances": 1}', 400, 'Expected "instances" to be a list'),
        (json.dumps({"instances": [0] * (MAX_ITEMS + 1)}).encode(), 413, "over the limit"),
        (b'{"instances": [{"data": 1}, {"status": 422}]}', 422, "instance refused"),
    ],
)
def test_v1_bad_requests_get_kserve_errors(
    servers: Servers, body: bytes, status: int, error: str
) -> None:
    reply = httpx.post(f"{servers.tg.inference_url}/v1/models/echo:predict", content=body)
    assert reply.status_code == status
    assert set(reply.json()) == {"error"}
    assert error in reply.json()["error"]


def test_v1_no_instances(servers: Servers) -> None:
    reply = httpx.post(f"{servers.tg.inference_url}/v1/models/echo:predict", json={"instances": []})
    assert reply.status_code == 200
    assert reply.json() == {"predictions": []}


def test_v2_rest_and_grpc_with_the_sdk(servers: Servers) -> None:
    tg = servers.tg

    def request() -> InferRequest:
        tensor = InferInput("x", [1, 2], "FP32")
        tensor.set_data_from_numpy(np.array([[1.5, 2.5]], dtype=np.float32))
        return InferRequest(model_name="echo", infer_inputs=[tensor], request_id="r1")

    async def sdk() -> tuple[Any, Any, bool]:
        rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
        grpc_client = InferenceGRPCClient(f"127.0.0.1:{tg.grpc_inference_port}", timeout=30)
        try:
            over_rest = await rest.infer(tg.inference_url, request(), model_name="echo")
            over_grpc = await grpc_client.infer(request())
            ready = await grpc_client.is_model_ready("echo")
            return over_rest, over_grpc, ready and await rest.is_server_ready(tg.inference_url)
        finally:
            await rest.close()
            await grpc_client.close()

    over_rest, over_grpc, ready = run(sdk())
    assert ready
    for response in (over_rest, over_grpc):
        assert response.model_name == "echo"
        (output,) = response.outputs
        assert output.datatype == "BYTES"
        answer = json.loads(output.as_numpy()[0])
        assert answer == {"echo": [[1.5, 2.5]], "version": "1.0", "explain": None}


def test_kserve_v1_against_torchserve(servers: Servers) -> None:
    """TorchServe's own /v1/models/{m}:predict with service_envelope=kserve, same archive."""
    requests = [
        ("echo:predict", {"instances": [{"data": "a"}, {"data": "b"}, [1, 2]]}),
        ("echo:explain", {"instances": [{"data": "a"}]}),
    ]
    before = {
        url: requests_counted(url) for url in (servers.ts.metrics_url, servers.tg.metrics_url)
    }
    for path, body in requests:
        theirs = httpx.post(f"{servers.ts.inference_url}/v1/models/{path}", json=body, timeout=30)
        ours = httpx.post(f"{servers.tg.inference_url}/v1/models/{path}", json=body)
        assert (ours.status_code, ours.json()) == (theirs.status_code, theirs.json()), path
    # TorchServe's counter counts a client's request once, whatever its instances, under the
    # version label "default" (the path named none); torchgate's ts_* counter too.
    counted = {url: requests_counted(url) - n for url, n in before.items()}
    assert list(counted.values()) == [len(requests)] * 2, counted


def requests_counted(metrics_url: str) -> float:
    """ts_inference_requests_total of echo's default-labelled series (0 before any)."""
    text = httpx.get(
        f"{metrics_url}/metrics", params={"name[]": "ts_inference_requests_total"}
    ).text
    found = re.search(r'model_name="echo",model_version="default".*\} (\S+)', text)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_v1_cloudevents_are_answered_in_kind(servers: Servers, mode: str) -> None:
    """Knative Eventing's request, sent with the CloudEvents SDK: unwrapped, answered with an
    event in the same mode, read back by the SDK, as KServe's model server does."""
    url = f"{servers.tg.inference_url}/v1/models/echo:predict"
    request = {"instances": [{"data": "a"}, {"data": "b"}]}
    plain = httpx.post(url, json=request)
    assert plain.status_code == 200, plain.text
    event = CloudEvent({"type": "com.example.request", "source": "tests"}, request)
    headers, body = to_binary(event) if mode == "binary" else to_structured(event)
    reply = httpx.post(url, headers=headers, content=body)
    assert reply.status_code == 200, reply.text
    expected = "application/json" if mode == "binary" else "application/cloudevents+json"
    assert reply.headers["content-type"] == expected
    assert ("ce-id" in reply.headers) == (mode == "binary")
    answer = from_http(dict(reply.headers), reply.content)
    assert answer["type"] == "io.kserve.inference.response"
    assert answer["source"] == "io.kserve.inference.echo"
    assert answer["id"] != event["id"] and answer["time"]
    data = answer.get_data()
    assert (json.loads(data) if isinstance(data, bytes | str) else data) == plain.json()
