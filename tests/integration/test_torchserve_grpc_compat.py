"""TorchServe's gRPC APIs: the same calls against real TorchServe 0.12 and real `torchgate serve`.

Both run the repo's config.properties (test copies on free ports, token authorization off,
`enable_model_api` at its default: off) and the example archives in model_store/. The client is
the stubs generated from TorchServe's protos. Each case asserts the status code of each server;
where they differ, TorchServe 0.12 is wrong (or unhelpful) and the case says why torchgate
answers otherwise. What TorchServe answers is asserted too, so this file documents it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2

from api.rpc.generated import inference_pb2 as inference
from api.rpc.generated import inference_pb2_grpc as inference_grpc
from api.rpc.generated import management_pb2 as management
from api.rpc.generated import management_pb2_grpc as management_grpc
from export.build import REPO_ROOT
from tests.support.server import running_torchgate
from tests.support.torchserve import running_torchserve

pytestmark = [
    pytest.mark.integration,
    pytest.mark.torchserve,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java"),
]

Code = grpc.StatusCode
CONFIG = REPO_ROOT / "config.properties"
ARCHIVES = ("digits.mar", "digits_v2.mar", "minilm.mar")  # what CONFIG loads
DIGIT = json.dumps([float(i % 17) for i in range(64)]).encode()  # 64 pixels, 0..16
CALL_TIMEOUT_S = 30.0
# DescribeModel fields both servers fill the same way (workers and queues are live state).
SHARED_FIELDS = [
    "modelName",
    "modelVersion",
    "modelUrl",
    "runtime",
    "minWorkers",
    "maxWorkers",
    "batchSize",
    "maxBatchDelay",
    "responseTimeout",
    "loadedAtStartup",
]


@dataclass(frozen=True)
class Stubs:
    inference: inference_grpc.InferenceAPIsServiceStub
    management: management_grpc.ManagementAPIsServiceStub


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    response: Any = None  # the answer (a list of them for a stream) when OK
    details: str = ""


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Stubs]]:
    """{"torchserve": ..., "torchgate": ...}, both loaded with digits 1.0/2.0 and minilm."""
    store = REPO_ROOT / "model_store"
    missing = [name for name in ARCHIVES if not (store / name).is_file()]
    if missing:
        pytest.skip(f"{missing} not built: run `HF_HUB_OFFLINE=1 torchgate export --all`")
    with ExitStack() as stack:
        ts = stack.enter_context(running_torchserve(store, CONFIG))
        tg = stack.enter_context(running_torchgate(CONFIG))
        ports = {
            "torchserve": (ts.grpc_inference_port, ts.grpc_management_port),
            "torchgate": (tg.grpc_inference_port, tg.grpc_management_port),
        }
        stubs = {}
        for name, (inference_port, management_port) in ports.items():
            inference_channel = stack.enter_context(
                grpc.insecure_channel(f"127.0.0.1:{inference_port}")
            )
            management_channel = stack.enter_context(
                grpc.insecure_channel(f"127.0.0.1:{management_port}")
            )
            stubs[name] = Stubs(
                inference_grpc.InferenceAPIsServiceStub(inference_channel),
                management_grpc.ManagementAPIsServiceStub(management_channel),
            )
        yield stubs


def outcome(call: Callable[..., Any], request: Any) -> Outcome:
    try:
        response = call(request, timeout=CALL_TIMEOUT_S)
        if not hasattr(response, "ListFields"):  # a stream: read it to the end
            response = list(response)
    except grpc.RpcError as exc:
        return Outcome(exc.code(), details=exc.details() or "")
    return Outcome(Code.OK, response)


def both(
    servers: dict[str, Stubs], call: Callable[[Stubs], Any], request: Any
) -> dict[str, Outcome]:
    return {name: outcome(call(stubs), request) for name, stubs in servers.items()}


def predict(model: str, version: str = "", data: bytes = DIGIT) -> inference.PredictionsRequest:
    return inference.PredictionsRequest(
        model_name=model, model_version=version, input={"data": data}
    )


# -- the same answer ----------------------------------------------------------------------------


def test_ping(servers: dict[str, Stubs]) -> None:
    got = both(servers, lambda s: s.inference.Ping, empty_pb2.Empty())
    assert got["torchserve"].code == got["torchgate"].code == Code.OK
    # Byte for byte: pretty-printed JSON, as TorchServe's Gson writes it.
    assert got["torchgate"].response.health == got["torchserve"].response.health
    assert json.loads(got["torchgate"].response.health) == {"status": "Healthy"}


def test_predictions_on_digits(servers: dict[str, Stubs]) -> None:
    for version in ("", "2.0"):
        got = both(servers, lambda s: s.inference.Predictions, predict("digits", version))
        assert got["torchserve"].code == got["torchgate"].code == Code.OK
        ts, tg = (json.loads(got[n].response.prediction) for n in ("torchserve", "torchgate"))
        # The same archive on both: the same top-5 labels with the same probabilities.
        assert list(tg) == list(ts)
        assert tg == pytest.approx(ts, abs=1e-5)


@pytest.mark.parametrize(
    ("call", "request_", "code"),
    [
        pytest.param(
            lambda s: s.management.DescribeModel,
            management.DescribeModelRequest(model_name="nope"),
            Code.NOT_FOUND,
            id="describe unknown model",
        ),
        pytest.param(
            lambda s: s.management.DescribeModel,
            management.DescribeModelRequest(model_name="digits", model_version="9.9"),
            Code.NOT_FOUND,
            id="describe unknown version",
        ),
        pytest.param(
            lambda s: s.management.ScaleWorker,
            management.ScaleWorkerRequest(
                model_name="digits", min_worker=1, max_worker=1, synchronous=True
            ),
            Code.OK,
            id="scale",
        ),
        pytest.param(
            lambda s: s.management.ScaleWorker,
            management.ScaleWorkerRequest(model_name="nope"),
            Code.NOT_FOUND,
            id="scale unknown model",
        ),
        pytest.param(
            lambda s: s.management.SetDefault,
            management.SetDefaultRequest(model_name="digits", model_version="1.0"),
            Code.OK,
            id="set default to the default",
        ),
        # TorchServe 0.12 answers NOT_FOUND here (older sources say INTERNAL); so does torchgate.
        pytest.param(
            lambda s: s.management.SetDefault,
            management.SetDefaultRequest(model_name="digits", model_version="9.9"),
            Code.NOT_FOUND,
            id="set default unknown version",
        ),
        pytest.param(
            lambda s: s.management.SetDefault,
            management.SetDefaultRequest(model_name="nope", model_version="1.0"),
            Code.NOT_FOUND,
            id="set default unknown model",
        ),
        # enable_model_api is off: TorchServe's gRPC API answers PERMISSION_DENIED (its REST
        # API 405), whether or not the model exists.
        pytest.param(
            lambda s: s.management.RegisterModel,
            management.RegisterModelRequest(url="digits.mar", model_name="digits_copy"),
            Code.PERMISSION_DENIED,
            id="register, model API disabled",
        ),
        pytest.param(
            lambda s: s.management.UnregisterModel,
            management.UnregisterModelRequest(model_name="digits", model_version="2.0"),
            Code.PERMISSION_DENIED,
            id="unregister, model API disabled",
        ),
        pytest.param(
            lambda s: s.management.UnregisterModel,
            management.UnregisterModelRequest(model_name="nope"),
            Code.PERMISSION_DENIED,
            id="unregister unknown, model API disabled",
        ),
    ],
)
def test_same_status_code(
    servers: dict[str, Stubs], call: Callable[[Stubs], Any], request_: Any, code: grpc.StatusCode
) -> None:
    got = both(servers, call, request_)
    assert {n: o.code for n, o in got.items()} == {"torchserve": code, "torchgate": code}, got


def test_describe_model(servers: dict[str, Stubs]) -> None:
    for version in ("", "2.0"):
        request = management.DescribeModelRequest(model_name="digits", model_version=version)
        got = both(servers, lambda s: s.management.DescribeModel, request)
        assert got["torchserve"].code == got["torchgate"].code == Code.OK
        ts, tg = (json.loads(got[n].response.msg) for n in ("torchserve", "torchgate"))
        assert len(ts) == len(tg) == 1
        assert {k: tg[0][k] for k in SHARED_FIELDS} == {k: ts[0][k] for k in SHARED_FIELDS}


def test_list_models(servers: dict[str, Stubs]) -> None:
    got = both(servers, lambda s: s.management.ListModels, management.ListModelsRequest(limit=10))
    assert got["torchserve"].code == got["torchgate"].code == Code.OK
    ts, tg = (json.loads(got[n].response.msg) for n in ("torchserve", "torchgate"))
    assert (
        tg["models"]
        == ts["models"]
        == [
            {"modelName": "digits", "modelUrl": "digits.mar"},
            {"modelName": "minilm", "modelUrl": "minilm.mar"},
        ]
    )
    # Without `limit` (proto3: 0) TorchServe answers an empty page whose nextPageToken is "0",
    # so a client that follows the token never gets a model; torchgate reads the unset limit as
    # the documented default of 100.
    got = both(servers, lambda s: s.management.ListModels, management.ListModelsRequest())
    assert json.loads(got["torchserve"].response.msg) == {"nextPageToken": "0", "models": []}
    assert json.loads(got["torchgate"].response.msg) == {"models": tg["models"]}


# -- where torchgate answers better -------------------------------------------------------------


def test_predictions_on_unknown_model_or_version(servers: dict[str, Stubs]) -> None:
    # TorchServe answers INTERNAL for a client's mistake (and for an empty model_name);
    # torchgate answers what its REST API (and TorchServe's) answers with 404: NOT_FOUND, and
    # INVALID_ARGUMENT for a missing required field.
    for request, code in (
        (predict("nope"), Code.NOT_FOUND),
        (predict("digits", "9.9"), Code.NOT_FOUND),
        (predict(""), Code.INVALID_ARGUMENT),
    ):
        got = both(servers, lambda s: s.inference.Predictions, request)
        assert got["torchserve"].code == Code.INTERNAL
        assert got["torchgate"].code == code


def test_predictions_with_a_malformed_item(servers: dict[str, Stubs]) -> None:
    # The handler fails the item with status 400. TorchServe's gRPC API drops the status and
    # answers OK, with the error document as the "prediction"; torchgate fails the call with
    # the code the status maps to, as its REST API (and TorchServe's) answers 400.
    got = both(servers, lambda s: s.inference.Predictions, predict("digits", data=b"[1, 2, 3]"))
    assert got["torchserve"].code == Code.OK
    error = json.loads(got["torchserve"].response.prediction)
    assert error["code"] == 400
    assert got["torchgate"].code == Code.INVALID_ARGUMENT
    assert got["torchgate"].details == error["message"]


def test_stream_predictions_on_a_handler_that_does_not_stream(servers: dict[str, Stubs]) -> None:
    # Last, because it breaks TorchServe: its frontend expects the streaming header from the
    # handler, fails the call with INTERNAL "Worker died." and restarts the worker. torchgate
    # answers one message, the same as Predictions.
    got = both(servers, lambda s: s.inference.StreamPredictions, predict("digits"))
    assert got["torchserve"].code == Code.INTERNAL
    assert got["torchgate"].code == Code.OK
    (only,) = got["torchgate"].response
    assert len(json.loads(only.prediction)) == 5
