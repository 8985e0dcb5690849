"""The attacks of the hardening issue, each a function of the server that returns what the
attacker was answered ("431", "400 x2", "INVALID_ARGUMENT x3", ...), as docs/security.md says
it must be. Each attack leaves nothing behind: sockets closed, models as they were.

The store holds digits (1.0), minilm and bomb.mar; `outside` is an archive outside it.
"""

from __future__ import annotations

import json
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import httpx
import numpy as np

from api.rpc.generated import grpc_predict_v2_pb2 as pb
from api.rpc.generated import grpc_predict_v2_pb2_grpc as pb_grpc
from api.rpc.generated import management_pb2 as management
from api.rpc.generated import management_pb2_grpc as management_grpc
from tests.support.bombs import deep_json, png_bomb
from tests.support.server import TorchgateServer

HALF_SENT = 2_000  # connections, spread over the three HTTP ports; well under `ulimit -n`
HEADER_TIMEOUT = 2.0  # torchgate.header_timeout in the suite's config: 408s come in seconds
OVERSIZED_ITEMS = 24_000  # digits rows: 6.1 MB, under max_request_size
METADATA = "torchserve://169.254.169.254:80/m/1.0"  # a cloud's metadata service
SERVED = ["digits", "minilm"]  # the models registered from start to end
MALFORMED = b"\x0a\x7fabc"  # not a protobuf message: a string field claims 127 bytes, 3 follow


@dataclass(frozen=True)
class Case:
    name: str
    expected: str  # what docs/security.md says the attacker gets
    attack: Callable[[TorchgateServer, Path], str]


def tally(answers: Iterable[int | str]) -> str:
    """["400", "400", 403] -> "400 x2, 403"; in the order first seen."""
    counts = Counter(str(answer) for answer in answers)
    return ", ".join(f"{a} x{n}" if n > 1 else a for a, n in counts.items())


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname and parts.port, url
    return parts.hostname, parts.port


def status_of(answer: bytes) -> str:
    """The status code of a raw HTTP answer; "closed" when the server sent nothing."""
    return answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/1.1 ") else "closed"


def huge_header(mebibytes: int) -> Callable[[TorchgateServer, Path], str]:
    """One header of `mebibytes` MiB, sent until the server stops taking it: the answer is read
    meanwhile, and the socket closed only once the server has refused the rest."""

    def attack(server: TorchgateServer, _: Path) -> str:
        sock = socket.create_connection(address(server.inference_url), timeout=30)

        def send() -> None:
            try:
                sock.sendall(b"GET /ping HTTP/1.1\r\nhost: x\r\nx-big: ")
                chunk = b"a" * (1 << 20)
                for _ in range(mebibytes):
                    sock.sendall(chunk)
            except OSError:
                pass  # answered 431, drained a while, then closed: the rest is never read

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        answer = sock.recv(65536)
        sender.join(timeout=60)
        sock.close()
        return status_of(answer)

    return attack


def half_sent_requests(server: TorchgateServer, _: Path) -> str:
    """Connections that send part of a request's headers and stop, on all three HTTP ports; a
    new client on each port must be served while they are open."""
    ports = [server.inference_url, server.management_url, server.metrics_url]
    flood: list[socket.socket] = []
    try:
        for index in range(HALF_SENT):
            sock = socket.create_connection(address(ports[index % 3]), timeout=30)
            sock.sendall(b"POST /predictions/digits HTTP/1.1\r\nhost: x\r\ncontent-")
            flood.append(sock)
        served = [
            httpx.get(f"{server.inference_url}/ping", timeout=30).status_code,
            httpx.get(f"{server.management_url}/models", timeout=30).status_code,
            httpx.get(f"{server.metrics_url}/metrics", timeout=30).status_code,
        ]
        assert served == [200, 200, 200], f"new clients during the flood got {served}"
        return tally(_first_answers(flood, deadline=time.monotonic() + 10 * HEADER_TIMEOUT))
    finally:
        for sock in flood:
            sock.close()


