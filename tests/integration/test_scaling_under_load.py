"""Scaling and unregistering a model while traffic flows, against a real `torchgate serve`.

Operators scale versions up and down, and unregister them, under load. Every request the server
accepted must be answered, with its own answer or a clear refusal (503 while the version has no
worker, 404 once it is gone): never lost (a client would time out), never a 500 from a worker
being stopped, never another request's answer. The processes of stopped workers must be gone.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.archives import ECHO, build_archive
from tests.support.processes import alive, wait_until
from tests.support.server import TorchgateServer, running_torchgate, scale_workers, worker_pids

pytestmark = pytest.mark.integration

CLIENTS = 8
# Batches of up to 4 so that a stop can find a batch in a worker, requests in the worker's
# socket (pipelining) and requests still queued, all at once.
MODELS = {"echo": {"1.0": {"marName": "echo.mar", "batchSize": 4, "maxBatchDelay": 5}}}

Answer = tuple[int, bytes, bytes]  # status, the body sent, the body answered


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchgateServer]:
    root = tmp_path_factory.mktemp("scaling")
    store = root / "store"
    store.mkdir()
    for name in ("echo", "gone"):
        build_archive(root, name, "echo.py", {"echo.py": ECHO}, export_dir=store)
    config = (
        f"model_store={store}\nload_models=echo.mar\nenable_model_api=true\n"
        f"models={json.dumps(MODELS)}\n"
    )
    with running_torchgate(config) as server:
        yield server


async def traffic(
    url: str,
    model: str,
    stop: asyncio.Event,
    *,
    until: int | None = None,
    served: Callable[[], None] | None = None,
) -> list[Answer]:
    """`CLIENTS` clients, each sending its next request as soon as the last is answered, until
    `stop` is set or, with `until`, it got that status; `served` is called on each 200."""

    async def client(number: int) -> list[Answer]:
        answers: list[Answer] = []
        # A request the server lost would never be answered: the timeout fails the test.
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            while not stop.is_set():
                body = f"client {number} request {len(answers)}".encode()
                reply = await http.post(f"/predictions/{model}", content=body)
                answers.append((reply.status_code, body, reply.content))
                if reply.status_code == 200 and served is not None:
                    served()
                if reply.status_code == until:
                    break
        return answers

    per_client = await asyncio.gather(*(client(number) for number in range(CLIENTS)))
    return [answer for answers in per_client for answer in answers]


def check_answers(answers: list[Answer], allowed: set[int]) -> None:
    statuses = {status for status, _, _ in answers}
    assert statuses <= allowed, [a for a in answers if a[0] not in allowed][:5]
    mixed_up = [(sent, got) for status, sent, got in answers if status == 200 and sent != got]
    assert mixed_up == []


def by_client(answers: list[Answer]) -> list[list[Answer]]:
    """Each client's answers, in the order it got them."""
    clients: dict[bytes, list[Answer]] = {}
    for answer in answers:
        clients.setdefault(answer[1].split(b" request ")[0], []).append(answer)
    return list(clients.values())


def test_scaling_up_and_down_under_load_answers_every_request(server: TorchgateServer) -> None:
    seen: set[int] = set()

    async def scenario() -> list[Answer]:
        stop = asyncio.Event()
        load = asyncio.create_task(traffic(server.inference_url, "echo", stop))
        for workers in (3, 1, 2, 0, 1, 3, 1):
            reply = await asyncio.to_thread(scale_workers, server, "echo", workers)
            assert reply.status_code == 200, reply.text
            seen.update(await asyncio.to_thread(worker_pids, server, "echo"))
            await asyncio.sleep(0.4)
        stop.set()
        return await load

    answers = asyncio.run(scenario())
    # 503 only while the version had no worker: "no workers" is the reason given.
    check_answers(answers, {200, 503})
    assert sum(status == 200 for status, _, _ in answers) > 100
    refusals = [got for status, _, got in answers if status == 503]
    assert all(b"worker" in got for got in refusals), refusals[:3]
    (last,) = worker_pids(server, "echo")
    wait_until(lambda: [pid for pid in seen - {last} if alive(pid)] == [])
    assert len(seen) >= 4  # the scale-ups started new processes


def test_unregistering_under_load_answers_every_request(server: TorchgateServer) -> None:
    management = httpx.Client(base_url=server.management_url, timeout=60)
    registered = management.post(
        "/models", params={"url": "gone.mar", "initial_workers": 2, "synchronous": "true"}
    )
    assert registered.status_code == 200, registered.text
    workers = worker_pids(server, "gone")
    assert len(workers) == 2

    async def scenario() -> list[Answer]:
        stop, serving = asyncio.Event(), asyncio.Event()
        served = 0

        def count() -> None:
            nonlocal served
            served += 1
            if served > 20:
                serving.set()

        load = asyncio.create_task(
            traffic(server.inference_url, "gone", stop, until=404, served=count)
        )
        # Under way (the host may be slow: a count, not a time), then the DELETE.
        await asyncio.wait_for(serving.wait(), 60)
        reply = await asyncio.to_thread(management.delete, "/models/gone")
        assert reply.status_code == 200, reply.text
        return await load  # each client goes on until it is told the model is gone

    answers = asyncio.run(scenario())
    # Before the DELETE: answers; queued when it came: 503 (no workers left to run them);
    # after it: 404, as for any unknown model.
    check_answers(answers, {200, 503, 404})
    assert sum(status == 200 for status, _, _ in answers) > 20
    clients = by_client(answers)
    assert len(clients) == CLIENTS
    assert all(answers[-1][0] == 404 for answers in clients)  # each one was told, none hung
    wait_until(lambda: [pid for pid in workers if alive(pid)] == [])
    assert management.get("/models/gone").status_code == 404


def test_the_server_serves_on_after_both(server: TorchgateServer) -> None:
    reply = httpx.post(f"{server.inference_url}/predictions/echo", content=b"still here")
    assert reply.status_code == 200
    assert reply.content == b"still here"
    described = httpx.get(f"{server.management_url}/models/echo").json()[0]
    assert [w["status"] for w in described["workers"]] == ["READY"]
    assert Path(f"/proc/{server.process.pid}").exists()
