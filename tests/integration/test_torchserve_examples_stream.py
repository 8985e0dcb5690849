"""TorchServe's example patterns, side by side in real TorchServe 0.12 and in torchgate.

Archives written the way TorchServe's examples write theirs, built at test time: a streaming
handler (examples/LLM, text generation with a streamer: `send_intermediate_predict_response`),
a captum-style handler with `explain_handle` (examples/captum), a handler that reads files
relative to the model directory (examples/Huggingface_Transformers' setup_config.json), and one
that reports the request items it receives (HTTP verbs, forms). Same requests to both servers;
same statuses, bodies, stream chunks and relevant headers.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from api.backends.torchserve import TorchServeSpec, open_backend
from api.core.types import InferenceRequest, ModelSettings, Prediction
from api.errors import BackendUnavailable
from api.rpc.generated import inference_pb2 as inference
from api.rpc.generated import inference_pb2_grpc as inference_grpc
from tests.support import aio
from tests.support.archives import build_archive
from tests.support.chunked import request_chunks
from tests.support.side_by_side import Endpoints as Server
from tests.support.side_by_side import side_by_side

pytestmark = [
    pytest.mark.integration,
    pytest.mark.torchserve,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java"),
]

# examples/LLM: one intermediate response per generated token, the last token as the answer.
# Handlers import the function from either module (examples use both): tokens alternate.
STREAMER = """
    import os

    from ts.handler_utils.utils import send_intermediate_predict_response as send_utils
    from ts.protocol.otf_message_handler import send_intermediate_predict_response as send_otf
    from ts.torch_handler.base_handler import BaseHandler


    class TokenStreamer(BaseHandler):
        def initialize(self, context):
            self.context = context
            self.initialized = True

        def handle(self, data, context):
            text = data[0].get("data") or data[0].get("body")
            if isinstance(text, (bytes, bytearray)):
                text = text.decode()
            words = str(text).split()
            for index, word in enumerate(words[:-1]):
                if word == "fail":
                    raise ValueError("generation failed after some tokens")
                if word == "crash":  # the worker process dies mid-generation
                    os._exit(3)
                send = send_otf if index % 2 else send_utils
                send(
                    [word + " "], context.request_ids, "Intermediate Prediction success", 200,
                    context,
                )
            return [words[-1] if words else ""]
"""

# examples/captum: BaseHandler.handle calls explain_handle when the request says explain.
EXPLAINER = """
    from ts.torch_handler.base_handler import BaseHandler


    class Explainer(BaseHandler):
        def initialize(self, context):
            self.context = context
            self.initialized = True

        def preprocess(self, data):
            return [row.get("data") or row.get("body") for row in data]

        def inference(self, data):
            return data

        def postprocess(self, data):
            return [{"prediction": row} for row in data]

        def get_insights(self, tensor_data, raw_data, target):
            return [{"attributions": [len(str(raw_data)), target], "inputs": raw_data}]
"""

# What the handler receives, per parameter: its kind (bytes, str, parsed JSON) and value.
INSPECTOR = """
    def handle(data, context):
        if data is None:
            return None
        answers = []
        for index, row in enumerate(data):
            seen = {}
            for name, value in row.items():
                if isinstance(value, (bytes, bytearray)):
                    seen[name] = ["bytes", value.decode("latin-1")]
                else:
                    seen[name] = [type(value).__name__, value]
            seen["explain"] = context.get_request_header(index, "explain")
            answers.append(seen)
        return answers
"""

# examples/Huggingface_Transformers: initialize opens setup_config.json from the model directory
# (the worker's cwd) and index_to_name.json through model_dir.
FILES = """
    import json
    import os

    from ts.torch_handler.base_handler import BaseHandler


    class FromModelDir(BaseHandler):
        def initialize(self, context):
            with open("setup_config.json") as f:
                self.setup = json.load(f)
            model_dir = context.system_properties.get("model_dir")
            with open(os.path.join(model_dir, "index_to_name.json")) as f:
                self.labels = json.load(f)
            self.initialized = True

        def handle(self, data, context):
            return [{"setup": self.setup, "labels": self.labels} for _ in data]
