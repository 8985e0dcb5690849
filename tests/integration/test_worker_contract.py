"""What a handler sees of its request and its process, against real TorchServe 0.12 and
torchgate side by side on the same archives and config.properties.

One handler reports everything it can observe — its row of `data` (each value's type and
content), `context.get_all_request_header`, `system_properties`, the manifest, its working
directory and `sys.path`, the TS_* environment, its signal handlers, the request id's shape —
for requests in every form TorchServe's inference API takes: raw bodies of each content type,
bodies that do not decode, forms, query strings, the paths `/predictions/{m}/{v}/{more}`,
`/invocations`, `/models/{m}/invoke` and `/{m}[/{v}]/predict`, and TorchServe's gRPC
`Predictions`. A second handler sets
`TS_DECODE_INPUT_REQUEST=false` when its module loads, as real handlers do to decode their
bodies themselves.

Two differences are expected and asserted as such: header names arrive in lower case (HTTP
servers hand torchgate no other spelling; lookups match in any case, `api.workers.items`), and
torchgate adds two system properties of its own (`max_image_pixels`, `max_items_per_request`).

A third handler answers values of every kind, to compare how each is encoded: the same bodies,
torch.save's bytes for a tensor, and the differences listed in docs/compatibility.md (a
Content-Type where the handler set none, compact JSON, numpy values answered, NaN as null).
"""

from __future__ import annotations

import io
import json
import uuid
from typing import Any

import grpc
import httpx
import pytest
import torch

from api.rpc.generated import inference_pb2 as inference
from api.rpc.generated import inference_pb2_grpc as inference_grpc
from tests.support.archives import PROBE_VALUE, build_archive
from tests.support.side_by_side import Endpoints, side_by_side

pytestmark = [pytest.mark.integration, pytest.mark.torchserve]

PROBE = (
    """
    import os
    import signal
    import sys
    import threading
"""
    + PROBE_VALUE
    + """
    def handle(data, context):
        if data is None:
            return None
        model_dir = context.system_properties["model_dir"]
        answers = []
        for idx, row in enumerate(data):
            headers = context.get_all_request_header(idx)
            answers.append({
                "row": {name: _value(value) for name, value in row.items()},
                "headers": dict(headers),
                "content_type_any_case": context.get_request_header(idx, "Content-Type"),
                "request_id": context.get_request_id(idx),
                "model_name": context.model_name,
                "properties": {
                    k: v for k, v in context.system_properties.items() if k != "model_dir"
                },
                "manifest": context.manifest,
                "cwd_is_model_dir": os.path.samefile(os.getcwd(), model_dir),
                "model_dir_first_on_path": sys.path[0] == model_dir,
                "files": sorted(os.listdir(model_dir)),
                "main_thread": threading.current_thread() is threading.main_thread(),
                "environment": {
                    k: os.environ.get(k)
                    for k in ("TS_DECODE_INPUT_REQUEST", "TS_IPEX_ENABLE", "TS_IPEX_GPU_ENABLE")
                },
                "has_temp": "TEMP" in os.environ,
                "sigint": getattr(signal.getsignal(signal.SIGINT), "__name__", None),
                "sigterm": str(signal.getsignal(signal.SIGTERM)),
            })
        return answers
"""
)

# As fairseq's and Dynabench's handlers do: bodies reach handle() undecoded.
RAW = """
    import os

    os.environ["TS_DECODE_INPUT_REQUEST"] = "false"

    def handle(data, context):
        if data is None:
            return None
        return [
            {name: [type(value).__name__, bytes(value).decode()] for name, value in row.items()}
            for row in data
        ]
"""

