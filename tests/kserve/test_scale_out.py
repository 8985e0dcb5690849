"""Scale-out: three torchgate replicas on one model store behind a real HAProxy.

What a Deployment of replicas behind a Service relies on, shown on loopback: replicas that
start from the same config.properties (with `--ncs`) behave as one server. A sticky user gets
the same version from every replica, the config's traffic policy holds on all of them, and
killing a replica under traffic loses no request, because the balancer retries what the dead
one never answered (retry-on + redispatch) and its health checks on /ping take it out. The
throughput through the balancer with one replica and with three is printed (no assertion:
on a 2-core machine three replicas share the same cores).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.kserve import build_layout, start_together
from tests.support.server import TorchgateServer, post_many, running_torchgate
from tests.support.torchserve import free_ports

pytestmark = pytest.mark.integration

HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
REPLICAS = 3
POLICY = {"echo": {"weights": {"1.0": 50, "2.0": 50}, "sticky_header": "X-User-Id"}}
BODY = json.dumps({"instances": [{"data": "x"}]}).encode()
PREDICT = "/v1/models/echo:predict"


@dataclass(frozen=True)
class Cluster:
    replicas: list[TorchgateServer]
    all_url: str  # HAProxy over every replica
    one_url: str  # HAProxy over the first replica only


def haproxy_config(replicas: list[TorchgateServer], all_port: int, one_port: int) -> str:
    def server(index: int, replica: TorchgateServer) -> str:
        return f"    server r{index} {replica.inference_url.removeprefix('http://')}\n"

    return (
        "global\n    maxconn 512\n"
        "defaults\n    mode http\n"
        "    timeout connect 1s\n    timeout client 30s\n    timeout server 30s\n"
        "    timeout check 1s\n"
        # A request the chosen replica never answered (refused, reset, closed without a
        # response) is sent again, to another replica.
        "    retries 3\n    option redispatch 1\n"
        "    retry-on conn-failure empty-response response-timeout 503\n"
        "    option http-buffer-request\n"
        "    default-server check inter 200ms fall 2 rise 1\n"
        f"frontend all\n    bind 127.0.0.1:{all_port}\n    default_backend replicas\n"
        f"frontend one\n    bind 127.0.0.1:{one_port}\n    default_backend single\n"
        "backend replicas\n    balance roundrobin\n"
        "    option httpchk GET /ping\n    http-check expect status 200\n"
        + "".join(server(i, r) for i, r in enumerate(replicas))
        + "backend single\n    option httpchk GET /ping\n    http-check expect status 200\n"
        + server(0, replicas[0])
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if HAPROXY is None:
        pytest.skip("haproxy not installed (scripts/install_tools.sh haproxy)")
    root = tmp_path_factory.mktemp("shared-store")
    config = build_layout(
        root, "echo", ["1.0", "2.0"], extra={"torchgate.traffic": json.dumps(POLICY)}
    )
    with ExitStack() as stack:
        # Each replica started as KServe's runtime starts it, on the one model store.
        kserve_args = ["--ncs", f"--model-store={root / 'model-store'}"]
        managers = [
            running_torchgate(config, command="start", args=kserve_args) for _ in range(REPLICAS)
        ]
        replicas = start_together(stack, managers)
        all_port, one_port = free_ports(2)
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="haproxy-")))
        (workdir / "haproxy.cfg").write_text(haproxy_config(replicas, all_port, one_port))
        log = stack.enter_context(open(workdir / "haproxy.log", "wb"))
        process = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(workdir / "haproxy.cfg")], stdout=log, stderr=log
        )
        stack.callback(_stop, process)
        cluster = Cluster(replicas, f"http://127.0.0.1:{all_port}", f"http://127.0.0.1:{one_port}")
        _wait_serving(cluster, process, workdir / "haproxy.log")
        yield cluster


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _wait_serving(cluster: Cluster, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"{cluster.all_url}/ping", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError("haproxy did not serve /ping:\n" + log.read_text())


def version_for(client: httpx.Client, url: str, user: str) -> str:
    reply = client.post(f"{url}{PREDICT}", content=BODY, headers={"X-User-Id": user})
    assert reply.status_code == 200, reply.text
    version = reply.json()["predictions"][0]["version"]
    assert reply.headers["x-model-version"] == version
    return str(version)


def test_traffic_policy_from_the_config_holds_on_every_replica(cluster: Cluster) -> None:
    for replica in cluster.replicas:
        described = httpx.get(f"{replica.management_url}/models/echo/traffic").json()
        assert described["policy"]["weights"] == {"1.0": 50, "2.0": 50}


def test_a_sticky_user_gets_one_version_from_every_replica(cluster: Cluster) -> None:
    seen: dict[str, str] = {}
    with httpx.Client() as client:
        for number in range(16):
            user = f"user-{number}"
            urls = [r.inference_url for r in cluster.replicas] + [cluster.all_url] * REPLICAS
            answers = {version_for(client, url, user) for url in urls}
            assert len(answers) == 1, (user, answers)
            seen[user] = answers.pop()
    # 50/50 weights: 16 users all on one version would be a 1 in 32768 event.
    assert set(seen.values()) == {"1.0", "2.0"}


def throughput(url: str, count: int = 300) -> float:
    started = time.monotonic()
    replies = asyncio.run(post_many(f"{url}{PREDICT}", count, concurrency=16, body=BODY))
    elapsed = time.monotonic() - started
    assert all(reply.status == 200 for reply in replies)
    return count / elapsed


def test_throughput_one_replica_and_three(
    cluster: Cluster, record_property: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    one, three = throughput(cluster.one_url), throughput(cluster.all_url)
    record_property("v1_predict_req_per_s_1_replica", round(one))
    record_property("v1_predict_req_per_s_3_replicas", round(three))
    with capsys.disabled():
        print(
            f"\nthrough HAProxy, v1 :predict, c=16: 1 replica {one:.0f} req/s, "
            f"{REPLICAS} replicas {three:.0f} req/s"
        )


def test_killing_a_replica_under_traffic_loses_no_request(cluster: Cluster) -> None:
    """Runs last: it leaves two replicas. The kill lands while requests are in flight: the
    load runs in back-to-back rounds, and the kill comes once two rounds are answered.

    Every request gets a 200, but for those whose answer the dead replica had started: once
    HAProxy has forwarded a response's headers it cannot send the request elsewhere, and it
    cuts that client off. At most the requests in flight at the kill can be so; a request
    never answered at all (which the balancer could have retried) fails the test."""
    victim = cluster.replicas[-1]
    rounds, per_round, concurrency = 8, 100, 12
    outcomes: list[int | str] = []

    async def load() -> None:
        for _ in range(rounds):
            outcomes.extend(
                await _post_counting(f"{cluster.all_url}{PREDICT}", per_round, concurrency)
            )

    async def load_and_kill() -> None:
        task = asyncio.create_task(load())
        while len(outcomes) < 2 * per_round:
            await asyncio.sleep(0.005)
        await asyncio.to_thread(victim.kill)
        await task

    asyncio.run(load_and_kill())
    counted = {outcome: outcomes.count(outcome) for outcome in set(outcomes)}
    cut = counted.pop("cut after its answer started", 0)
    assert counted == {200: rounds * per_round - cut}, counted
    assert cut <= concurrency
    assert victim.process.poll() is not None


async def _post_counting(url: str, count: int, concurrency: int) -> list[int | str]:
    """POST BODY `count` times over `concurrency` keep-alive connections: each request's status,
    or how it failed; a connection cut off is opened again for the next request."""
    host, port = url.removeprefix("http://").split("/", 1)[0].split(":")
    target = "/" + url.removeprefix("http://").split("/", 1)[1]
    head = f"POST {target} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {len(BODY)}\r\n\r\n"
    outcomes: list[int | str] = []
    indexes = iter(range(count))

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for _ in indexes:
                writer.write(head.encode() + BODY)
                try:
                    status_line, *lines = (
                        (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
                    )
                except (asyncio.IncompleteReadError, ConnectionError):
                    outcomes.append("never answered")
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, int(port))
                    continue
                fields = dict(line.split(":", 1) for line in lines if line)
                length = int({k.lower(): v for k, v in fields.items()}["content-length"])
                try:
                    await reader.readexactly(length)
                except (asyncio.IncompleteReadError, ConnectionError):
                    outcomes.append("cut after its answer started")
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, int(port))
                    continue
                outcomes.append(int(status_line.split()[1]))
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return outcomes
