"""TorchServe's access_log.log, side by side: the same REST requests and gRPC calls to
TorchServe 0.12 and to torchgate (started from the command line, as TorchServe is, on the same
archives and config.properties) leave the same lines in `$LOG_LOCATION/access_log.log`, and the
same messages as `ACCESS_LOG` records in ts_log.log; the client's port and the milliseconds
aside.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import empty_pb2
from sklearn.datasets import load_digits

from api.rpc.generated import inference_pb2 as inference
from api.rpc.generated import inference_pb2_grpc as inference_grpc
from api.rpc.generated import management_pb2 as management
from api.rpc.generated import management_pb2_grpc as management_grpc
from tests.support.processes import wait_until
from tests.support.server import running_torchgate
from tests.support.torchserve import running_torchserve

pytestmark = [pytest.mark.integration, pytest.mark.torchserve]

ROOT = Path(__file__).resolve().parents[2]
DIGIT = load_digits().data[5].tolist()

TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d,\d{3}"
# `<time> - /127.0.0.1:<port> "<request line>" <status> <ms>`
ACCESS_LINE = re.compile(rf'^{TIME} - /127\.0\.0\.1:\d+ "(?P<request>[^"]*)" (?P<status>\d+) \d+$')
TS_LOG_LINE = re.compile(
    rf'^{TIME} \[INFO \] \S+ ACCESS_LOG - /127\.0\.0\.1:\d+ "(?P<request>[^"]*)" '
    r"(?P<status>\d+) \d+$"
)

# (port, method, path and query, keyword arguments for httpx)
REST = [
    ("inference", "GET", "/ping", {}),
    ("inference", "POST", "/predictions/digits", {"json": DIGIT}),
    ("inference", "POST", "/predictions/digits/2.0?x=1", {"json": DIGIT}),
    ("inference", "POST", "/predictions/nope", {"content": b"x"}),
    ("inference", "GET", "/api-description", {}),
    ("inference", "OPTIONS", "/", {}),
    ("management", "GET", "/models?limit=1", {}),
    ("management", "GET", "/models/nope", {}),
    ("management", "PUT", "/models/digits?min_worker=1&synchronous=true", {}),
    ("metrics", "GET", "/metrics?name[]=Requests2XX", {}),
]


@dataclass(frozen=True)
class Server:
    urls: dict[str, str]  # "inference", "management", "metrics"
    grpc_inference_port: int
    grpc_management_port: int
    log_dir: Path

    def lines(self, name: str) -> list[str]:
        path = self.log_dir / name
        return path.read_text(errors="replace").splitlines() if path.exists() else []


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    config = ROOT / "config.properties"
    workdir = tmp_path_factory.mktemp("torchgate")
    logs = workdir / "logs"
    with (
        running_torchserve(ROOT / "model_store", config) as ts,
        running_torchgate(config, workdir=workdir, env={"LOG_LOCATION": str(logs)}) as tg,
    ):
        yield {
            "torchserve": Server(
                {
                    "inference": ts.inference_url,
                    "management": ts.management_url,
                    "metrics": ts.metrics_url,
                },
                ts.grpc_inference_port,
                ts.grpc_management_port,
                ts.log_dir,
            ),
            "torchgate": Server(
                {
                    "inference": tg.inference_url,
                    "management": tg.management_url,
                    "metrics": tg.metrics_url,
                },
                tg.grpc_inference_port,
                tg.grpc_management_port,
                logs,
            ),
        }


def new_lines(
    server: Server, send: Callable[[Server], list[Any]], count: int
) -> tuple[list[Any], list[tuple[str, str]], list[tuple[str, str]]]:
    """Run `send` against `server`; its results, and the (request line, status) of the
    `count` access lines it left in access_log.log and in ts_log.log."""
    access_before = len(server.lines("access_log.log"))
    ts_before = len([line for line in server.lines("ts_log.log") if TS_LOG_LINE.match(line)])
    results = send(server)

    def parsed(name: str, pattern: re.Pattern[str], before: int) -> list[tuple[str, str]]:
        matches = [pattern.match(line) for line in server.lines(name)]
        return [(m["request"], m["status"]) for m in matches if m is not None][before:]

    wait_until(lambda: len(parsed("access_log.log", ACCESS_LINE, access_before)) >= count)
    wait_until(lambda: len(parsed("ts_log.log", TS_LOG_LINE, ts_before)) >= count)
    return (
        results,
        parsed("access_log.log", ACCESS_LINE, access_before),
        parsed("ts_log.log", TS_LOG_LINE, ts_before),
    )


def test_rest_answers_leave_the_same_access_lines(servers: dict[str, Server]) -> None:
    def send(server: Server) -> list[Any]:
        return [
            httpx.request(method, server.urls[port] + path, timeout=60, **kwargs).status_code
            for port, method, path, kwargs in REST
        ]

    seen = {name: new_lines(server, send, len(REST)) for name, server in servers.items()}
    statuses, access, ts_log = seen["torchgate"]
    assert statuses == seen["torchserve"][0]
    assert access == seen["torchserve"][1]
    assert ts_log == seen["torchserve"][2] == access
    assert access[:3] == [
        ("GET /ping HTTP/1.1", "200"),
        ("POST /predictions/digits HTTP/1.1", "200"),
        ("POST /predictions/digits/2.0?x=1 HTTP/1.1", "200"),
    ]
    assert ("GET /models/nope HTTP/1.1", "404") in access


def test_grpc_calls_leave_the_same_access_lines(servers: dict[str, Server]) -> None:
    digit = inference.PredictionsRequest(model_name="digits", input={"data": str(DIGIT).encode()})

    def send(server: Server) -> list[Any]:
        codes = []
        with (
            grpc.insecure_channel(f"127.0.0.1:{server.grpc_inference_port}") as inference_channel,
            grpc.insecure_channel(f"127.0.0.1:{server.grpc_management_port}") as management_channel,
        ):
            infer = inference_grpc.InferenceAPIsServiceStub(inference_channel)
            manage = management_grpc.ManagementAPIsServiceStub(management_channel)
            calls: list[tuple[Callable[..., Any], Any]] = [
                (infer.Ping, empty_pb2.Empty()),
                (infer.Predictions, digit),
                (manage.ListModels, management.ListModelsRequest()),
                (manage.DescribeModel, management.DescribeModelRequest(model_name="nope")),
            ]
            for call, request in calls:
                try:
                    call(request, timeout=60)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
        return codes

    seen = {name: new_lines(server, send, 4) for name, server in servers.items()}
    codes, access, ts_log = seen["torchgate"]
    assert codes == seen["torchserve"][0]
    assert access == seen["torchserve"][1]
    assert ts_log == seen["torchserve"][2] == access
    service = "gRPC org.pytorch.serve.grpc"
    assert access == [
        (f"{service}.inference.InferenceAPIsService/Ping HTTP/2.0", "0"),
        (f"{service}.inference.InferenceAPIsService/Predictions HTTP/2.0", "0"),
        (f"{service}.management.ManagementAPIsService/ListModels HTTP/2.0", "0"),
        (f"{service}.management.ManagementAPIsService/DescribeModel HTTP/2.0", "5"),  # NOT_FOUND
    ]
