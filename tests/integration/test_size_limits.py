"""`max_response_size` and `max_request_size`, against real TorchServe 0.12 and torchgate side by
side.

TorchServe bounds each message a worker sends back (a whole answer, or one intermediate
response of a streaming handler) by `max_response_size`. Over it, its frontend fails the frame:
the request gets 500 "Worker died.", a stream is cut after the chunks already sent, and the
worker is killed and restarted, with every other request of its batch. torchgate answers the
same statuses and chunks, says why in the message (and a WARNING in the log), and keeps the
worker: the limit is about what is sent, not a fault of the handler's process
(docs/compatibility.md).

`max_request_size` bounds a request body on every port: the management API's too, before the
body is read, whether its length is declared or it comes chunked. TorchServe answers 413 with
an empty body there; torchgate with its error JSON.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import grpc
import httpx
import pytest

from api.rpc.generated import inference_pb2 as inference
from api.rpc.generated import inference_pb2_grpc as inference_grpc
from tests.support.archives import build_archive
from tests.support.chunked import request_chunks
from tests.support.side_by_side import Endpoints, side_by_side

pytestmark = [
    pytest.mark.integration,
    pytest.mark.torchserve,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java"),
]

LIMIT = 1000

# The body names what to answer: "str N", "dict N", "stream N1 N2 ... FINAL", or "pid".
SIZED = """
    import os

    from ts.protocol.otf_message_handler import send_intermediate_predict_response


    def handle(data, context):
        if data is None:
            return None
        if context.get_request_header(0, "describe") == "True":  # ?customized=true
            return ["m" * 2000]
        answers = []
        for row in data:
            body = row.get("body") or row.get("data")
            if isinstance(body, (bytes, bytearray)):
                body = body.decode()
            kind, *sizes = body.split()
            if kind == "pid":
                answers.append(str(os.getpid()))
            elif kind == "str":
                answers.append("s" * int(sizes[0]))
            elif kind == "dict":
                answers.append({"v": "d" * int(sizes[0])})
            else:
                for size in sizes[:-1]:
                    send_intermediate_predict_response(
                        ["c" * int(size)], context.request_ids, "Intermediate", 200, context
                    )
                answers.append("f" * int(sizes[-1]))
        return answers
