"""HTTPS, gRPC TLS, CORS and the /metrics name filter: real TorchServe 0.12 and torchgate, same
archive, same config.properties (PEM certificate_file/private_key_file made at test time,
https:// on the three REST addresses, enable_grpc_ssl, the three CORS keys).

Status codes, bodies where they are the same API, and the CORS headers must match.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import empty_pb2

from api.rpc.generated import inference_pb2_grpc as inference_grpc
from tests.support.archives import ECHO, build_archive
from tests.support.exposition import parse
from tests.support.server import running_torchgate
from tests.support.tls import write_certificate
from tests.support.torchserve import running_torchserve

pytestmark = [pytest.mark.integration, pytest.mark.torchserve]

ORIGIN = "https://app.example"
CORS = {
    "cors_allowed_origin": ORIGIN,
    "cors_allowed_methods": "GET, POST, OPTIONS",
    "cors_allowed_headers": "Content-Type, X-Custom",
}
SNAPSHOT = {
    "name": "startup.cfg",
    "modelCount": 1,
    "models": {
        "echo": {
            "1.0": {"defaultVersion": True, "marName": "echo.mar", "minWorkers": 1,
                    "maxWorkers": 1, "batchSize": 1, "maxBatchDelay": 100,
                    "responseTimeout": 120, "startupTimeout": 120, "runtimeType": "python"}
        }
    },
}  # fmt: skip
CORS_HEADERS = (
    "access-control-allow-origin",
    "access-control-allow-methods",
    "access-control-allow-headers",
)


@dataclass(frozen=True)
class Server:
    inference: str
    management: str
    metrics: str
    grpc_port: int


@dataclass(frozen=True)
class Servers:
    torchserve: Server
    torchgate: Server
    cert: Path

    def both(self, method: str, api: str, path: str, **kwargs: object) -> dict[str, httpx.Response]:
        answers = {}
        with httpx.Client(verify=str(self.cert), timeout=30) as client:
            for name in ("torchserve", "torchgate"):
                base = getattr(getattr(self, name), api)
                answers[name] = client.request(method, base + path, **kwargs)  # type: ignore[arg-type]
        return answers


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = write_certificate(folder)
    store = build_archive(folder, "echo", "echo.py", {"echo.py": ECHO}).parent
    settings = {
        "certificate_file": str(cert),
        "private_key_file": str(key),
        "enable_grpc_ssl": "true",
        # Both load the model from TorchServe's snapshot JSON (no load_models).
        "model_snapshot": json.dumps(SNAPSHOT),
        "default_workers_per_model": "1",
        "metrics_mode": "prometheus",  # TorchServe's default (log) leaves /metrics empty
        **CORS,
    }
    config = folder / "config.properties"
    config.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    with ExitStack() as stack, ThreadPoolExecutor(1) as pool:
        # torchgate starts while TorchServe's JVM does: the two start-ups overlap.
        text = config.read_text() + f"model_store={store}\ntorchgate.snapshot_file=\n"
        starting = pool.submit(stack.enter_context, running_torchgate(text, scheme="https"))
        ts = stack.enter_context(running_torchserve(store, config, scheme="https"))
        tg = starting.result()
        wait_ready(ts.management_url + "/models/echo", cert)
        yield Servers(
            Server(ts.inference_url, ts.management_url, ts.metrics_url, ts.grpc_inference_port),
            Server(tg.inference_url, tg.management_url, tg.metrics_url, tg.grpc_inference_port),
            cert,
        )


def wait_ready(url: str, cert: Path, timeout: float = 120.0) -> None:
    """Until the model's workers are READY (TorchServe's /ping turns healthy before)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = httpx.get(url, verify=str(cert), timeout=10)
        if answer.status_code == 200 and all(
            w["status"] == "READY" for w in answer.json()[0]["workers"] or [{"status": ""}]
        ):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not READY")


def test_model_snapshot_loads_the_same_models(servers: Servers) -> None:
    answers = servers.both("GET", "management", "/models")
    assert answers["torchgate"].json() == answers["torchserve"].json()
    assert answers["torchgate"].json()["models"][0]["modelName"] == "echo"
    answers = servers.both("GET", "management", "/models/echo")
    for name in ("torchgate", "torchserve"):
        (described,) = answers[name].json()
        assert described["modelVersion"] == "1.0" and described["minWorkers"] == 1