# Answers a value of the kind its body names, as TorchServe's worker encodes each.
RETURNS = """
    import numpy as np
    import torch

    VALUES = {
        "str": "héllo ✓",
        "empty str": "",
        "bytes": b"\\x00\\x01",
        "empty bytes": b"",
        "bytearray": bytearray(b"ab"),
        "dict": {"a": [1, 2.5, "x"], "b": None, "c": True},
        "list": [1, 2.5, "x"],
        "tuple": (1, 2),
        "int": 7,
        "float": 1.5,
        "none": None,
        "tensor": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        # TorchServe refuses these (503 "Unsupported model output data type."): see below.
        "numpy": np.arange(3),
        "nested tensor": {"t": torch.tensor([1.0])},
        "nan": float("nan"),
    }

    def handle(data, context):
        if data is None:
            return None
        answers = []
        for idx, row in enumerate(data):
            kind = row["body"]
            if kind == "content type":
                context.set_response_content_type(idx, "text/csv")
            elif kind == "status":
                context.set_response_status(418, "teapot", idx)
            elif kind == "header":
                context.set_response_header(idx, "X-Custom", "yes")
            answers.append(VALUES.get(kind, kind))
        return answers
"""
SAME_ANSWERS = [
    "str",
    "empty str",
    "bytes",
    "empty bytes",
    "bytearray",
    "dict",
    "list",
    "tuple",
    "int",
    "float",
    "none",
    "content type",
    "status",
    "header",
]

FORM_FILE = ("doc", ("d.json", b'{"k": 1}', "application/json"))


def typed(body: bytes, content_type: str) -> dict[str, Any]:
    return {"content": body, "headers": {"Content-Type": content_type}}


# (label, method, path, httpx keyword arguments)
REQUESTS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("json", "POST", "/predictions/probe", {"json": {"a": [1, 2]}}),
    (
        "json with charset",
        "POST",
        "/predictions/probe",
        typed(b'"s"', "application/json; charset=utf-8"),
    ),
    ("text", "POST", "/predictions/probe", typed(b"hello", "text/plain")),
    ("binary", "POST", "/predictions/probe", typed(b"\x00\x01", "application/octet-stream")),
    ("no content type", "PUT", "/predictions/probe", {"content": b"raw"}),
    # Chunked transfer: both hand on the whole body with a Content-Length instead.
    ("chunked", "POST", "/predictions/probe", {"content": [b"ch", b"unk"]}),
    ("empty", "POST", "/predictions/probe", {"content": b""}),
    ("malformed json", "POST", "/predictions/probe", typed(b"{bad", "application/json")),
    ("text that is not utf-8", "POST", "/predictions/probe", typed(b"\xff\xfe", "text/plain")),
    (
        "json suffix type",
        "POST",
        "/predictions/probe",
        typed(b'{"a":1}', "application/x-custom+json"),
    ),
    ("query on /predictions", "POST", "/predictions/probe?foo=bar", typed(b"q", "text/plain")),
    ("multipart", "POST", "/predictions/probe", {"data": {"f1": "v1"}, "files": [FORM_FILE]}),
    ("urlencoded", "POST", "/predictions/probe", {"data": {"k": "v", "k2": "v2"}}),
    (
        "urlencoded, not ascii",
        "POST",
        "/predictions/probe",
        typed(b"b=%C3%A9&c=a+b&d", "application/x-www-form-urlencoded"),
    ),
    (
        "urlencoded, raw utf-8 name",
        "POST",
        "/predictions/probe",
        typed("café=x&na%C3%AFve=y".encode(), "application/x-www-form-urlencoded"),
    ),
    (
        "path below the version",
        "POST",
        "/predictions/probe/1.0/v1/chat/completions",
        typed(b"t", "text/plain"),
    ),
    ("explanations", "POST", "/explanations/probe", {"content": b"e"}),
    ("invocations", "POST", "/invocations?model_name=probe&foo=bar", {"content": b"i"}),
    ("invocations form", "POST", "/invocations", {"data": {"model_name": "probe"}}),
    ("invocations without a model", "POST", "/invocations", {"content": b"i"}),
    ("invoke", "POST", "/models/probe/invoke?foo=bar", {"content": b"i"}),
    ("legacy predict", "POST", "/probe/predict?foo=bar", {"content": b"l"}),
    ("registered under another name", "POST", "/predictions/renamed", {"content": b"r"}),
    ("legacy versioned predict", "GET", "/probe/1.0/predict", {}),
    ("undecoded by the handler's wish", "POST", "/predictions/raw", {"json": {"a": 1}}),
    ("undecoded text", "POST", "/predictions/raw", typed(b"t", "text/plain")),
]


