"""APIs configured on one address share a listener (`api.rest.apps.listeners`), as TorchServe
allows and KServe's example config.properties does (inference and management both on 8085)."""

from __future__ import annotations

from pathlib import Path

import httpx

from api.config import Address
from api.rest.apps import SharedPort, listeners
from tests.support.aio import run
from tests.support.inprocess import started_torchgate
from tests.support.tensor_backend import load_tensor_backend


def test_listeners_group_apis_by_address(tmp_path: Path) -> None:
    async def scenario() -> dict[str, tuple[int, object]]:
        async with started_torchgate(tmp_path, {}, load_tensor_backend) as run_:
            tg = run_.tg
            shared, metrics = Address("0.0.0.0", 8085), Address("0.0.0.0", 8082)
            served = listeners(
                [
                    ("inference", tg.inference_app, shared),
                    ("management", tg.management_app, shared),
                    ("metrics", tg.metrics_app, metrics),
                ]
            )
            assert [address for _, address in served] == [shared, metrics]
            assert served[1][0] is tg.metrics_app
            app = served[0][0]
            assert isinstance(app, SharedPort)
            transport = httpx.ASGITransport(app=app)
            answers = {}
            async with httpx.AsyncClient(
                transport=transport, base_url="http://localhost"
            ) as client:
                for path in ("/models", "/v1/models", "/ping", "/v2/health/live", "/"):
                    reply = await client.get(path)
                    answers[path] = (reply.status_code, reply.json())
            return answers

    answers = run(scenario())
    assert answers["/models"] == (200, {"models": []})  # the management API's list
    assert answers["/v1/models"] == (200, {"models": []})  # KServe v1's
    assert answers["/ping"] == (200, {"status": "Healthy"})
    assert answers["/v2/health/live"] == (200, {"live": True})
    assert answers["/"] == (200, {"status": "alive"})