"""


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    work = tmp_path_factory.mktemp("examples")
    store = work / "store"
    store.mkdir()
    build_archive(work, "streamer", "stream.py", {"stream.py": STREAMER}, export_dir=store)
    build_archive(work, "explainer", "explain.py", {"explain.py": EXPLAINER}, export_dir=store)
    build_archive(work, "inspector", "probe.py", {"probe.py": INSPECTOR}, export_dir=store)
    files = {
        "files.py": FILES,
        "setup_config.json": json.dumps({"max_length": 8, "mode": "sequence_classification"}),
        "index_to_name.json": json.dumps({"0": "negative", "1": "positive"}),
    }
    build_archive(work, "hf_pattern", "files.py", files, export_dir=store)
    with side_by_side(store) as servers:
        yield servers


def both(
    servers: dict[str, Server], method: str, path: str, **kwargs: object
) -> list[httpx.Response]:
    return [
        httpx.request(method, server.inference + path, timeout=60, **kwargs)  # type: ignore[arg-type]
        for server in (servers["torchserve"], servers["torchgate"])
    ]


def test_stream_sends_one_chunk_per_intermediate_response(servers: dict[str, Server]) -> None:
    theirs, ours = (
        request_chunks(s.inference, "POST", "/predictions/streamer", b"tokens come one by one")
        for s in (servers["torchserve"], servers["torchgate"])
    )
    assert theirs.chunks == [b"tokens ", b"come ", b"one ", b"by ", b"one"]
    assert ours.chunks == theirs.chunks
    assert ours.status == theirs.status == 200
    assert ours.complete and theirs.complete
    for name in ("transfer-encoding", "ts_stream_next"):
        assert ours.headers.get(name) == theirs.headers.get(name), name


def test_a_handler_that_does_not_stream_answers_plainly(servers: dict[str, Server]) -> None:
    theirs, ours = (
        request_chunks(s.inference, "POST", "/predictions/streamer", b"single")
        for s in (servers["torchserve"], servers["torchgate"])
    )
    assert ours.chunks == theirs.chunks == [b"single"]
    assert "transfer-encoding" not in ours.headers and "transfer-encoding" not in theirs.headers
    assert "ts_stream_next" not in ours.headers and "ts_stream_next" not in theirs.headers


def test_a_failure_after_chunks_cuts_the_stream_short(servers: dict[str, Server]) -> None:
    """Too late for an error status: TorchServe resets the connection, torchgate closes it;
    either way the client gets the chunks sent so far and no closing chunk."""
    theirs, ours = (
        request_chunks(s.inference, "POST", "/predictions/streamer", b"first fail never")
        for s in (servers["torchserve"], servers["torchgate"])
    )
    assert ours.status == theirs.status == 200
    assert ours.chunks == theirs.chunks == [b"first "]
    assert not ours.complete and not theirs.complete


def test_a_worker_dying_mid_stream_cuts_only_that_stream(servers: dict[str, Server]) -> None:
    """The worker process exits after a chunk: on both servers the client gets the chunks sent
    so far and no closing chunk, the worker is replaced, and the next stream is whole."""
    for server in (servers["torchserve"], servers["torchgate"]):
        cut = request_chunks(server.inference, "POST", "/predictions/streamer", b"first crash x")
        assert (cut.status, cut.chunks, cut.complete) == (200, [b"first "], False)
    for server in (servers["torchserve"], servers["torchgate"]):
        assert streams_whole_again(server)


def streams_whole_again(server: Server) -> bool:
    """Whether the streamer serves a whole stream again within a minute (TorchServe restarts
    a dead worker after a second or so; until then it answers 503)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        again = request_chunks(server.inference, "POST", "/predictions/streamer", b"a b c")
        if again.status == 200:
            return (again.chunks, again.complete) == ([b"a ", b"b ", b"c"], True)
        time.sleep(0.2)
    return False