def _first_answers(socks: list[socket.socket], deadline: float) -> list[str]:
    """The status each socket is answered (reading up to the first bytes), "none" for those
    still unanswered at `deadline`."""
    selector = selectors.DefaultSelector()
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    answers: list[str] = []
    while selector.get_map() and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.5):
            conn = key.fileobj
            assert isinstance(conn, socket.socket)
            try:
                answers.append(status_of(conn.recv(65536)))
            except OSError:
                answers.append("reset")
            selector.unregister(conn)
    answers += ["none"] * len(selector.get_map())
    selector.close()
    return answers


def png_bomb_to_digits(server: TorchgateServer, _: Path) -> str:
    url = f"{server.inference_url}/predictions/digits"
    return str(httpx.post(url, content=png_bomb(), timeout=60).status_code)


def megabytes_of_text_to_minilm(server: TorchgateServer, _: Path) -> str:
    text = " ".join(["tokens"] * 900_000)  # 6.3 MB, under max_request_size: cut, then served
    url = f"{server.inference_url}/predictions/minilm"
    return str(httpx.post(url, content=text.encode(), timeout=60).status_code)


def v2_binary(rows: np.ndarray) -> tuple[bytes, dict[str, str]]:
    raw = rows.astype(np.float32).tobytes()
    tensor: dict[str, object] = {"name": "pixels", "shape": list(rows.shape), "datatype": "FP32"}
    tensor["parameters"] = {"binary_data_size": len(raw)}
    head = json.dumps({"inputs": [tensor]}).encode()
    return head + raw, {"inference-header-content-length": str(len(head))}


def non_finite_v2_binary(server: TorchgateServer, _: Path) -> str:
    answers = []
    for bad in (np.nan, np.inf, -np.inf):
        rows = np.zeros((2, 64), np.float32)
        rows[1, 5] = bad
        body, headers = v2_binary(rows)
        url = f"{server.inference_url}/v2/models/digits/infer"
        answers.append(httpx.post(url, content=body, headers=headers, timeout=60).status_code)
    return tally(answers)


def deep_json_everywhere(server: TorchgateServer, _: Path) -> str:
    body, json_type = deep_json(), {"content-type": "application/json"}
    answers = [
        httpx.post(f"{server.inference_url}{path}", content=body, headers=json_type, timeout=60)
        for path in ("/predictions/digits", "/v2/models/digits/infer", "/predictions/minilm")
    ]
    traffic = f"{server.management_url}/models/digits/traffic"
    answers.append(httpx.put(traffic, content=b'{"weights": ' + body + b"}", headers=json_type))
    return tally(answer.status_code for answer in answers)


def malformed_grpc(server: TorchgateServer, _: Path) -> str:
    methods = [
        (server.grpc_inference_port, "/inference.GRPCInferenceService/ModelInfer"),
        (
            server.grpc_inference_port,
            "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions",
        ),
        (
            server.grpc_management_port,
            "/org.pytorch.serve.grpc.management.ManagementAPIsService/ListModels",
        ),
    ]
    answers = []
    for port, method in methods:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                channel.unary_unary(method)(MALFORMED, timeout=30)
                answers.append("OK")
            except grpc.RpcError as error:
                details = error.details() or ""
                internals = "Error" in details or "class" in details
                answers.append(f"{error.code().name}{' with internals' if internals else ''}")
    return tally(answers)


def oversized_v2_requests(server: TorchgateServer, _: Path) -> str:
    """One request of 24,000 digits rows, over REST (binary) and gRPC (raw contents)."""
    rows = np.zeros((OVERSIZED_ITEMS, 64), np.float32)
    body, headers = v2_binary(rows)
    url = f"{server.inference_url}/v2/models/digits/infer"
    answers: list[int | str] = [
        httpx.post(url, content=body, headers=headers, timeout=60).status_code
    ]
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="pixels", datatype="FP32", shape=rows.shape)
    request.raw_input_contents.append(rows.tobytes())
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_inference_port}") as channel:
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
            answers.append("OK")
        except grpc.RpcError as error:
            answers.append(error.code().name)
    return tally(answers)


