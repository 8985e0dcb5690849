"""Bounded inputs on a real `torchgate serve` with the example archives (docs/security.md,
"Inputs to the shipped handlers and the prediction APIs"): every case answers its own client
with a clear 4xx, costs the server neither memory nor time, and the next client is served.

One server for the module, with the default limits; gRPC through the generated stubs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import psutil
import pytest

from api.rpc.generated import grpc_predict_v2_pb2 as pb
from api.rpc.generated import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.support.bombs import deep_json, png_bomb
from tests.support.server import TorchgateServer, running_torchgate

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STORE = ROOT / "model_store"
MAX_ITEMS = 1024  # torchgate.max_items_per_request's default
FINITE = "pixel values must be finite numbers"


@pytest.fixture(scope="module")
def server() -> Iterator[TorchgateServer]:
    # 1024 embeddings are about 8 MB of JSON: over max_response_size's default (6553500), as
    # they would be on TorchServe.
    config = f"model_store={STORE}\nload_models=digits.mar,minilm.mar\n"
    config += "max_response_size=16777216\n"
    with running_torchgate(config, startup_timeout=180) as tg:
        yield tg


@pytest.fixture(scope="module")
def stub(server: TorchgateServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_inference_port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def workers_rss(server: TorchgateServer) -> int:
    """Resident bytes of the server and every process under it (zygote, workers)."""
    root = psutil.Process(server.process.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def digits_ok(server: TorchgateServer) -> None:
    """A good client is served."""
    response = httpx.post(f"{server.inference_url}/predictions/digits", json=[0.0] * 64)
    assert response.status_code == 200, response.text


def v2_binary(rows: np.ndarray) -> tuple[bytes, dict[str, str]]:
    raw = rows.astype(np.float32).tobytes()
    header = {
        "inputs": [
            {
                "name": "pixels",
                "shape": list(rows.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ]
    }
    head = json.dumps(header).encode()
    return head + raw, {"inference-header-content-length": str(len(head))}


def grpc_request(rows: np.ndarray, *, raw: bool) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="pixels", datatype="FP32", shape=rows.shape)
    if raw:
        request.raw_input_contents.append(rows.astype(np.float32).tobytes())
    else:
        tensor.contents.fp32_contents.extend(rows.ravel().tolist())
    return request


def test_a_png_bomb_is_refused_from_its_header(server: TorchgateServer) -> None:
    """164 KB of PNG declaring 13000x13000 pixels cost 1.45 GB of RSS, never returned, and
    stalled digits 6.7 s."""
    digits_ok(server)
    before = workers_rss(server)
    started = time.perf_counter()
    response = httpx.post(
        f"{server.inference_url}/predictions/digits", content=png_bomb(), timeout=60
    )
    elapsed = time.perf_counter() - started
    assert response.status_code == 413
    assert response.json()["message"] == (
        "image of 13000x13000 pixels is over the limit of 40,000,000 pixels"
    )
    assert workers_rss(server) - before < 200 * 2**20  # decoding it took 1.45 GB
    assert elapsed < 3.0  # decoding it took 5-7 s here; the header takes milliseconds
    digits_ok(server)


def test_megabytes_of_text_embed_like_their_first_tokens(server: TorchgateServer) -> None:
    url = f"{server.inference_url}/predictions/minilm"
    huge = " ".join(["tokens"] * 900_000)  # 6.3 MB, under max_request_size
    long = " ".join(["tokens"] * 400)  # past the model's 256 tokens too
    answers = [httpx.post(url, content=text.encode(), timeout=60) for text in (huge, long)]
    assert [a.status_code for a in answers] == [200, 200]
    np.testing.assert_allclose(answers[0].json(), answers[1].json(), atol=1e-6)


def test_non_finite_pixels_are_400_on_every_api(
    server: TorchgateServer, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    rows = np.zeros((2, 64), np.float32)
    rows[1, 5] = np.nan
    infinite = rows.copy()
    infinite[1, 5] = np.inf
    url = f"{server.inference_url}/v2/models/digits/infer"
    for bad in (rows, infinite):
        body, headers = v2_binary(bad)
        response = httpx.post(url, content=body, headers=headers)
        assert (response.status_code, response.json()) == (400, {"error": FINITE})
        for raw in (True, False):
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(grpc_request(bad, raw=raw), timeout=30)
            assert (info.value.code(), info.value.details()) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                FINITE,
            )
    # /predictions: Python's json reads NaN in a text body (orjson refuses it as JSON).
    text = "[" + ", ".join(["NaN"] + ["0"] * 63) + "]"
    response = httpx.post(
        f"{server.inference_url}/predictions/digits",
        content=text,
        headers={"content-type": "text/plain"},
    )
    assert (response.status_code, response.json()["message"]) == (400, FINITE)
    digits_ok(server)


def test_items_per_v2_request_are_bounded(
    server: TorchgateServer, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    url = f"{server.inference_url}/v2/models/digits/infer"
    fits = np.zeros((MAX_ITEMS, 64), np.float32)
    over = np.zeros((MAX_ITEMS + 1, 64), np.float32)
    message = (
        f"input 'pixels' holds {MAX_ITEMS + 1} items (shape [{MAX_ITEMS + 1}, 64]), over the "
        f"limit of {MAX_ITEMS} per request: send them in several requests"
    )
    body, headers = v2_binary(fits)
    assert httpx.post(url, content=body, headers=headers, timeout=60).status_code == 200
    body, headers = v2_binary(over)
    response = httpx.post(url, content=body, headers=headers)
    assert (response.status_code, response.json()) == (413, {"error": message})
    json_body = {
        "inputs": [{"name": "pixels", "shape": [MAX_ITEMS + 1, 64], "datatype": "FP32", "data": []}]
    }
    json_body["inputs"][0]["data"] = over.ravel().tolist()
    assert httpx.post(url, json=json_body).status_code == 413
    assert stub.ModelInfer(grpc_request(fits, raw=True), timeout=60).outputs[0].shape == [
        MAX_ITEMS,
        10,
    ]
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(grpc_request(over, raw=True), timeout=30)
    assert (info.value.code(), info.value.details()) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        message,
    )


def test_items_per_request_are_bounded_for_the_handlers_on_every_api(
    server: TorchgateServer,
) -> None:
    """/predictions has no v2 codec in front: the handler counts the rows it decoded."""
    url = f"{server.inference_url}/predictions"
    texts = httpx.post(f"{url}/minilm", json=["a"] * (MAX_ITEMS + 1), timeout=60)
    assert (texts.status_code, texts.json()["message"]) == (
        413,
        f"{MAX_ITEMS + 1} items in one request, over the limit of {MAX_ITEMS}: "
        "send them in several requests",
    )
    rows = np.zeros((MAX_ITEMS + 1, 64)).tolist()
    v2_body = {"inputs": [{"name": "pixels", "shape": [MAX_ITEMS + 1, 64], "data": rows}]}
    assert httpx.post(f"{url}/digits", json=v2_body, timeout=60).status_code == 413
    assert httpx.post(f"{url}/minilm", json=["a"] * MAX_ITEMS, timeout=60).status_code == 200


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/predictions/digits", "application/json"),
        ("/predictions/digits", "text/plain"),
        ("/predictions/digits", "application/octet-stream"),
        ("/predictions/minilm", "text/plain"),
        ("/v2/models/digits/infer", "application/json"),
        ("/v2/models/minilm/infer", "application/json"),
    ],
)
def test_deeply_nested_json_is_400_on_inference(
    server: TorchgateServer, path: str, content_type: str
) -> None:
    """100,000 nested arrays answered 500 RecursionError."""
    response = httpx.post(
        f"{server.inference_url}{path}",
        content=deep_json(),
        headers={"content-type": content_type},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    digits_ok(server)


def test_deeply_nested_json_is_400_on_management(server: TorchgateServer) -> None:
    response = httpx.put(
        f"{server.management_url}/models/digits/traffic",
        content=b'{"weights": ' + deep_json() + b"}",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert httpx.get(f"{server.management_url}/models/digits").status_code == 200
