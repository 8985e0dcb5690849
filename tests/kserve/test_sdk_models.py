"""The `kserve` SDK's own clients with the example models (test_runtime.py runs them against
KServe's storage layout with an echo archive).

`kserve.InferenceRESTClient` (v1 and v2, JSON and binary tensors) and
`kserve.InferenceGRPCClient`, unchanged, against one `torchgate serve` with digits 1.0
(TorchScript), digits 2.0 (ONNX) and minilm; answers are checked against the TorchServe-style
`/predictions` API of the same server, errors against what the SDK raises for KServe's own model
server (`httpx.HTTPStatusError`, gRPC `NOT_FOUND`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

import grpc
import httpx
import numpy as np
import pytest
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from sklearn.datasets import load_digits

from tests.support.server import ROOT, TorchgateServer, running_torchgate

pytestmark = pytest.mark.integration

T = TypeVar("T")
TEXTS = ["hello world", "torchgate serves TorchServe archives"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchgateServer]:
    for name in ("digits.mar", "digits_v2.mar", "minilm.mar"):
        if not (ROOT / "model_store" / name).exists():
            pytest.skip(f"model_store/{name} is not built (torchgate export --all)")
    config = (ROOT / "config.properties").read_text() + (
        f"\nmodel_store={ROOT / 'model_store'}\nload_models=digits.mar,digits_v2.mar,minilm.mar\n"
    )
    with running_torchgate(config, workdir=tmp_path_factory.mktemp("kserve-sdk")) as tg:
        yield tg


def run(call: Awaitable[T]) -> T:
    return asyncio.run(call)  # type: ignore[arg-type]


async def rest(protocol: str, method: str, *args: Any, **kwargs: Any) -> Any:
    client = InferenceRESTClient(RESTConfig(protocol=protocol))
    try:
        return await getattr(client, method)(*args, **kwargs)
    finally:
        await client.close()


async def grpc_call(tg: TorchgateServer, method: str, *args: Any) -> Any:
    client = InferenceGRPCClient(f"127.0.0.1:{tg.grpc_inference_port}")
    try:
        return await getattr(client, method)(*args)
    finally:
        await client.close()


def images(count: int) -> np.ndarray:
    return load_digits().data[:count].astype(np.float32)


def pixels(rows: np.ndarray, *, binary: bool = False) -> InferInput:
    tensor = InferInput("pixels", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=binary)
    return tensor


def texts(values: list[str]) -> InferInput:
    tensor = InferInput("text", [len(values)], "BYTES")
    tensor.set_data_from_numpy(np.array([v.encode() for v in values], dtype=np.object_))
    return tensor


def top_labels(probabilities: np.ndarray) -> list[int]:
    return [int(label) for label in probabilities.argmax(axis=1)]


def served_labels(tg: TorchgateServer, rows: np.ndarray) -> list[int]:
    """The labels the TorchServe API of the same server gives, one request per row."""
    labels = []
    for row in rows:
        answer = httpx.post(f"{tg.inference_url}/predictions/digits", json=[row.tolist()]).json()
        labels.append(int(max(answer, key=answer.get)))
    return labels


def test_health_and_readiness(server: TorchgateServer) -> None:
    base = server.inference_url
    assert run(rest("v1", "is_server_live", base)) is True
    assert run(rest("v1", "is_model_ready", base, "digits")) is True
    assert run(rest("v2", "is_server_live", base)) is True
    assert run(rest("v2", "is_server_ready", base)) is True
    assert run(rest("v2", "is_model_ready", base, "minilm")) is True
    assert run(rest("v2", "is_model_ready", base, "nope")) is False  # the SDK maps 404 to False
    assert run(grpc_call(server, "is_server_live")) is True
    assert run(grpc_call(server, "is_server_ready")) is True
    assert run(grpc_call(server, "is_model_ready", "digits")) is True


def test_v1_predict(server: TorchgateServer) -> None:
    rows = images(4)
    answer = run(rest("v1", "infer", server.inference_url, {"instances": rows.tolist()}, "digits"))
    labels = [int(max(scores, key=scores.get)) for scores in answer["predictions"]]
    assert labels == served_labels(server, rows)
    answer = run(rest("v1", "infer", server.inference_url, {"instances": TEXTS}, "minilm"))
    assert np.array(answer["predictions"]).shape == (2, 384)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_v2_rest_infer(server: TorchgateServer, binary: bool) -> None:
    rows = images(4)
    request = InferRequest("digits", [pixels(rows, binary=binary)], request_id="sdk-1")
    answer = run(rest("v2", "infer", server.inference_url, request, "digits"))
    assert (answer.model_name, answer.id) == ("digits", "sdk-1")
    [output] = answer.outputs
    assert (output.name, output.datatype, output.shape) == ("probabilities", "FP32", [4, 10])
    assert top_labels(output.as_numpy()) == served_labels(server, rows)

    request = InferRequest("minilm", [texts(TEXTS)])
    [embedding] = run(rest("v2", "infer", server.inference_url, request, "minilm")).outputs
    assert (embedding.datatype, embedding.shape) == ("FP32", [2, 384])
    np.testing.assert_allclose(np.linalg.norm(embedding.as_numpy(), axis=1), 1.0, rtol=1e-4)


def test_v2_grpc_infer(server: TorchgateServer) -> None:
    rows = images(4)
    request = InferRequest("digits", [pixels(rows)], request_id="sdk-2")
    answer = run(grpc_call(server, "infer", request))
    assert answer.id == "sdk-2"
    [output] = answer.outputs
    assert (output.name, output.shape) == ("probabilities", [4, 10])
    assert top_labels(output.as_numpy()) == served_labels(server, rows)
    [embedding] = run(grpc_call(server, "infer", InferRequest("minilm", [texts(TEXTS)]))).outputs
    assert embedding.shape == [2, 384]


def test_rest_and_grpc_agree_and_grpc_names_a_version(server: TorchgateServer) -> None:
    """The same rows give the same probabilities over REST (binary) and gRPC; gRPC's
    `model_version` reaches digits 2.0 (ONNX). (The SDK's REST client has no way to name a
    version: its URL is always `/v2/models/{name}/infer`.)"""
    rows = images(8)
    request = InferRequest("digits", [pixels(rows, binary=True)])
    [over_rest] = run(rest("v2", "infer", server.inference_url, request, "digits")).outputs
    [over_grpc] = run(grpc_call(server, "infer", InferRequest("digits", [pixels(rows)]))).outputs
    np.testing.assert_array_equal(over_rest.as_numpy(), over_grpc.as_numpy())
    request = InferRequest("digits", [pixels(rows)], model_version="2.0")
    answer = run(grpc_call(server, "infer", request))
    assert answer.model_version == "2.0"
    expected = [
        httpx.post(f"{server.inference_url}/predictions/digits/2.0", json=[row.tolist()]).json()
        for row in rows
    ]
    labels = [int(max(scores, key=scores.get)) for scores in expected]
    assert top_labels(answer.outputs[0].as_numpy()) == labels


def test_errors_as_the_sdk_reports_them(server: TorchgateServer) -> None:
    base = server.inference_url
    with pytest.raises(httpx.HTTPStatusError) as caught:
        run(rest("v1", "infer", base, {"instances": [[1.0]]}, "nope"))
    assert caught.value.response.status_code == 404
    assert str(caught.value).startswith("Model with name nope does not exist.")
    # An unknown model is 404 whatever the body holds, as KServe's server answers it.
    with pytest.raises(httpx.HTTPStatusError) as caught:
        run(rest("v2", "infer", base, {"instances": [[1.0]]}, "nope"))
    assert caught.value.response.status_code == 404
    with pytest.raises(httpx.HTTPStatusError) as caught:
        run(rest("v1", "infer", base, {"rows": [[1.0]]}, "digits"))
    assert caught.value.response.status_code == 400
    with pytest.raises(httpx.HTTPStatusError) as caught:
        short = InferRequest("digits", [pixels(np.zeros((1, 63), np.float32))])
        run(rest("v2", "infer", base, short, "digits"))
    assert caught.value.response.status_code == 400
    with pytest.raises(grpc.aio.AioRpcError) as rpc:
        run(grpc_call(server, "is_model_ready", "nope"))
    assert rpc.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as rpc:
        run(grpc_call(server, "infer", InferRequest("nope", [pixels(images(1))])))
    assert rpc.value.code() == grpc.StatusCode.NOT_FOUND