def register(url: str, model_name: str = "") -> Callable[[TorchgateServer, Path], str]:
    """POST /models, then gRPC RegisterModel, with `url` ("{outside}": the archive outside the
    store) and `model_name`."""

    def attack(server: TorchgateServer, outside: Path) -> str:
        target = url.format(outside=outside)
        rest = f"{server.management_url}/models"
        params = {"url": target, "model_name": model_name}
        answers: list[int | str] = [httpx.post(rest, params=params, timeout=60).status_code]
        request = management.RegisterModelRequest(url=target, model_name=model_name)
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_management_port}") as channel:
            stub = management_grpc.ManagementAPIsServiceStub(channel)
            try:
                stub.RegisterModel(request, timeout=60)
                answers.append("OK")
            except grpc.RpcError as error:
                answers.append(error.code().name)
        return tally(answers) + planted(server)

    return attack


def cross_origin_register(server: TorchgateServer, _: Path) -> str:
    """A page's form post (cross-origin, no preflight), and the same after DNS rebinding
    (a foreign name in Host, same-origin to the browser)."""
    url = f"{server.management_url}/models"
    form = "application/x-www-form-urlencoded"
    port = address(server.management_url)[1]
    attempts = [
        {"origin": "http://evil.example", "content-type": form},
        {
            "origin": f"http://rebind.example:{port}",
            "host": f"rebind.example:{port}",
            "content-type": form,
        },
    ]
    params = {"url": "digits.mar", "model_name": "planted"}
    answers = [httpx.post(url, params=params, headers=h, timeout=60) for h in attempts]
    return tally(answer.status_code for answer in answers) + planted(server)


def planted(server: TorchgateServer) -> str:
    """ "" while the server has only its own models, else what an attack registered."""
    models = httpx.get(f"{server.management_url}/models", timeout=30).json()["models"]
    names = sorted(model["modelName"] for model in models)
    return "" if names == SERVED else f" and registered {names}"


def scale_to_zero_and_back(server: TorchgateServer, _: Path) -> str:
    """minilm to 0 workers: the server stays healthy (as in TorchServe); then back to 1."""
    url = f"{server.management_url}/models/minilm"
    answers: list[int | str] = []
    answers.append(httpx.put(f"{url}?min_worker=0&synchronous=true", timeout=60).status_code)
    ping = httpx.get(f"{server.inference_url}/ping", timeout=30)
    answers.append(f"ping {ping.status_code}")
    answers.append(httpx.put(f"{url}?min_worker=1&synchronous=true", timeout=120).status_code)
    return ", ".join(str(answer) for answer in answers)


def sixty_four_workers(server: TorchgateServer, _: Path) -> str:
    url = f"{server.management_url}/models/digits"
    queries = ("min_worker=64&synchronous=true", "min_worker=1&max_worker=64&synchronous=true")
    return tally(httpx.put(f"{url}?{query}", timeout=60).status_code for query in queries)


CASES = [
    Case("64 MiB header", "431", huge_header(64)),
    Case("256 MiB header", "431", huge_header(256)),
    Case(f"{HALF_SENT:,} half-sent requests", f"408 x{HALF_SENT}", half_sent_requests),
    Case("13000x13000 PNG to digits", "413", png_bomb_to_digits),
    Case("6 MB of text to minilm", "200", megabytes_of_text_to_minilm),
    Case("v2 binary NaN/+Inf/-Inf", "400 x3", non_finite_v2_binary),
    Case("100,000-deep JSON", "400 x4", deep_json_everywhere),
    Case("malformed gRPC bytes", "INVALID_ARGUMENT x3", malformed_grpc),
    Case(
        f"{OVERSIZED_ITEMS:,} items, v2 REST+gRPC", "413, RESOURCE_EXHAUSTED", oversized_v2_requests
    ),
    Case("archive outside the store", "400, INVALID_ARGUMENT", register("{outside}")),
    Case("model_name ../../x", "400, INVALID_ARGUMENT", register("digits.mar", "../../x")),
    Case("model_name with a newline", "400, INVALID_ARGUMENT", register("digits.mar", "a\nb")),
    Case("many-small-members bomb", "400, INVALID_ARGUMENT", register("bomb.mar")),
    Case("torchserve:// target", "400, INVALID_ARGUMENT", register(METADATA)),
    Case("cross-origin POST /models", "403 x2", cross_origin_register),
    Case("minilm to 0 workers and back", "200, ping 200, 200", scale_to_zero_and_back),
    Case("64 workers asked", "400 x2", sixty_four_workers),
]
