"""The embedded engine as a user meets it: `torchgate serve` (real uvicorn) on real archives.

One server per module serves the example archives plus small archives built here with
torch-model-archiver: `sleepy` (sleeps as long as its body says, logging what it ran), `expiry`
(the same handler with a 1 s responseTimeout, whose workers take 1.5 s to start), `patient` (the
same with a 1 s responseTimeout), `thirdparty`
(TorchServe's BaseHandler subclassed the way TorchServe users do, on a TorchScript model) and
`broken.mar` (not an archive at all, to show one bad archive never stops the others). Timing
tests leave seconds of margin and wait on observable state.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from tests.support.archives import build_archive
from tests.support.processes import wait_until
from tests.support.server import TorchgateServer, post_many, running_torchgate, worker_pids

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STORE = ROOT / "model_store"

SLEEPY = """
import os, time

STARTUP_S = 0.0

def handle(data, context):
    if data is None:  # TorchServe calls a function handler once with None to initialize it
        time.sleep(STARTUP_S)
        return None
    answers = []
    for idx, row in enumerate(data):
        body = row.get("body") or row.get("data")
        seconds = float(body.decode() if isinstance(body, (bytes, bytearray)) else body)
        with open(os.environ["SLEEPY_LOG"], "a") as log:
            log.write(context.get_request_id(idx) + "\\n")
        time.sleep(seconds)
        answers.append("slept")
    return answers
"""

THIRD_PARTY = """
import torch
from ts.torch_handler.base_handler import BaseHandler


class LinearHandler(BaseHandler):
    def preprocess(self, data):
        rows = [row.get("data") or row.get("body") for row in data]
        return torch.as_tensor(rows, dtype=torch.float32)

    def postprocess(self, data):
        return data.squeeze(-1).tolist()