def test_grpc_stream_predictions_sends_one_message_per_response(
    servers: dict[str, Server],
) -> None:
    def stream(server: Server, text: bytes) -> tuple[list[bytes], grpc.StatusCode | None]:
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = inference_grpc.InferenceAPIsServiceStub(channel)
            request = inference.PredictionsRequest(model_name="streamer", input={"data": text})
            messages: list[bytes] = []
            try:
                for message in stub.StreamPredictions(request, timeout=60):
                    messages.append(message.prediction)
            except grpc.RpcError as exc:
                return messages, exc.code()
            return messages, None

    theirs = stream(servers["torchserve"], b"a few tokens")
    ours = stream(servers["torchgate"], b"a few tokens")
    assert ours == theirs == ([b"a ", b"few ", b"tokens"], None)
    # After a message, the call fails. TorchServe answers any handler exception with 503
    # "Prediction failed" (UNAVAILABLE: "retry"), on every API; torchgate answers 500 (INTERNAL)
    # as it does for Predictions and REST: retrying a handler's bug does not help.
    theirs = stream(servers["torchserve"], b"first fail never")
    ours = stream(servers["torchgate"], b"first fail never")
    assert ours[0] == theirs[0] == [b"first "]
    assert (ours[1], theirs[1]) == (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE)
    # The worker process dies after a message: the same on both.
    theirs = stream(servers["torchserve"], b"first crash never")
    ours = stream(servers["torchgate"], b"first crash never")
    assert ours == theirs == ([b"first "], grpc.StatusCode.INTERNAL)
    for server in (servers["torchserve"], servers["torchgate"]):
        assert streams_whole_again(server)


@pytest.mark.parametrize("path", ["/explanations/explainer", "/explanations/explainer/1.0"])
def test_explanations_call_explain_handle(servers: dict[str, Server], path: str) -> None:
    theirs, ours = both(servers, "POST", path, json={"instances": [[1.0, 2.0]]})
    assert ours.status_code == theirs.status_code == 200
    assert ours.json() == theirs.json()
    assert "attributions" in ours.json()


def test_predictions_do_not_explain(servers: dict[str, Server]) -> None:
    theirs, ours = both(servers, "POST", "/predictions/explainer", json={"x": 1})
    assert ours.status_code == theirs.status_code == 200
    assert ours.json() == theirs.json() == {"prediction": {"x": 1}}


@pytest.mark.parametrize("path", ["/explanations/inspector", "/predictions/inspector"])
def test_the_explain_header_is_set_as_torchserve_sets_it(
    servers: dict[str, Server], path: str
) -> None:
    theirs, ours = both(servers, "POST", path, content=b"x", headers={"explain": "maybe"})
    assert ours.json() == theirs.json()
    assert ours.json()["explain"] == ("True" if path.startswith("/explanations") else "False")


def test_explaining_an_unknown_model_is_404(servers: dict[str, Server]) -> None:
    theirs, ours = both(servers, "POST", "/explanations/nope", content=b"x")
    assert ours.status_code == theirs.status_code == 404
    assert ours.json()["type"] == theirs.json()["type"] == "ModelNotFoundException"


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_every_method_runs_inference(servers: dict[str, Server], method: str) -> None:
    theirs, ours = both(servers, method, "/predictions/inspector", content=b"uploaded file")
    assert ours.status_code == theirs.status_code == 200
    assert ours.json() == theirs.json()


def test_head_runs_inference_without_a_body(servers: dict[str, Server]) -> None:
    theirs, ours = both(servers, "HEAD", "/predictions/inspector")
    assert ours.status_code == theirs.status_code == 200
    assert ours.content == theirs.content == b""


def test_curl_upload_file(servers: dict[str, Server], tmp_path: Path) -> None:
    """`curl URL -T file` sends a PUT with the file as the body."""
    upload = tmp_path / "input.txt"
    upload.write_bytes(b"a file's content")
    theirs, ours = both(servers, "PUT", "/predictions/inspector", content=upload.read_bytes())
    assert (
        ours.json()
        == theirs.json()
        == {
            "body": ["bytes", "a file's content"],
            "explain": "False",
        }
    )