@pytest.fixture(scope="module")
def answers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    work = tmp_path_factory.mktemp("worker-contract")
    store = work / "store"
    store.mkdir()
    files = {"handler.py": PROBE, "setup_config.json": "{}"}
    build_archive(work, "probe", "handler.py", files, export_dir=store)
    build_archive(work, "raw", "handler.py", {"handler.py": RAW}, export_dir=store)
    build_archive(work, "returns", "handler.py", {"handler.py": RETURNS}, export_dir=store)
    config = {"default_workers_per_model": "1", "enable_model_api": "true"}
    with side_by_side(store, config) as servers:
        return {name: _ask(ends) for name, ends in servers.items()}


def _ask(ends: Endpoints) -> dict[str, Any]:
    url, grpc_port = ends.inference, ends.grpc_port
    seen: dict[str, Any] = {}
    # The probe's archive registered again under a name of the client's choosing: the handler
    # sees that name (context.model_name), whatever the manifest says.
    registered = httpx.post(
        f"{ends.management}/models",
        params={"url": "probe.mar", "model_name": "renamed", "initial_workers": "1"},
        timeout=120,
    )
    assert registered.status_code == 200, registered.text
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = inference_grpc.InferenceAPIsServiceStub(channel)
        request = inference.PredictionsRequest(
            model_name="probe", input={"data": b"[1, 2]", "flag": b"on"}
        )
        reply = stub.Predictions(request, metadata=(("x-tenant", "acme"),), timeout=60)
        seen["grpc"] = (0, json.loads(reply.prediction))
    with httpx.Client(base_url=url, timeout=60) as client:
        for label, method, path, kwargs in REQUESTS:
            response = client.request(method, path, **kwargs)
            body = response.json()
            seen[label] = (response.status_code, body[0] if isinstance(body, list) else body)
        kinds = [*SAME_ANSWERS, "tensor", "numpy", "nested tensor", "nan"]
        for kind in kinds:
            seen[f"returns {kind}"] = client.post(
                "/predictions/returns",
                content=kind.encode(),
                headers={"Content-Type": "text/plain"},
            )
    return seen


def _comparable(answer: Any) -> Any:
    """What must be equal: header names in lower case (see the module docstring), without the
    ones that differ by nature (the port in Host, a form's random boundary)."""
    if not isinstance(answer, dict) or "headers" not in answer:
        return answer
    headers = {name.lower(): value for name, value in answer["headers"].items()}
    headers.pop("host", None)
    seen = dict(answer)
    if str(headers.get("content-type", "")).startswith("multipart/"):
        headers["content-type"] = seen["content_type_any_case"] = "multipart/form-data"
        headers.pop("content-length")
    properties = dict(answer["properties"])
    for own in ("max_image_pixels", "max_items_per_request"):
        properties.pop(own, None)
    return {**seen, "headers": headers, "properties": properties, "request_id": None}


@pytest.mark.parametrize("kind", SAME_ANSWERS)
def test_a_handlers_answer_is_encoded_as_in_torchserve(
    answers: dict[str, dict[str, Any]], kind: str
) -> None:
    theirs, ours = answers["torchserve"][f"returns {kind}"], answers["torchgate"][f"returns {kind}"]
    assert ours.status_code == theirs.status_code
    assert ours.headers.get("x-custom") == theirs.headers.get("x-custom")
    if theirs.headers.get("content-type"):  # set by the handler
        assert ours.headers["content-type"] == theirs.headers["content-type"]
    # TorchServe pretty-prints JSON; torchgate writes it compact: the same value.
    if ours.headers["content-type"] == "application/json":
        assert ours.json() == theirs.json()
    else:
        assert ours.content == theirs.content


def test_content_types_where_the_handler_set_none(answers: dict[str, dict[str, Any]]) -> None:
    # Differs: TorchServe sends no Content-Type then; torchgate names what it sends.
    expected = {
        "str": "text/plain; charset=utf-8",
        "bytes": "application/octet-stream",
        "dict": "application/json",
        "none": "application/json",
    }
    for kind, content_type in expected.items():
        assert "content-type" not in answers["torchserve"][f"returns {kind}"].headers
        assert answers["torchgate"][f"returns {kind}"].headers["content-type"] == content_type