def test_https_answers_alike_on_the_three_ports(servers: Servers) -> None:
    for url in (servers.torchserve.inference, servers.torchgate.inference):
        assert url.startswith("https://")
    answers = servers.both("GET", "inference", "/ping")
    assert {a.status_code for a in answers.values()} == {200}
    assert answers["torchgate"].json() == answers["torchserve"].json() == {"status": "Healthy"}
    answers = servers.both("POST", "inference", "/predictions/echo", content=b"over tls")
    assert answers["torchgate"].status_code == answers["torchserve"].status_code == 200
    assert answers["torchgate"].content == answers["torchserve"].content == b"over tls"
    answers = servers.both("GET", "management", "/models")
    assert answers["torchgate"].status_code == answers["torchserve"].status_code == 200
    assert answers["torchgate"].json() == answers["torchserve"].json()
    answers = servers.both("GET", "metrics", "/metrics")
    assert answers["torchgate"].status_code == answers["torchserve"].status_code == 200


def test_plain_http_clients_are_not_served_on_an_https_port(servers: Servers) -> None:
    for server in (servers.torchserve, servers.torchgate):
        plain = server.inference.replace("https://", "http://")
        with pytest.raises(httpx.HTTPError):
            answer = httpx.get(plain + "/ping", timeout=5)
            # A server may answer the stray bytes with an error page; never with the API.
            if answer.status_code != 200:
                raise httpx.HTTPError("refused")


def test_an_unverified_certificate_is_refused_by_default_clients(servers: Servers) -> None:
    for server in (servers.torchserve, servers.torchgate):
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.inference + "/ping", timeout=5)  # the system CAs do not know it


@pytest.mark.parametrize(
    ("api", "path"),
    [("inference", "/ping"), ("management", "/models"), ("metrics", "/metrics")],
)
@pytest.mark.parametrize("origin", [ORIGIN, None])
def test_cors_headers_on_simple_requests(
    servers: Servers, api: str, path: str, origin: str | None
) -> None:
    headers = {"origin": origin} if origin else {}
    answers = servers.both("GET", api, path, headers=headers)
    assert answers["torchgate"].status_code == answers["torchserve"].status_code == 200
    for name in CORS_HEADERS:
        assert answers["torchgate"].headers.get(name) == answers["torchserve"].headers.get(name)
    assert answers["torchgate"].headers["access-control-allow-origin"] == ORIGIN
    assert answers["torchgate"].headers["access-control-allow-methods"] == "GET, POST, OPTIONS"


def test_cors_headers_on_errors_and_posts(servers: Servers) -> None:
    headers = {"origin": ORIGIN, "content-type": "text/plain"}
    for path in ("/predictions/echo", "/predictions/nope"):
        answers = servers.both("POST", "inference", path, content=b"x", headers=headers)
        assert answers["torchgate"].status_code == answers["torchserve"].status_code
        for name in CORS_HEADERS:
            assert answers["torchgate"].headers.get(name) == answers["torchserve"].headers[name]


def test_cors_preflight_on_the_api_description(servers: Servers) -> None:
    """TorchServe answers `OPTIONS /` with its API description; a preflight gets the headers."""
    headers = {
        "origin": ORIGIN,
        "access-control-request-method": "POST",
        "access-control-request-headers": "x-custom",
    }
    for api in ("inference", "management"):
        answers = servers.both("OPTIONS", api, "/", headers=headers)
        assert answers["torchgate"].status_code == answers["torchserve"].status_code == 200
        for name in CORS_HEADERS:
            assert answers["torchgate"].headers[name] == answers["torchserve"].headers[name]
        assert "openapi" in answers["torchgate"].json()
        assert "openapi" in answers["torchserve"].json()
        answers = servers.both("GET", api, "/api-description")
        assert answers["torchgate"].status_code == answers["torchserve"].status_code == 200


def test_cors_preflight_on_a_prediction_path(servers: Servers) -> None:
    """A browser's preflight before a JSON POST: TorchServe answers the model's API, 200."""
    headers = {
        "origin": ORIGIN,
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type",
    }
    for path, status in (
        ("/predictions/echo", 200),
        ("/predictions/echo/1.0", 200),
        ("/predictions/nope", 404),
    ):
        answers = servers.both("OPTIONS", "inference", path, headers=headers)
        assert answers["torchgate"].status_code == answers["torchserve"].status_code == status
        for name in CORS_HEADERS:
            assert answers["torchgate"].headers[name] == answers["torchserve"].headers[name]
        ours, theirs = answers["torchgate"].json(), answers["torchserve"].json()
        if status == 200:
            assert (
                ours["info"]
                == theirs["info"]
                == {
                    "title": "RESTful API for: echo",
                    "version": "1.0.0",
                }
            )
            assert sorted(ours["paths"]) == sorted(theirs["paths"])
        else:
            assert ours["code"] == theirs["code"] == 404


