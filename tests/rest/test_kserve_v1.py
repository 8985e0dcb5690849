"""KServe v1 `:predict` over REST, in process (`api.rest.kserve_v1`), with fake archives
(tests/support/fake_backend.py): how a request's instances share the model's job queue. The
protocol itself, against TorchServe and the `kserve` SDK, is tests/kserve/test_runtime.py's."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.support.aio import run
from tests.support.fake_backend import load_fake_backend, write_fake_archive
from tests.support.inprocess import started_torchgate


def test_more_instances_than_the_job_queue_holds_are_answered(tmp_path: Path) -> None:
    """TorchServe takes a v1 request as one job: one with more instances than
    `job_queue_size` (and within `max_items_per_request`) is answered, not refused 503 with a
    Retry-After that no retry could ever satisfy."""

    async def scenario() -> None:
        store = tmp_path / "model_store"
        config = {
            "model_store": str(store),
            "load_models": write_fake_archive(store, "m", "1.0"),
            "job_queue_size": "2",
        }
        async with started_torchgate(tmp_path, config, load_fake_backend) as serving:
            transport = httpx.ASGITransport(app=serving.tg.inference_app)
            async with httpx.AsyncClient(transport=transport, base_url="http://tg") as client:
                instances = [f"i{n}" for n in range(7)]
                response = await client.post("/v1/models/m:predict", json={"instances": instances})
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert [p["body"] for p in predictions] == instances

    run(scenario())