def test_form_fields_reach_the_handler_as_torchserve_gives_them(
    servers: dict[str, Server],
) -> None:
    theirs, ours = both(servers, "POST", "/predictions/inspector", data={"a": "1", "b": "two"})
    assert ours.json() == theirs.json()
    files = {
        "text": ("t.txt", b"file text", "text/plain"),
        "raw": ("r.bin", b"\x00\x01", "application/octet-stream"),
        "doc": ("d.json", b'{"k": 1}', "application/json"),
    }
    theirs, ours = both(servers, "POST", "/predictions/inspector", data={"field": "1"}, files=files)
    assert ours.status_code == theirs.status_code == 200
    assert ours.json() == theirs.json()
    assert ours.json()["field"] == ["bytes", "1"]


def test_options_describes_the_model(servers: dict[str, Server]) -> None:
    for path in ("/predictions/inspector", "/predictions/inspector/1.0"):
        theirs, ours = both(servers, "OPTIONS", path)
        assert ours.status_code == theirs.status_code == 200
        assert ours.content == theirs.content
    theirs, ours = both(servers, "OPTIONS", "/predictions/nope")
    assert ours.status_code == theirs.status_code == 404
    assert ours.json() == theirs.json()


def test_handler_reads_files_relative_to_the_model_dir(servers: dict[str, Server]) -> None:
    theirs, ours = both(servers, "POST", "/predictions/hf_pattern", content=b"x")
    assert ours.status_code == theirs.status_code == 200
    assert ours.json() == theirs.json()
    assert ours.json()["labels"] == {"0": "negative", "1": "positive"}


def test_the_torchserve_proxy_relays_streams_and_explanations(
    servers: dict[str, Server],
) -> None:
    """torchgate's proxy backend in front of this TorchServe: a stream comes back piece by
    piece (one per chunk, as TorchServe flushes each), and an explain request reaches
    /explanations."""

    async def scenario() -> None:
        spec = TorchServeSpec(
            inference_url=servers["torchserve"].inference,
            model_name="streamer",
            model_version="1.0",
            health_interval_s=3600.0,
        )
        backend = await open_backend(spec, ModelSettings(), name="streamer", version="1.0")
        try:
            pieces: list[Prediction] = []
            request = InferenceRequest({"body": b"relayed in pieces"}, {}, "r1")
            request.stream = pieces.append
            final = await backend.forward(request)
            assert b"".join(p.body for p in pieces) + final.body == b"relayed in pieces"
            assert pieces and all(p.headers["ts_stream_next"] == "true" for p in pieces)
            assert final.headers["ts_stream_next"] == "false"
            cut = InferenceRequest({"body": b"first fail never"}, {}, "r2")
            before_the_cut: list[Prediction] = []
            cut.stream = before_the_cut.append
            with pytest.raises(BackendUnavailable):
                await backend.forward(cut)
            # What TorchServe sent before the stream broke reaches the client, as it reaches
            # TorchServe's own clients (its last piece was held back for the final answer).
            assert b"".join(p.body for p in before_the_cut).startswith(b"first")
        finally:
            await backend.close()
        explain_spec = TorchServeSpec(
            inference_url=servers["torchserve"].inference,
            model_name="inspector",
            model_version="1.0",
            health_interval_s=3600.0,
        )
        backend = await open_backend(explain_spec, ModelSettings(), name="i", version="1.0")
        try:
            asked = InferenceRequest({"body": b"x"}, {"explain": "True"}, "r3")
            answer = await backend.forward(asked)
            assert json.loads(answer.body)["explain"] == "True"
        finally:
            await backend.close()

    aio.run(scenario(), timeout=60)


def test_unary_predictions_on_a_streaming_handler(servers: dict[str, Server]) -> None:
    """gRPC Predictions answers once. TorchServe completes the call with the handler's first
    intermediate response and drops the rest; torchgate answers with the final response and
    logs a WARNING that the parts were dropped (docs/compatibility.md)."""

    def unary(server: Server) -> bytes:
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = inference_grpc.InferenceAPIsServiceStub(channel)
            request = inference.PredictionsRequest(
                model_name="streamer", input={"data": b"a few tokens"}
            )
            prediction: bytes = stub.Predictions(request, timeout=60).prediction
            return prediction

    assert unary(servers["torchserve"]) == b"a "
    assert unary(servers["torchgate"]) == b"tokens"