def sample_names(text: str) -> set[str]:
    return {
        re.split(r"[{ ]", line, maxsplit=1)[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_metrics_name_filter(servers: Servers) -> None:
    servers.both("POST", "inference", "/predictions/echo", content=b"count me")
    wanted = ["ts_inference_requests_total", "ts_queue_latency_microseconds"]
    answers = servers.both("GET", "metrics", "/metrics", params={"name[]": wanted})
    assert answers["torchgate"].status_code == answers["torchserve"].status_code == 200
    ours, theirs = answers["torchgate"].text, answers["torchserve"].text
    assert sample_names(ours) == sample_names(theirs) == set(wanted)
    assert "# TYPE ts_inference_requests_total counter" in ours
    # TorchServe labels a request by the version its URL named, "default" when none.
    servers.both("POST", "inference", "/predictions/echo/1.0", content=b"count me too")
    answers = servers.both("GET", "metrics", "/metrics", params={"name[]": wanted[0]})
    for text in (answers["torchgate"].text, answers["torchserve"].text):
        labels = set(re.findall(r'model_name="echo",model_version="([^"]*)"', text))
        assert labels == {"default", "1.0"}, text
    # Names no sample has: nothing at all, as TorchServe.
    answers = servers.both("GET", "metrics", "/metrics", params={"name[]": "no_such_metric"})
    assert answers["torchgate"].text.strip() == answers["torchserve"].text.strip() == ""


# TorchServe families torchgate does not export: its frontend's worker-thread time describes
# TorchServe's Java threads (docs/observability.md), and GPU families come only with a GPU
# (TorchServe lists them empty without one).
NOT_EXPORTED = {
    "WorkerThreadTime",
    "GPUMemoryUsed",
    "GPUMemoryUtilization",
    "GPUUtilization",
}


def test_torchserve_s_metric_families_are_listed_with_its_types_and_labels(
    servers: Servers,
) -> None:
    servers.both("POST", "inference", "/predictions/echo", content=b"count me")
    servers.both("GET", "inference", "/predictions/nope")  # a 404, for Requests4XX
    answers = servers.both("GET", "metrics", "/metrics")
    theirs, ours = (parse(answers[name].text) for name in ("torchserve", "torchgate"))
    (their_samples, their_types), (our_samples, our_types) = theirs, ours
    # Every family TorchServe has written a sample of by now (it also lists declared handler
    # metrics before any sample; torchgate lists a handler metric once written).
    assert {s.name for s in their_samples} - set(our_types) <= NOT_EXPORTED
    assert {"Requests2XX", "Requests4XX", "Requests5XX"} <= set(our_types)
    assert {n: our_types[n] for n in their_types if n in our_types} == {
        n: t for n, t in their_types.items() if n in our_types
    }
    # Samples both have by now carry the same labels (host metrics come after TorchServe's
    # first minute: their labels are checked in tests/observability/test_system.py).
    their_labels = {s.name: sorted(s.labels) for s in their_samples}
    our_labels = {s.name: sorted(s.labels) for s in our_samples}
    shared = their_labels.keys() & our_labels.keys()
    assert {
        "Requests2XX",
        "Requests4XX",
        "QueueTime",
        "WorkerLoadTime",
        "ts_inference_requests_total",
    } <= shared
    assert {n: our_labels[n] for n in shared} == {n: their_labels[n] for n in shared}


def test_grpc_tls_with_ssl_channel_credentials(servers: Servers) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=servers.cert.read_bytes())
    for server in (servers.torchserve, servers.torchgate):
        with grpc.secure_channel(f"127.0.0.1:{server.grpc_port}", credentials) as channel:
            stub = inference_grpc.InferenceAPIsServiceStub(channel)
            answer = stub.Ping(empty_pb2.Empty(), timeout=10)
            assert "Healthy" in answer.health
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = inference_grpc.InferenceAPIsServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Ping(empty_pb2.Empty(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
