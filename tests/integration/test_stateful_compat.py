"""Sequence batching (TorchServe's examples/stateful) against real TorchServe 0.12 and torchgate.

One archive, built as examples/stateful builds its own: a handler keeping a running sum per
sequence id (`context.get_sequence_id(idx)`) and a model-config.yaml with `sequenceBatching:
true`. The handler also tells which worker ran a request and whether it began a sequence, in
response headers, so pinning and new-sequence ids are visible from outside.

torchgate runs in this process's own thread (real uvicorn, real gRPC, real worker processes),
and reads the sequence keys from the archive's model-config.yaml as TorchServe does.

Sequences are held until idle for sequenceMaxIdleMSec; with maxNumSequence 2 a test that needs
free slots first waits that out (`wait_until_idle`), and no test reuses a sequence id: the
handler's cache outlives a sequence, and on which worker a restarted one lands is TorchServe's
choice.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import uvicorn

from api.app import build
from api.config import parse_config
from api.rpc.generated import inference_pb2 as inference
from api.rpc.generated import inference_pb2_grpc as inference_grpc
from tests.support.archives import build_archive
from tests.support.torchserve import free_ports, running_torchserve

pytestmark = [
    pytest.mark.integration,
    pytest.mark.torchserve,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java"),
]

IDLE_MS = 1500
# examples/stateful/stateful_handler.py, with a dict for its LRU (lru-dict is not a dependency
# here) and two response headers for the test. A request of several numbers ("1 2 3") streams,
# as the LLM examples' stateful handlers do: each running sum but the last is sent as an
# intermediate response (batchSize is 1), the last one is the answer.
HANDLER = """
    import os
    from collections import OrderedDict

    from ts.handler_utils.utils import send_intermediate_predict_response
    from ts.torch_handler.base_handler import BaseHandler


    class StatefulHandler(BaseHandler):
        DEFAULT_CAPACITY = 10

        def initialize(self, ctx):
            self.context = ctx
            handler = ctx.model_yaml_config.get("handler") or {}
            self.capacity = int(handler.get("cache", {}).get("capacity", self.DEFAULT_CAPACITY))
            self.cache = OrderedDict()
            self.initialized = True

        def preprocess(self, data):
            results = []
            for idx, row in enumerate(data):
                sequence_id = self.context.get_sequence_id(idx)
                prev = int(self.cache.get(sequence_id, 0))
                request = row.get("data") or row.get("body")
                if isinstance(request, (bytes, bytearray)):
                    request = request.decode("utf-8")
                *parts, request = request.split()
                for part in parts:
                    prev += int(part)
                    send_intermediate_predict_response(
                        [str(prev)], self.context.request_ids, "Intermediate", 200, self.context
                    )
                self.cache[sequence_id] = prev + int(request)
                self.cache.move_to_end(sequence_id)
                while len(self.cache) > self.capacity:
                    self.cache.popitem(last=False)
                results.append(self.cache[sequence_id])
                start = self.context.get_request_header(idx, "ts_request_sequence_start")
                self.context.set_response_header(idx, "x-worker", str(os.getpid()))
                self.context.set_response_header(idx, "x-sequence-start", str(start))
                self.context.set_response_header(idx, "x-sequence-id", str(sequence_id))
            return results

        def inference(self, data, *args, **kwargs):
            return data

        def postprocess(self, data):
            return data
"""
MODEL_CONFIG = f"""
minWorkers: 2
maxWorkers: 2
batchSize: 1
sequenceMaxIdleMSec: {IDLE_MS}
maxNumSequence: 2
maxSequenceJobQueueSize: 2
sequenceBatching: true
handler:
  cache:
    capacity: 4
