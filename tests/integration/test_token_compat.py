"""Token authorization on, side by side: real TorchServe 0.12 and torchgate, the same archive and
config.properties with `disable_token_authorization=false`, each with the keys it wrote.

Two differences are torchgate's on purpose (docs/compatibility.md, "Token authorization"):
- a missing or wrong key answers **401** where TorchServe answers 400, with the same error
  type and message: 401 is HTTP's status for missing credentials, and what KServe and Triton
  clients report as an authentication failure;
- `/ping` needs no key. TorchServe 0.12 answers it 400 without the inference key, and its keys
  expire (60 minutes by default), so a Kubernetes probe or a load balancer's health check,
  which cannot send a changing key, could never see it healthy.
On gRPC the same two, by gRPC's codes: UNAUTHENTICATED where TorchServe answers
PERMISSION_DENIED (gRPC's code for a caller known but not allowed), and `Ping` open.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import empty_pb2

from api.rpc.generated import inference_pb2 as inference
from api.rpc.generated import inference_pb2_grpc as inference_grpc
from api.rpc.generated import management_pb2 as management
from api.rpc.generated import management_pb2_grpc as management_grpc
from tests.support.server import running_torchgate
from tests.support.torchserve import running_torchserve

pytestmark = [pytest.mark.integration, pytest.mark.torchserve]

ROOT = Path(__file__).resolve().parents[2]
CONFIG = (
    f"model_store={ROOT / 'model_store'}\nload_models=digits.mar\n"
    "disable_token_authorization=false\n"
)
DIGIT = [0.0] * 64
MESSAGE = "Token Authorization failed. Token either incorrect, expired, or not provided correctly"


@dataclass(frozen=True)
class Server:
    inference: str
    management: str
    keys: dict[str, str]
    metrics: str
    key_file: Path
    grpc_inference: int
    grpc_management: int


KINDS = ("inference", "management", "API")


@contextmanager
def token_servers(
    workdir: Path, extra: dict[str, str] | None = None
) -> Iterator[dict[str, Server]]:
    """Both servers on CONFIG plus `extra`, each with the keys it wrote at start."""
    text = CONFIG + "".join(f"{key}={value}\n" for key, value in (extra or {}).items())
    config = workdir / "config.properties"
    config.write_text(text)
    with (
        running_torchserve(
            ROOT / "model_store",
            config,
            extra_config={"disable_token_authorization": "false", **(extra or {})},
        ) as ts,
        running_torchgate(text) as tg,
    ):
        tg_file = tg.workdir / "key_file.json"
        tg_keys = json.loads(tg_file.read_text())
        yield {
            "torchserve": Server(
                ts.inference_url,
                ts.management_url,
                {kind: str(ts.key(kind)) for kind in KINDS},
                ts.metrics_url,
                ts.workdir / "key_file.json",
                ts.grpc_inference_port,
                ts.grpc_management_port,
            ),
            "torchgate": Server(
                tg.inference_url,
                tg.management_url,
                {kind: tg_keys[kind]["key"] for kind in KINDS},
                tg.metrics_url,
                tg_file,
                tg.grpc_inference_port,
                tg.grpc_management_port,
            ),
        }


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    with token_servers(tmp_path_factory.mktemp("token")) as both_servers:
        yield both_servers


def both(
    servers: dict[str, Server], method: str, path: str, key: str | None = None, **kwargs: object
) -> dict[str, httpx.Response]:
    """The same request to each server; `key` names the key to send ("inference", ...)."""
    answers = {}
    for name, server in servers.items():
        base = server.management if path.startswith("/models") else server.inference
        headers = {"Authorization": f"Bearer {server.keys[key]}"} if key else {}
        answers[name] = httpx.request(method, base + path, headers=headers, timeout=60, **kwargs)  # type: ignore[arg-type]
    return answers


def test_the_right_key_is_served_alike(servers: dict[str, Server]) -> None:
    predicted = both(servers, "POST", "/predictions/digits", "inference", json=DIGIT)
    assert [r.status_code for r in predicted.values()] == [200, 200]
    assert list(predicted["torchgate"].json()) == list(predicted["torchserve"].json())
    described = both(servers, "GET", "/models/digits", "management")
    assert [r.status_code for r in described.values()] == [200, 200]
    pinged = both(servers, "GET", "/ping", "inference")
    assert [r.json() for r in pinged.values()] == [{"status": "Healthy"}] * 2


@pytest.mark.parametrize(
    ("method", "path", "key"),
    [
        ("POST", "/predictions/digits", None),
        ("POST", "/predictions/digits", "management"),  # the other API's key
        ("GET", "/models/digits", None),
        ("GET", "/models/digits", "inference"),
    ],
)
def test_a_missing_or_wrong_key_is_refused_with_the_same_error(
    servers: dict[str, Server], method: str, path: str, key: str | None
) -> None:
    answers = both(servers, method, path, key, json=DIGIT if method == "POST" else None)
    # TorchServe 400, torchgate 401 (see the module docstring); the body is the same.
    assert answers["torchserve"].status_code == 400
    assert answers["torchgate"].status_code == 401
    for answer in answers.values():
        assert answer.json()["type"] == "InvalidKeyException"
        assert answer.json()["message"] == MESSAGE


def test_ping_needs_no_key_on_torchgate(servers: dict[str, Server]) -> None:
    for method in ("GET", "HEAD"):
        answers = both(servers, method, "/ping")
        # TorchServe 0.12 wants the inference key here; torchgate's probes need none.
        assert answers["torchserve"].status_code == 400
        assert answers["torchgate"].status_code == 200


def grpc_call(server: Server, call: str, key: str | None) -> tuple[grpc.StatusCode, str]:
    """One gRPC call (`Ping`, `Predictions` or `DescribeModel` of digits) with `key`'s key as
    TorchServe's clients send it: `authorization: Bearer KEY` metadata."""
    metadata = [("authorization", f"Bearer {server.keys[key]}")] if key else []
    port = server.grpc_management if call == "DescribeModel" else server.grpc_inference
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            if call == "DescribeModel":
                management_grpc.ManagementAPIsServiceStub(channel).DescribeModel(
                    management.DescribeModelRequest(model_name="digits"),
                    metadata=metadata,
                    timeout=30,
                )
            elif call == "Ping":
                inference_grpc.InferenceAPIsServiceStub(channel).Ping(
                    empty_pb2.Empty(), metadata=metadata, timeout=30
                )
            else:
                inference_grpc.InferenceAPIsServiceStub(channel).Predictions(
                    inference.PredictionsRequest(
                        model_name="digits", input={"data": json.dumps(DIGIT).encode()}
                    ),
                    metadata=metadata,
                    timeout=30,
                )
        except grpc.RpcError as error:
            return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize(
    ("call", "key"),
    [
        ("Predictions", None),
        ("Predictions", "management"),  # the other API's key
        ("DescribeModel", None),
        ("DescribeModel", "inference"),
    ],
)
def test_grpc_refuses_a_missing_or_wrong_key_with_the_same_message(
    servers: dict[str, Server], call: str, key: str | None
) -> None:
    answers = {name: grpc_call(server, call, key) for name, server in servers.items()}
    # TorchServe PERMISSION_DENIED, torchgate UNAUTHENTICATED (the module docstring says why).
    assert answers["torchserve"] == (grpc.StatusCode.PERMISSION_DENIED, MESSAGE)
    assert answers["torchgate"] == (grpc.StatusCode.UNAUTHENTICATED, MESSAGE)