def test_a_tensor_is_answered_in_torch_save_s_format(answers: dict[str, dict[str, Any]]) -> None:
    for server in ("torchserve", "torchgate"):
        response = answers[server]["returns tensor"]
        tensor = torch.load(io.BytesIO(response.content), weights_only=True)
        assert torch.equal(tensor, torch.tensor([[1.0, 2.0], [3.0, 4.0]])), server


def test_what_torchserve_refuses_torchgate_answers(answers: dict[str, dict[str, Any]]) -> None:
    # TorchServe's worker json.dumps the rest and fails the whole batch with 503 "Unsupported
    # model output data type." for numpy values and tensors inside a dict; torchgate sends them
    # as JSON. NaN: TorchServe writes NaN (not JSON), torchgate null.
    for kind in ("numpy", "nested tensor"):
        refused = answers["torchserve"][f"returns {kind}"]
        assert refused.status_code == 503
        assert refused.json()["message"] == "Unsupported model output data type."
    assert answers["torchgate"]["returns numpy"].json() == [0, 1, 2]
    assert answers["torchgate"]["returns nested tensor"].json() == {"t": [1.0]}
    assert answers["torchserve"]["returns nan"].content == b"NaN"
    assert answers["torchgate"]["returns nan"].content == b"null"


def test_grpc_predictions_reach_the_handler_as_in_torchserve(
    answers: dict[str, dict[str, Any]],
) -> None:
    _, theirs = answers["torchserve"]["grpc"]
    _, ours = answers["torchgate"]["grpc"]
    # Differs: torchgate hands the call's metadata on as headers too (docs/compatibility.md).
    metadata = {"x-tenant": "acme", "user-agent": ours["headers"].get("user-agent")}
    assert {k: v for k, v in ours["headers"].items() if k not in metadata} == theirs["headers"]
    assert ours["headers"]["x-tenant"] == "acme"
    assert _comparable({**ours, "headers": {}}) == _comparable({**theirs, "headers": {}})
    assert ours["row"] == {"data": ["bytearray", "[1, 2]"], "flag": ["bytearray", "on"]}


@pytest.mark.parametrize("label", [label for label, *_ in REQUESTS])
def test_a_handler_sees_what_it_sees_in_torchserve(
    answers: dict[str, dict[str, Any]], label: str
) -> None:
    ts_status, ts_answer = answers["torchserve"][label]
    tg_status, tg_answer = answers["torchgate"][label]
    assert tg_status == ts_status, (ts_answer, tg_answer)
    ts_seen, tg_seen = _comparable(ts_answer), _comparable(tg_answer)
    if isinstance(ts_seen, dict) and isinstance(tg_seen, dict):
        differing = {
            key: {"torchserve": ts_seen.get(key), "torchgate": tg_seen.get(key)}
            for key in ts_seen.keys() | tg_seen.keys()
            if ts_seen.get(key) != tg_seen.get(key)
        }
        assert not differing, json.dumps(differing, indent=1, default=str)
    assert tg_seen == ts_seen


def test_header_lookups_match_the_clients_spelling(answers: dict[str, dict[str, Any]]) -> None:
    # TorchServe keeps the spelling the client sent, torchgate finds any spelling.
    for server in ("torchserve", "torchgate"):
        _, answer = answers[server]["text"]
        assert answer["content_type_any_case"] == "text/plain", server
    _, answer = answers["torchgate"]["text"]
    assert "content-type" in answer["headers"] and "Content-Type" not in answer["headers"]


def test_request_ids_are_uuids_on_both(answers: dict[str, dict[str, Any]]) -> None:
    for server in ("torchserve", "torchgate"):
        _, answer = answers[server]["json"]
        assert str(uuid.UUID(answer["request_id"])) == answer["request_id"], server


def test_torchgates_own_properties(answers: dict[str, dict[str, Any]]) -> None:
    _, answer = answers["torchgate"]["json"]
    assert set(answer["properties"]) - set(answers["torchserve"]["json"][1]["properties"]) == {
        "max_image_pixels",
        "max_items_per_request",
    }


def test_the_probe_ran_where_torchserve_runs_it(answers: dict[str, dict[str, Any]]) -> None:
    _, answer = answers["torchgate"]["json"]
    assert answer["cwd_is_model_dir"] and answer["model_dir_first_on_path"]
    assert answer["main_thread"] and "setup_config.json" in answer["files"]
