"""Built-in handler archives behind torchgate's REST API, as TorchServe's clients call them:
``curl -T kitten.jpg``, ``curl -F data=@kitten.jpg``, and the segmenter's JSON answer."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import torch

from api.backends.workers import GpuRoundRobin
from api.workers.pool import WorkerPool
from tests.handlers.builtin.conftest import model_class, torchscript
from tests.handlers.builtin.images import encode, imagenet_reference, random_image
from tests.handlers.builtin.test_image_classifier import SOURCE as CLASSIFIER
from tests.handlers.builtin.test_image_classifier import top5
from tests.handlers.builtin.test_image_segmenter import SOURCE as SEGMENTER
from tests.handlers.builtin.test_image_segmenter import reference as segment_reference
from tests.support import aio
from tests.support.archives import build_archive
from tests.support.inprocess import started_torchgate
from tests.support.workers import worker_loader

JPEG = encode(random_image(320, 240, seed=10), "JPEG")


def test_classifier_and_segmenter_over_rest(worker_pool: WorkerPool, tmp_path: Path) -> None:
    store = tmp_path / "model_store"
    torch.manual_seed(5)
    classifier = model_class(CLASSIFIER, tmp_path)().eval()
    segmenter = model_class(SEGMENTER, tmp_path)().eval()
    for name, handler, model in (
        ("cls", "image_classifier", classifier),
        ("seg", "image_segmenter", segmenter),
    ):
        packed = torchscript(model)
        build_archive(
            tmp_path, name, handler, packed.files, serialized=packed.serialized, export_dir=store
        )

    async def scenario() -> list[httpx.Response]:
        config = {"model_store": str(store), "load_models": "cls.mar,seg.mar"}
        loader = worker_loader(worker_pool, gpus=GpuRoundRobin(0))
        async with started_torchgate(tmp_path, config, loader) as run:
            transport = httpx.ASGITransport(app=run.tg.inference_app)
            async with httpx.AsyncClient(transport=transport, base_url="http://tg") as client:
                return [
                    await client.post("/predictions/cls", content=JPEG),
                    await client.post("/predictions/cls", files={"data": ("k.jpg", JPEG)}),
                    await client.post("/predictions/cls", content=b"not an image"),
                    await client.post("/predictions/seg", content=JPEG),
                ]

    raw, form, bad, segmented = aio.run(scenario(), 60)
    expected = top5(classifier, imagenet_reference(JPEG), names=None)
    for response in (raw, form):
        assert response.status_code == 200, response.text
        answer = response.json()
        assert list(answer) == list(expected)
        assert np.allclose(list(answer.values()), list(expected.values()), rtol=1e-4)
    assert bad.status_code == 400 and "not an image" in bad.json()["message"]
    assert segmented.status_code == 200
    pixels = np.array(json.loads(segmented.content), dtype=np.float32)
    want = segment_reference(segmenter, JPEG)
    assert pixels.shape == (224, 224, 2)
    np.testing.assert_array_equal(pixels[..., 0], want[..., 0])
    np.testing.assert_allclose(pixels[..., 1], want[..., 1], rtol=1e-4, atol=1e-6)