"""

MODELS = {
    "digits": {"1.0": {"marName": "digits.mar", "batchSize": 8, "maxBatchDelay": 5}},
    "minilm": {"1.0": {"marName": "minilm.mar", "batchSize": 8, "maxBatchDelay": 5}},
    "sleepy": {"1.0": {"marName": "sleepy.mar", "responseTimeout": 60, "jobQueueSize": 2}},
    "expiry": {"1.0": {"marName": "expiry.mar", "responseTimeout": 1}},
    "patient": {"1.0": {"marName": "patient.mar", "responseTimeout": 1}},
}


def config_text(store: Path, **extra: str) -> str:
    lines = {
        "model_store": str(store),
        "load_models": "digits.mar,digits_v2.mar,minilm.mar,sleepy.mar,expiry.mar,patient.mar,"
        "thirdparty.mar,broken.mar",
        "models": json.dumps(MODELS),
        "enable_model_api": "true",
        "max_request_size": "200000",
        **extra,
    }
    return "".join(f"{k}={v}\n" for k, v in lines.items())


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("engine")
    store = work / "store"
    store.mkdir()
    for name in ("digits.mar", "digits_v2.mar", "minilm.mar"):
        (store / name).symlink_to(STORE / name)
    build_archive(work, "sleepy", "sleepy.py", {"sleepy.py": SLEEPY}, export_dir=store)
    # Its workers take 1.5 s to start: see test_expired_requests_get_504_and_never_run.
    expiry = SLEEPY.replace("STARTUP_S = 0.0", "STARTUP_S = 1.5")
    build_archive(work, "expiry", "sleepy.py", {"sleepy.py": expiry}, export_dir=store)
    build_archive(work, "patient", "sleepy.py", {"sleepy.py": SLEEPY}, export_dir=store)
    linear = torch.nn.Linear(2, 1)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[2.0, -1.0]]))
        linear.bias.fill_(0.5)
    torch.jit.script(linear).save(str(work / "linear.pt"))
    build_archive(
        work,
        "thirdparty",
        "linear_handler.py",
        {"linear.pt": (work / "linear.pt").read_bytes(), "linear_handler.py": THIRD_PARTY},
        serialized="linear.pt",
        export_dir=store,
    )
    (store / "broken.mar").write_bytes(b"this is not a zip file")
    return store


@pytest.fixture(scope="module")
def server(store: Path) -> Iterator[TorchgateServer]:
    log = store.parent / "sleepy.log"
    log.touch()
    with running_torchgate(config_text(store), env={"SLEEPY_LOG": str(log)}) as tg:
        yield tg


@pytest.fixture(scope="module")
def client(server: TorchgateServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.inference_url, timeout=30) as client:
        yield client


def sleepy_log(server: TorchgateServer, store: Path) -> list[str]:
    return (store.parent / "sleepy.log").read_text().split()


DIGITS = load_digits()


def digit_png(index: int) -> bytes:
    """Sample `index` of the dataset as a 64x64 PNG, dark ink on white like a scan."""
    pixels = DIGITS.images[index] / 16.0
    image = Image.fromarray(np.uint8(255 - pixels * 255)).resize((64, 64), Image.Resampling.NEAREST)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def top_label(answer: dict[str, float]) -> str:
    return max(answer, key=lambda label: answer[label])


# -- inference API ------------------------------------------------------------------------------


def test_ping_and_api_description(client: httpx.Client) -> None:
    assert client.get("/ping").json() == {"status": "Healthy"}
    for response in (client.get("/api-description"), client.request("OPTIONS", "/")):
        assert response.status_code == 200
        assert "/predictions/{model_name}" in response.json()["paths"]


def test_digits_from_json_image_and_form_agree(client: httpx.Client) -> None:
    for index in (0, 1, 7):
        values = DIGITS.data[index].tolist()
        by_json = client.post("/predictions/digits", json=values)
        by_image = client.post("/predictions/digits", content=digit_png(index))
        by_form = client.post("/predictions/digits", files={"data": ("d.png", digit_png(index))})
        for response in (by_json, by_image, by_form):
            assert response.status_code == 200, response.text
            assert response.headers["x-model-version"] == "1.0"
        assert top_label(by_json.json()) == str(DIGITS.target[index])
        assert top_label(by_image.json()) == top_label(by_json.json())
        assert by_form.json() == by_image.json()


def test_explicit_version_answers(client: httpx.Client) -> None:
    response = client.post("/predictions/digits/2.0", json=DIGITS.data[3].tolist())
    assert response.status_code == 200
    assert response.headers["x-model-version"] == "2.0"
    assert top_label(response.json()) == str(DIGITS.target[3])


def test_minilm_text(client: httpx.Client) -> None:
    response = client.post("/predictions/minilm", content=b"torchgate serves archives")
    assert response.status_code == 200
    vector = np.asarray(response.json())
    assert vector.shape == (384,)
    assert abs(np.linalg.norm(vector) - 1.0) < 1e-4


def test_third_party_base_handler_subclass(client: httpx.Client) -> None:
    response = client.post("/predictions/thirdparty", json=[1.0, 3.0])
    assert response.status_code == 200, response.text
    assert response.json() == pytest.approx(2.0 * 1.0 - 3.0 + 0.5)


@pytest.mark.parametrize(
    ("model", "body", "headers", "status"),
    [
        ("digits", b"{not json", {"content-type": "application/json"}, 400),
        ("digits", b"[1, 2, 3]", {"content-type": "application/json"}, 400),
        ("digits", b"\x89PNG\r\n\x1a\n but not an image", {}, 400),
        ("minilm", b"", {"content-type": "text/plain"}, 400),
        ("nope", b"[]", {}, 404),
        ("digits/9.9", b"[]", {}, 404),
        ("digits", b"0" * 300_000, {}, 413),
    ],
    ids=[
        "malformed-json",
        "wrong-shape",
        "bad-image",
        "empty-text",
        "unknown-model",
        "unknown-version",
        "oversized",
    ],
)
def test_bad_input_gets_a_clear_error(
    client: httpx.Client, model: str, body: bytes, headers: dict[str, str], status: int
) -> None:
    response = client.post(f"/predictions/{model}", content=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["code"] == status and error["message"]
    # ...and the server keeps serving everyone else.
    assert client.post("/predictions/digits", json=DIGITS.data[0].tolist()).status_code == 200


def test_bad_archive_is_reported_and_the_rest_load(server: TorchgateServer) -> None:
    assert "broken.mar" in server.log_text()
    response = httpx.post(f"{server.management_url}/models", params={"url": "broken.mar"})
    assert response.status_code == 400
    assert "broken.mar" in response.json()["message"]
    assert httpx.get(f"{server.management_url}/models/digits").status_code == 200


# -- batching, backpressure, deadlines, disconnects ---------------------------------------------


def test_burst_is_batched_and_answers_equal_unbatched(
    client: httpx.Client, server: TorchgateServer
) -> None:
    bodies = [json.dumps(DIGITS.data[i % 20].tolist()).encode() for i in range(20)]
    alone = [
        client.post(
            "/predictions/digits", content=b, headers={"content-type": "application/json"}
        ).json()
        for b in bodies
    ]
    replies = []
    for body in bodies:
        replies += asyncio.run(
            post_many(
                f"{server.inference_url}/predictions/digits",
                16,
                concurrency=16,
                body=body,
                headers=lambda i: {"content-type": "application/json"},
            )
        )
    assert all(reply.status == 200 for reply in replies)
    answers = [json.loads(reply.body) for reply in replies]
    for i, answer in enumerate(answers):
        expected = alone[i // 16]
        assert answer.keys() == expected.keys()
        assert [answer[k] for k in expected] == pytest.approx(
            [expected[k] for k in expected], abs=1e-6
        )
    assert max(int(reply.headers["x-batch-size"]) for reply in replies) > 1


def test_full_queue_is_refused_at_once(
    client: httpx.Client, server: TorchgateServer, store: Path
) -> None:
    management = httpx.Client(base_url=server.management_url)

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=server.inference_url, timeout=60) as aclient:
            busy = asyncio.create_task(
                aclient.post("/predictions/sleepy", content=b"3", headers={"x-request-id": "busy"})
            )
            await asyncio.to_thread(wait_until, lambda: "busy" in sleepy_log(server, store))
            # The worker takes one batch ahead while it runs (pipelining, see
            # ProcessWorker.pipeline_depth); the next two fill the job queue (jobQueueSize 2).
            # The first goes alone: sent together, the third could arrive before the worker
            # took the first from the queue and be refused.
            queued = [asyncio.create_task(aclient.post("/predictions/sleepy", content=b"0"))]
            await asyncio.sleep(0.5)
            queued += [
                asyncio.create_task(aclient.post("/predictions/sleepy", content=b"0"))
                for _ in range(2)
            ]
            status = lambda: management.get("/models/sleepy").json()[0]["jobQueueStatus"]  # noqa: E731
            # Pending, as TorchServe counts its job queue: the two queued and the one waiting
            # in the worker behind "busy"; the queue itself is full.
            full = {"pendingRequests": 3, "remainingCapacity": 0}
            await asyncio.to_thread(wait_until, lambda: status() == full)
            started = time.monotonic()
            refused = await aclient.post("/predictions/sleepy", content=b"0")
            assert time.monotonic() - started < 1.0  # at once, not after the 3 s sleep
            assert refused.status_code == 503
            assert int(refused.headers["retry-after"]) >= 1
            assert (await busy).status_code == 200
            assert [r.status_code for r in await asyncio.gather(*queued)] == [200, 200, 200]

    asyncio.run(scenario())


def test_expired_requests_get_504_and_never_run(server: TorchgateServer, store: Path) -> None:
    """The request "late" waits in the worker's socket behind "busy" (pipelining); when "busy"
    passes its deadline the worker is killed and "late", never started, goes back to the queue
    with the rest of its own deadline. The replacement takes 1.5 s to start, so that rest has
    run out before anyone could take it: with a fast start, it would rightly run (CI once saw
    that)."""

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=server.inference_url, timeout=60) as aclient:
            busy = asyncio.create_task(
                aclient.post(
                    "/predictions/expiry", content=b"3", headers={"x-request-id": "expiry-busy"}
                )
            )
            await asyncio.to_thread(wait_until, lambda: "expiry-busy" in sleepy_log(server, store))
            late = await aclient.post(
                "/predictions/expiry", content=b"0", headers={"x-request-id": "expiry-late"}
            )
            assert late.status_code == 504
            assert (await busy).status_code == 504  # 3 s of work against a 1 s deadline
        await asyncio.sleep(3.5)  # the worker is free again: "late" would have run by now
        assert "expiry-late" not in sleepy_log(server, store)

    asyncio.run(scenario())


def test_response_timeout_bounds_the_handlers_time_not_the_wait(server: TorchgateServer) -> None:
    """As in TorchServe, responseTimeout bounds the time the handler spends on a batch. Two
    0.7 s requests sent together against a 1 s timeout: the second waits 0.7 s behind the
    first, then runs 0.7 s; both answer 200, from the worker that was there before."""
    before = worker_pids(server, "patient")

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.inference_url, timeout=30) as aclient:
            sent = [aclient.post("/predictions/patient", content=b"0.7") for _ in range(2)]
            return list(await asyncio.gather(*sent))

    assert [reply.status_code for reply in asyncio.run(scenario())] == [200, 200]
    assert worker_pids(server, "patient") == before


def test_while_its_only_worker_restarts_a_version_is_not_ready_and_says_why(
    server: TorchgateServer,
) -> None:
    """The worker is SIGKILLed from outside (as the OOM killer would); its replacement takes
    1.5 s to start. Meanwhile the version is not ready on every API and new requests get 503
    with the reason and Retry-After; then it serves again, no operator involved. (TorchServe
    holds such requests until its replacement worker is up.)"""
    inference, management = server.inference_url, server.management_url
    [pid] = worker_pids(server, "expiry")
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: httpx.get(f"{inference}/v2/models/expiry/ready").status_code == 503, 5)
    [described] = httpx.get(f"{management}/models/expiry").json()
    assert described["ready"] is False
    assert [w["status"] for w in described["workers"]] == ["RESTARTING"]
    assert described["unavailable"] == (
        "Model expiry version 1.0 has no live worker: worker 0 killed by signal 9 (SIGKILL)"
    )
    refused = httpx.post(f"{inference}/predictions/expiry", content=b"0")
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["message"] == described["unavailable"]
    wait_until(lambda: httpx.get(f"{inference}/v2/models/expiry/ready").status_code == 200, 20)
    assert httpx.post(f"{inference}/predictions/expiry", content=b"0").status_code == 200
    [described] = httpx.get(f"{management}/models/expiry").json()
    assert described["workers"][0]["restarts"] >= 1 and described["workers"][0]["pid"] != pid


def test_disconnected_clients_are_dropped_before_inference(
    server: TorchgateServer, store: Path
) -> None:
    parts = urlsplit(server.inference_url)
    assert parts.hostname and parts.port

    def send(request_id: str, seconds: str) -> socket.socket:
        sock = socket.create_connection((parts.hostname, parts.port))
        sock.sendall(
            f"POST /predictions/sleepy HTTP/1.1\r\nhost: x\r\nx-request-id: {request_id}\r\n"
            f"content-length: {len(seconds)}\r\n\r\n{seconds}".encode()
        )
        return sock

    busy = send("gone-busy", "2")
    wait_until(lambda: "gone-busy" in sleepy_log(server, store))
    # The worker already holds the next batch (pipelining, see ProcessWorker.pipeline_depth):
    # a request handed to it runs; one still queued behind it is dropped when its client goes.
    ahead = send("gone-ahead", "0")
    time.sleep(0.2)
    send("gone-client", "0").close()
    for sock in (busy, ahead):
        sock.settimeout(30)
        assert b"200" in sock.recv(4096).split(b"\r\n")[0]
        sock.close()
    time.sleep(1.0)
    assert "gone-client" not in sleepy_log(server, store)


# -- management API -----------------------------------------------------------------------------


def test_management_lifecycle(server: TorchgateServer) -> None:
    with httpx.Client(base_url=server.management_url, timeout=60) as m:
        registered = m.post(
            "/models",
            params={
                "url": "digits_v2.mar",
                "model_name": "digits3",
                "batch_size": 4,
                "max_batch_delay": 2,
                "initial_workers": 1,
            },
        )
        assert registered.status_code == 200, registered.text
        assert "digits3" in registered.json()["status"]
        assert (
            m.post("/models", params={"url": "digits_v2.mar", "model_name": "digits3"}).status_code
            == 409
        )

        page = m.get("/models", params={"limit": 2}).json()
        assert len(page["models"]) == 2 and page["nextPageToken"] == "2"
        rest = m.get("/models", params={"limit": 100, "next_page_token": 2}).json()
        names = {x["modelName"] for x in page["models"] + rest["models"]}
        assert {"digits", "digits3", "minilm", "sleepy", "thirdparty"} <= names

        [described] = m.get("/models/digits3").json()
        assert described["modelVersion"] == "2.0" and described["batchSize"] == 4
        assert described["maxBatchDelay"] == 2 and len(described["workers"]) == 1
        assert described["jobQueueStatus"]["remainingCapacity"] > 0
        assert [v["modelVersion"] for v in m.get("/models/digits/all").json()] == ["1.0", "2.0"]
        assert m.get("/models/digits/2.0").json()[0]["modelVersion"] == "2.0"

        scaled = m.put("/models/digits3", params={"min_worker": 2, "synchronous": "true"})
        assert scaled.status_code == 200
        assert len(m.get("/models/digits3").json()[0]["workers"]) == 2
        assert m.put("/models/digits3", params={"min_worker": 1}).status_code == 202

        assert m.put("/models/digits/9.9/set-default").status_code == 404
        assert m.put("/models/digits/2.0/set-default").status_code == 200
        response = httpx.post(
            f"{server.inference_url}/predictions/digits", json=DIGITS.data[0].tolist()
        )
        assert response.headers["x-model-version"] == "2.0"
        assert m.put("/models/digits/1.0/set-default").status_code == 200

        assert m.delete("/models/digits3/2.0").status_code == 200
        assert m.get("/models/digits3").status_code == 404
        assert m.delete("/models/nope").status_code == 404


def test_metrics_count_requests(client: httpx.Client, server: TorchgateServer) -> None:
    client.post("/predictions/digits", json=DIGITS.data[0].tolist())
    text = httpx.get(f"{server.metrics_url}/metrics").text
    assert "torchgate_requests_total{" in text and 'model="digits"' in text
    assert "ts_inference_requests_total" in text


# -- security and shutdown ----------------------------------------------------------------------


def test_token_authorization(store: Path, tmp_path: Path) -> None:
    config = config_text(
        store,
        disable_token_authorization="false",
        load_models="digits.mar",
        enable_model_api="false",
    )
    config += f"torchgate.key_file={tmp_path / 'key_file.json'}\n"
    with running_torchgate(config, workdir=tmp_path / "run") as tg:
        keys = json.loads((tmp_path / "key_file.json").read_text())
        inference, management = keys["inference"]["key"], keys["management"]["key"]
        url = f"{tg.inference_url}/predictions/digits"
        body = DIGITS.data[0].tolist()
        assert httpx.post(url, json=body).status_code == 401
        assert (
            httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        )
        assert (
            httpx.post(
                url, json=body, headers={"Authorization": f"Bearer {management}"}
            ).status_code
            == 401
        )
        assert (
            httpx.post(url, json=body, headers={"Authorization": f"Bearer {inference}"}).status_code
            == 200
        )
        assert httpx.get(f"{tg.inference_url}/ping").status_code == 200
        assert httpx.get(f"{tg.management_url}/models").status_code == 401
        assert (
            httpx.get(
                f"{tg.management_url}/models", headers={"Authorization": f"Bearer {management}"}
            ).status_code
            == 200
        )
        # The model API stays off unless enable_model_api=true, token or not.
        assert (
            httpx.post(
                f"{tg.management_url}/models",
                params={"url": "minilm.mar"},
                headers={"Authorization": f"Bearer {management}"},
            ).status_code
            == 405
        )
        assert httpx.get(f"{tg.metrics_url}/metrics").status_code == 200


def test_sigterm_finishes_accepted_requests(store: Path, tmp_path: Path) -> None:
    log = tmp_path / "sleepy.log"
    log.touch()
    config = config_text(store, load_models="sleepy.mar")
    with running_torchgate(config, env={"SLEEPY_LOG": str(log)}) as tg:

        async def scenario() -> list[int]:
            async with httpx.AsyncClient(base_url=tg.inference_url, timeout=60) as aclient:
                calls = [
                    asyncio.create_task(aclient.post("/predictions/sleepy", content=b"0.5"))
                    for _ in range(2)
                ]
                await asyncio.to_thread(wait_until, lambda: log.read_text().strip() != "")
                os.kill(tg.process.pid, signal.SIGTERM)
                return [r.status_code for r in await asyncio.gather(*calls)]

        assert asyncio.run(scenario()) == [200, 200]  # one ran, one was queued: both answered
        assert tg.process.wait(timeout=30) == 0