"""


@dataclass
class Server:
    predictions: str  # POST URL of the stateful model
    grpc_port: int


class TorchgateThread:
    """torchgate serving in a thread with its own event loop, until `stop`."""

    def __init__(self, store: Path, workdir: Path) -> None:
        self.store, self.workdir = store, workdir
        self.http_port, self.grpc_port, self.grpc_management_port = free_ports(3)
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.server: uvicorn.Server | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        raw = {
            "model_store": str(self.store),
            "load_models": "stateful.mar",
            "disable_token_authorization": "true",
            "torchgate.snapshot_file": "",
            "grpc_inference_port": str(self.grpc_port),
            "grpc_management_port": str(self.grpc_management_port),
        }
        tg = build(parse_config(raw, base_dir=self.workdir), access_log=False)
        await tg.start()
        assert tg.startup_errors == []
        start_grpc, stop_grpc = tg.grpc_servers()
        await start_grpc()
        config = uvicorn.Config(
            tg.inference_app, host="127.0.0.1", port=self.http_port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        serving = asyncio.create_task(self.server.serve())
        while not self.server.started and not serving.done():
            await asyncio.sleep(0.01)
        self.ready.set()
        try:
            await serving
        finally:
            await stop_grpc(0)
            await tg.stop()

    def __enter__(self) -> TorchgateThread:
        self.thread.start()
        self.ready.wait(120)
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.should_exit = True
        self.thread.join(60)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    work = tmp_path_factory.mktemp("stateful")
    store = work / "store"
    build_archive(
        work,
        "stateful",
        "stateful_handler.py",
        {"stateful_handler.py": HANDLER, "model-config.yaml": MODEL_CONFIG},
        config="model-config.yaml",
        export_dir=store,
    )
    with (
        running_torchserve(store, None, "stateful.mar") as ts,
        TorchgateThread(store, work) as tg,
    ):
        yield {
            "torchserve": Server(
                f"{ts.inference_url}/predictions/stateful", ts.grpc_inference_port
            ),
            "torchgate": Server(
                f"http://127.0.0.1:{tg.http_port}/predictions/stateful", tg.grpc_port
            ),
        }


def wait_until_idle() -> None:
    """Let every sequence of earlier tests pass sequenceMaxIdleMSec (with a margin)."""
    time.sleep(IDLE_MS / 1000 * 2 + 0.5)


def post(server: Server, body: str, sequence_id: str | None = None) -> httpx.Response:
    headers = {"ts_request_sequence_id": sequence_id} if sequence_id else {}
    return httpx.post(server.predictions, content=body.encode(), headers=headers, timeout=30)


def test_named_sequences_keep_their_sums_on_one_worker(servers: dict[str, Server]) -> None:
    bodies: dict[str, list[str]] = {}
    refused = {}
    for name, server in servers.items():
        answers = []
        for sequence_id, value in [("a", 1), ("b", 10), ("a", 2), ("b", 20), ("a", 3)]:
            answer = post(server, str(value), sequence_id)
            assert answer.status_code == 200, (name, answer.text)
            assert answer.headers["x-sequence-id"] == sequence_id
            assert answer.headers["x-sequence-start"] == "None"  # a named sequence: no flag
            assert "ts_request_sequence_id" not in answer.headers
            answers.append(answer)
        bodies[name] = [a.text for a in answers]
        for sequence_id in "ab":  # each sequence stayed on one worker process
            pids = {
                a.headers["x-worker"] for a in answers if a.headers["x-sequence-id"] == sequence_id
            }
            assert len(pids) == 1, (name, sequence_id, pids)
        # maxNumSequence 2: "a" and "b" hold both slots until idle for sequenceMaxIdleMSec
        refused[name] = post(server, "1", "c")
    assert bodies["torchserve"] == bodies["torchgate"] == ["1", "10", "3", "30", "6"]
    ts, tg = refused["torchserve"], refused["torchgate"]
    assert ts.status_code == tg.status_code == 503
    assert ts.json() == tg.json()
    assert tg.json()["type"] == "ServiceUnavailableException"
    assert "retry-after" not in ts.headers and "retry-after" not in tg.headers


def test_requests_without_an_id_start_their_own_sequence(servers: dict[str, Server]) -> None:
    wait_until_idle()  # the sequences of the test before end, which frees their slots
    for name, server in servers.items():
        first, second = post(server, "5"), post(server, "7")
        assert (first.status_code, first.text, second.text) == (200, "5", "7"), name
        for answer in (first, second):
            assert answer.headers["x-sequence-start"] == "true"
            assert answer.headers["x-sequence-id"].startswith("ts-seq-")
            assert "ts_request_sequence_id" not in answer.headers  # the id is not sent back
        assert first.headers["x-sequence-id"] != second.headers["x-sequence-id"]


def stream(
    server: Server, messages: list[inference.PredictionsRequest], parts: int = 0
) -> list[Any]:
    """Send one message per answer, in lockstep, and half-close only after the last answer:
    TorchServe 0.12 ends the call as soon as the client half-closes, dropping answers still
    being computed. `parts`: the intermediate responses the first message streams first."""
    answered = threading.Semaphore(0)

    def requests() -> Iterator[inference.PredictionsRequest]:
        for index, message in enumerate(messages):
            yield message
            for _ in range(1 + (parts if index == 0 else 0)):
                assert answered.acquire(timeout=30)

    responses = []
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = inference_grpc.InferenceAPIsServiceStub(channel)
        for response in stub.StreamPredictions2(requests(), timeout=30):
            responses.append(response)
            answered.release()
    return responses


def test_stream_predictions2_runs_a_sequence(servers: dict[str, Server]) -> None:
    wait_until_idle()
    answers = {}
    for name, server in servers.items():
        messages = [
            inference.PredictionsRequest(
                model_name="stateful", input={"data": str(v).encode()}, sequence_id=f"{name}-g"
            )
            for v in (1, 2, 3)
        ]
        missing = inference.PredictionsRequest(model_name="stateful", input={"data": b"1"})
        answers[name] = stream(server, [*messages, missing])
    for name, responses in answers.items():
        assert [r.prediction for r in responses[:3]] == [b"1", b"3", b"6"], name
        assert not any(r.HasField("sequence_id") for r in responses)  # not sent back
        assert responses[3].status.message == "Parameter sequenceId is required."
    # TorchServe answers every error with INTERNAL; torchgate with the mapped code.
    assert answers["torchserve"][3].status.code == grpc.StatusCode.INTERNAL.value[0]
    assert answers["torchgate"][3].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_stream_predictions2_streams_a_handlers_intermediate_responses(
    servers: dict[str, Server],
) -> None:
    """A streaming handler's intermediate responses are messages of their own, before the
    final one, then the next message of the sequence is answered (TorchServe 0.12 too)."""
    wait_until_idle()
    answers = {}
    for name, server in servers.items():
        messages = [
            inference.PredictionsRequest(
                model_name="stateful", input={"data": data}, sequence_id=f"{name}-streamed"
            )
            for data in (b"1 2 3", b"4")
        ]
        answers[name] = stream(server, messages, parts=2)
    for name, responses in answers.items():
        assert [r.prediction for r in responses] == [b"1", b"3", b"6", b"10"], name
        assert not any(r.HasField("status") for r in responses), name
