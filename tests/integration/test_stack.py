"""The compose stack, as local processes: what `docker compose up` runs, without Docker.

Read from docker-compose.yml (`tests.support.compose`), each with the config file compose
mounts, addresses rewritten to 127.0.0.1 and free ports:

    torchserve   real TorchServe 0.12, docker/torchserve/config.properties   (digits 2.0)
    gateway      real `torchgate serve`, docker/gateway.config.properties    (digits 1.0 and
                 minilm in-process, digits 2.0 proxied to that TorchServe; token auth on)
    prometheus   real Prometheus, docker/prometheus.yml scraping both

Then: predictions through the gateway to both backends; an A/B split of digits 50/50 across
them; TorchServe stopped in the middle of traffic and started again on the same ports. Every
request gets an answer: 200, or 502/503 naming digits 2.0 while TorchServe is away; digits 1.0
and minilm never fail; afterwards 2.0 answers 200 again with the gateway never restarted.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from export.build import REPO_ROOT, ensure_archives
from tests.support.compose import (
    gateway_config,
    load_compose,
    prometheus_config,
    rewrite_gateway_config,
    torchserve_config,
    torchserve_urls_in_compose,
)
from tests.support.prometheus import (
    Prometheus,
    prometheus_binary,
    running_prometheus,
    scrape_config_from,
)
from tests.support.server import TorchgateServer, running_torchgate
from tests.support.torchserve import TorchServe, running_torchserve

pytestmark = [
    pytest.mark.integration,
    pytest.mark.torchserve,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java"),
    pytest.mark.skipif(prometheus_binary() is None, reason="no prometheus (make test installs it)"),
    pytest.mark.timeout(480),  # two TorchServe starts and a gateway on a loaded 2-core CI box
]

DIGIT = [0.0, 0.0, 5.0, 13.0, 9.0, 1.0, 0.0, 0.0] * 8  # 64 pixel values, 0..16
TARGETS = ("/predictions/digits", "/predictions/digits/1.0", "/predictions/minilm")
ALLOWED_FAILURES = {502, 503}


@dataclass(frozen=True, slots=True)
class Outcome:
    phase: str
    target: str
    status: int
    version: str | None
    message: str

    @property
    def names_digits_2(self) -> bool:
        return self.version == "2.0" or "version 2.0" in self.message


def netloc(url: str) -> str:
    return urlsplit(url).netloc


def same_ports(ts: TorchServe) -> dict[str, str]:
    """`running_torchserve` overrides that bring TorchServe back where it was."""
    return {
        "inference_address": ts.inference_url,
        "management_address": ts.management_url,
        "metrics_address": ts.metrics_url,
        "grpc_inference_port": str(ts.grpc_inference_port),
        "grpc_management_port": str(ts.grpc_management_port),
    }


class Traffic:
    """Clients of the gateway: predictions, the traffic API, and the health check's view."""

    def __init__(self, gateway: TorchgateServer, keys: dict[str, Any]) -> None:
        inference = {"Authorization": f"Bearer {keys['inference']['key']}"}
        management = {"Authorization": f"Bearer {keys['management']['key']}"}
        limits = httpx.Limits(max_connections=16)
        self.inference = httpx.AsyncClient(
            base_url=gateway.inference_url, headers=inference, timeout=30, limits=limits
        )
        self.management = httpx.AsyncClient(
            base_url=gateway.management_url, headers=management, timeout=30
        )
        self.outcomes: list[Outcome] = []
        self.phase = "up"

    async def aclose(self) -> None:
        await self.inference.aclose()
        await self.management.aclose()

    async def predict(self, target: str) -> Outcome:
        if target.startswith("/predictions/minilm"):
            response = await self.inference.post(
                target, content="A sentence to embed.", headers={"content-type": "text/plain"}
            )
        else:
            response = await self.inference.post(target, json=DIGIT)
        message = "" if response.status_code == 200 else response.json().get("message", "")
        outcome = Outcome(
            self.phase,
            target,
            response.status_code,
            response.headers.get("x-model-version"),
            message,
        )
        self.outcomes.append(outcome)
        return outcome

    async def round(self, count: int = 12) -> list[Outcome]:
        return await asyncio.gather(*(self.predict(TARGETS[i % 3]) for i in range(count)))

    async def run_until(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.round()

    async def backend_status(self) -> str:
        response = await self.management.get("/models/digits/2.0")
        response.raise_for_status()
        return str(response.json()[0]["backend"]["status"])

    async def wait_status(self, wanted: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while (status := await self.backend_status()) != wanted:
            assert time.monotonic() < deadline, f"digits 2.0 still {status}, not {wanted}"
            await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def model_store() -> Path:
    store = REPO_ROOT / "model_store"
    ensure_archives(store)  # what the compose model-builder does: `torchgate export --all`
    return store


def test_stack_serves_both_backends_through_a_torchserve_outage(
    model_store: Path, tmp_path: Path
) -> None:
    compose = load_compose()
    with ExitStack() as stack:
        torchserve_stack = stack.enter_context(ExitStack())
        ts = torchserve_stack.enter_context(
            running_torchserve(model_store, torchserve_config(compose))
        )
        in_compose = torchserve_urls_in_compose(compose)
        config = tmp_path / "gateway.config.properties"
        rewrite_gateway_config(
            gateway_config(compose),
            config,
            model_store=model_store,
            key_file=tmp_path / "key_file.json",
            urls={
                in_compose["inference"]: ts.inference_url,
                in_compose["management"]: ts.management_url,
            },
        )
        gateway = stack.enter_context(running_torchgate(config, startup_timeout=90))
        prometheus = stack.enter_context(
            running_prometheus(
                scrape_config_from(
                    prometheus_config(compose),
                    {
                        "torchgate": netloc(gateway.metrics_url),
                        "torchserve": netloc(ts.metrics_url),
                    },
                )
            )
        )
        keys = json.loads((tmp_path / "key_file.json").read_text())

        async def scenario() -> None:
            traffic = Traffic(gateway, keys)
            try:
                await run_phases(
                    traffic, torchserve_stack, model_store, torchserve_config(compose), ts
                )
            finally:
                await traffic.aclose()
            try:
                check_outcomes(traffic.outcomes)
            except AssertionError as failed:  # the gateway's side, for a failure in CI
                raise AssertionError(f"{failed}\n{gateway.log_text()[-6000:]}") from failed

        asyncio.run(asyncio.wait_for(scenario(), 150))
        check_prometheus(prometheus)


async def run_phases(
    traffic: Traffic,
    torchserve_stack: ExitStack,
    model_store: Path,
    ts_config: Path,
    ts: TorchServe,
) -> None:
    # Both backends, each by its version, and the gateway's auth in front of them.
    assert (await traffic.backend_status()) == "READY"
    for target in ("/predictions/digits/1.0", "/predictions/digits/2.0"):
        outcome = await traffic.predict(target)
        assert outcome.status == 200 and outcome.version == target[-3:]
    # KServe v2 through the gateway to TorchServe's handler, and back as v2 tensors.
    tensor = {"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": DIGIT}
    v2 = await traffic.inference.post(
        "/v2/models/digits/versions/2.0/infer", json={"inputs": [tensor]}
    )
    assert v2.status_code == 200, v2.text
    assert v2.json()["outputs"][0]["shape"] == [1, 10]
    assert v2.json()["model_version"] == "2.0"
    unauthorized = await traffic.inference.post(
        "/predictions/digits/2.0", json=DIGIT, headers={"Authorization": "Bearer wrong"}
    )
    assert unauthorized.status_code == 401

    # A/B: half of digits' unversioned traffic to TorchServe.
    policy = {"weights": {"1.0": 50, "2.0": 50}, "sticky_header": None}
    answer = await traffic.management.put("/models/digits/traffic", json=policy)
    assert answer.status_code == 200, answer.text
    split = Counter(o.version for o in await traffic.round(60) if o.target == TARGETS[0])
    assert set(split) == {"1.0", "2.0"}, split  # 20 draws miss a side with p = 2 * 2**-20

    # TorchServe stops and comes back on the same ports, all under traffic.
    stop = asyncio.Event()
    traffic.phase = "outage"
    load = asyncio.create_task(traffic.run_until(stop))
    try:
        await asyncio.to_thread(torchserve_stack.close)
        assert ts.leftover_pids() == []
        await traffic.wait_status("UNAVAILABLE")
        await asyncio.sleep(1.0)  # the gateway knows; traffic keeps coming
        ping = await traffic.inference.get("/ping")
        assert ping.status_code == 200  # digits' default version (1.0) is in-process
        again = running_torchserve(model_store, ts_config, extra_config=same_ports(ts))
        await asyncio.to_thread(torchserve_stack.enter_context, again)
        await traffic.wait_status("READY")
    finally:
        stop.set()
        await load
    traffic.phase = "recovered"
    # 32 unversioned draws miss a side with p = 2 * 2**-32 (the 12 drawn before missed one
    # with p = 2**-11, and one clean-clone CI run saw that: chance, or a cause in the log).
    for _ in range(8):
        await traffic.round()
    outcome = await traffic.predict("/predictions/digits/2.0")
    assert outcome.status == 200 and outcome.version == "2.0"


def check_outcomes(outcomes: list[Outcome]) -> None:
    by_phase = Counter((o.phase, o.status) for o in outcomes)
    failures = [o for o in outcomes if o.status != 200]
    assert all(o.status in ALLOWED_FAILURES for o in failures), by_phase
    assert all(o.phase == "outage" for o in failures), by_phase
    assert all(o.names_digits_2 for o in failures), failures[:5]
    assert all(o.target != TARGETS[1] and o.target != TARGETS[2] for o in failures)
    outage = [o for o in outcomes if o.phase == "outage"]
    assert any(o.status != 200 for o in outage), "the outage went unnoticed"
    assert any(o.status == 200 and o.version == "1.0" for o in outage)
    recovered = [o for o in outcomes if o.phase == "recovered" and o.target == TARGETS[0]]
    assert {o.version for o in recovered} == {"1.0", "2.0"}, Counter(o.version for o in recovered)


def check_prometheus(prometheus: Prometheus) -> None:
    """Prometheus scraped both servers, with the gateway's per-version counts."""
    deadline = time.monotonic() + 20
    while True:
        versions = {
            r["metric"].get("version")
            for r in prometheus.query('sum by (version) (torchgate_requests_total{model="digits"})')
        }
        up = {r["metric"]["job"]: r["value"][1] for r in prometheus.query("up")}
        if versions >= {"1.0", "2.0"} and up == {"torchgate": "1", "torchserve": "1"}:
            return
        assert time.monotonic() < deadline, (versions, up)
        time.sleep(0.5)