def test_grpc_serves_the_right_key_alike_and_ping_needs_none_on_torchgate(
    servers: dict[str, Server],
) -> None:
    for server in servers.values():
        assert grpc_call(server, "Predictions", "inference")[0] == grpc.StatusCode.OK
        assert grpc_call(server, "DescribeModel", "management")[0] == grpc.StatusCode.OK
        assert grpc_call(server, "Ping", "inference")[0] == grpc.StatusCode.OK
    # TorchServe's interceptor guards every call of the port; torchgate's probes need no key.
    assert grpc_call(servers["torchserve"], "Ping", None)[0] == grpc.StatusCode.PERMISSION_DENIED
    assert grpc_call(servers["torchgate"], "Ping", None)[0] == grpc.StatusCode.OK


@pytest.fixture(scope="module")
def short_lived(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """Keys that live 3 s, and no metrics API: both keys TorchServe reads at start."""
    extra = {"token_expiration_min": "0.05", "enable_metrics_api": "false"}
    with token_servers(tmp_path_factory.mktemp("short"), extra) as both_servers:
        yield both_servers


def test_keys_expire_after_token_expiration_min_alike(short_lived: dict[str, Server]) -> None:
    # The start-up keys may have expired during start-up: new ones live from now on.
    for server in short_lived.values():
        answer = httpx.post(
            server.management + "/token",
            params={"type": "inference"},
            headers={"Authorization": f"Bearer {server.keys['API']}"},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        # Both write it to key_file.json (TorchServe 0.12's answer has an empty body).
        server.keys["inference"] = json.loads(server.key_file.read_text())["inference"]["key"]
    fresh = both(short_lived, "POST", "/predictions/digits", "inference", json=DIGIT)
    assert [r.status_code for r in fresh.values()] == [200, 200]
    time.sleep(3.5)
    expired = both(short_lived, "POST", "/predictions/digits", "inference", json=DIGIT)
    assert expired["torchserve"].status_code == 400
    assert expired["torchgate"].status_code == 401
    for answer in expired.values():
        assert answer.json()["message"] == MESSAGE


def test_enable_metrics_api_false_leaves_the_metrics_address_unbound(
    short_lived: dict[str, Server],
) -> None:
    for server in short_lived.values():
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.metrics + "/metrics", timeout=5)


@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_the_token_api_regenerates_whatever_the_method(
    short_lived: dict[str, Server], method: str
) -> None:
    """TorchServe's own docs regenerate a key with a plain `curl` GET; it answers any method."""
    for name, server in short_lived.items():
        before = json.loads(server.key_file.read_text())["management"]["key"]
        answer = httpx.request(
            method,
            server.management + "/token",
            params={"type": "management"},
            headers={"Authorization": f"Bearer {server.keys['API']}"},
            timeout=60,
        )
        assert answer.status_code == 200, (name, answer.text)
        after = json.loads(server.key_file.read_text())["management"]["key"]
        assert after != before, name
        server.keys["management"] = after
    described = both(short_lived, "GET", "/models/digits", "management")
    assert [r.status_code for r in described.values()] == [200, 200]