"""


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Endpoints]]:
    work = tmp_path_factory.mktemp("response-size")
    store = work / "store"
    store.mkdir()
    build_archive(work, "sized", "handler.py", {"handler.py": SIZED}, export_dir=store)
    config = {
        "max_response_size": str(LIMIT),
        "max_request_size": str(LIMIT),
        "default_workers_per_model": "1",
    }
    with side_by_side(store, config) as both:
        yield both


def _post(server: Endpoints, body: str, path: str = "/predictions/sized") -> httpx.Response:
    return httpx.post(server.inference + path, content=body.encode(), timeout=60)


@pytest.mark.parametrize("body", ["str 1000", "dict 980"])
def test_an_answer_up_to_the_limit_is_sent_alike(servers: dict[str, Endpoints], body: str) -> None:
    ours, theirs = (_post(servers[name], body) for name in ("torchgate", "torchserve"))
    assert ours.status_code == theirs.status_code == 200
    if body.startswith("dict"):
        assert ours.json() == theirs.json()
    else:
        assert ours.text == theirs.text
    assert len(ours.content) <= LIMIT


@pytest.mark.parametrize(
    "body, path",
    [
        ("str 1001", "/predictions/sized"),
        ("dict 2000", "/predictions/sized"),
        ("str 5000", "/invocations?model_name=sized"),
    ],
)
def test_an_answer_over_the_limit_fails_its_request_with_500(
    servers: dict[str, Endpoints], body: str, path: str
) -> None:
    ours, theirs = (_post(servers[name], body, path) for name in ("torchgate", "torchserve"))
    assert ours.status_code == theirs.status_code == 500
    assert ours.json()["type"] == theirs.json()["type"] == "InternalServerException"
    assert theirs.json()["message"] == "Worker died."
    # Ours says which limit and by how much.
    assert "exceeds max_response_size of 1000 bytes" in ours.json()["message"]


def test_the_worker_is_kept_here_and_restarted_by_torchserve(
    servers: dict[str, Endpoints],
) -> None:
    pids = {}
    for name, server in servers.items():
        before = _post(server, "pid").text
        assert _post(server, "str 2000").status_code == 500
        after = _post(server, "pid")  # TorchServe holds it until its new worker is up
        assert after.status_code == 200
        pids[name] = (before, after.text)
    assert pids["torchgate"][0] == pids["torchgate"][1]
    assert pids["torchserve"][0] != pids["torchserve"][1]


@pytest.mark.parametrize(
    "body, status, chunks, complete",
    [
        ("stream 10 20 30", 200, [b"c" * 10, b"c" * 20, b"f" * 30], True),
        # An intermediate response over the limit: the stream ends without its closing chunk.
        ("stream 10 2000 30", 200, [b"c" * 10], False),
        ("stream 10 2000", 200, [b"c" * 10], False),
        # The first one: nothing was sent yet, so the request fails with 500.
        ("stream 2000 30", 500, None, True),
    ],
)
def test_each_streamed_response_is_bounded_alike(
    servers: dict[str, Endpoints],
    body: str,
    status: int,
    chunks: list[bytes] | None,
    complete: bool,
) -> None:
    for server in servers.values():
        reply = request_chunks(
            server.inference,
            "POST",
            "/predictions/sized",
            body.encode(),
            {"Content-Type": "text/plain"},
        )
        assert (reply.status, reply.complete) == (status, complete), server
        if chunks is not None:
            assert reply.chunks == chunks, server


def _grpc_predict(port: int, body: bytes) -> bytes:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = inference_grpc.InferenceAPIsServiceStub(channel)
        request = inference.PredictionsRequest(model_name="sized", input={"body": body})
        return bytes(stub.Predictions(request, timeout=60).prediction)


def test_grpc_answers_over_the_limit_fail_with_a_status(servers: dict[str, Endpoints]) -> None:
    codes = {}
    for name, server in servers.items():
        assert _grpc_predict(server.grpc_port, b"str 10") == b"s" * 10
        with pytest.raises(grpc.RpcError) as failed:
            _grpc_predict(server.grpc_port, b"str 2000")
        codes[name] = (failed.value.code(), failed.value.details())
    assert codes["torchserve"][0] == grpc.StatusCode.INTERNAL
    # gRPC's own limit on sent messages answers here, with its standard code and the sizes.
    assert codes["torchgate"][0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max (2003 vs. 1000)" in codes["torchgate"][1]


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
@pytest.mark.parametrize("path", ["/models?url=x.mar", "/models/sized", "/workflows?url=x.war"])
def test_a_management_body_over_max_request_size_is_refused_with_413(
    servers: dict[str, Endpoints], path: str, chunked: bool
) -> None:
    body = b"a" * (2 * LIMIT)
    for name, server in servers.items():
        content = iter([body[:LIMIT], body[LIMIT:]]) if chunked else body
        answer = httpx.post(server.management + path, content=content, timeout=60)
        assert answer.status_code == 413, (name, answer.text)
        if name == "torchgate":
            assert "exceeds max_request_size" in answer.json()["message"]


def test_a_customized_description_over_the_limit_fails_alike(
    servers: dict[str, Endpoints],
) -> None:
    messages = {}
    for name, server in servers.items():
        described = httpx.get(server.management + "/models/sized?customized=true", timeout=60)
        assert described.status_code == 500, (name, described.text)
        messages[name] = described.json()["message"]
        plain = httpx.get(server.management + "/models/sized", timeout=60)
        assert plain.status_code == 200, name
    assert "exceeds max_response_size" in messages["torchgate"]
