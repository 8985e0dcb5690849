"""The bridge rule: how v2 tensors reach a `.mar` handler and how its answer becomes tensors.

Rule 1 and 3 and the signature check are tested on the functions themselves; rule 2 (a
signature-less archive gets what `/predictions` would give it) end to end through real worker
processes, registry and dataplane, with tiny archives written here.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from api.backends.workers import load_worker_backend
from api.core.dataplane import DataPlane
from api.core.registry import Registry
from api.core.types import Backend, ModelSettings, Prediction
from api.errors import (
    BadRequest,
    InferenceFailed,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    TorchgateError,
)
from api.v2 import bridge
from api.v2.codec import CodecError, RequestedOutput, Tensor, V2Request, V2Response
from api.workers.pool import WorkerPool
from tests.support.aio import run

T = TypeVar("T")
MAX_ITEMS = 1024

DIGITS_SIGNATURE: dict[str, Any] = {
    "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
    "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
}


def tensor(name: str, data: Any, datatype: str | None = None) -> Tensor:
    array = np.asarray(data, dtype=object) if datatype == "BYTES" else np.asarray(data)
    made = Tensor.from_numpy(name, array)
    return made if datatype is None else Tensor(name, datatype, made.shape, made.data)


def v2_request(*inputs: Tensor, outputs: tuple[str, ...] = ()) -> V2Request:
    return V2Request(
        id="req-1",
        parameters={"p": 1},
        inputs=list(inputs),
        outputs=[RequestedOutput(name) for name in outputs],
    )


def respond(body: Any, signature: dict[str, Any] | None = None, status: int = 200) -> list[Tensor]:
    prediction = Prediction(body, status=status)
    return bridge.response_tensors(
        prediction, model="m", version="1.0", request_id="r", signature=signature
    ).outputs


# -- rule 1: the v2 request as the item's body ---------------------------------------------------


def test_handler_body_is_the_request_with_numpy_tensors() -> None:
    pixels = np.arange(64, dtype=np.float32).reshape(1, 64)
    request = v2_request(Tensor.from_numpy("pixels", pixels), outputs=("probabilities",))
    body = bridge.handler_body(request)
    assert body["id"] == "req-1"
    assert body["parameters"] == {"p": 1}
    assert body["outputs"] == [{"name": "probabilities"}]
    [item] = body["inputs"]
    assert {k: item[k] for k in ("name", "shape", "datatype", "parameters")} == {
        "name": "pixels",
        "shape": [1, 64],
        "datatype": "FP32",
        "parameters": {},
    }
    assert item["data"] is pixels  # writable arrays are handed over as they are


def test_handler_body_hands_read_only_views_over_without_a_copy() -> None:
    """The worker receives its own writable array (see the end-to-end test below): copying the
    request body's read-only view here as well would only cost a copy."""
    raw = np.arange(4, dtype=np.float32).tobytes()
    view = np.frombuffer(raw, np.float32)  # what a decoded binary tensor is
    [item] = bridge.handler_body(v2_request(Tensor.from_numpy("x", view)))["inputs"]
    assert item["data"] is view


# -- rule 2: what a plain TorchServe handler gets ------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        # one input: the body, as the same data posted to /predictions would give
        ([tensor("text", [b"hello"], "BYTES")], {"body": b"hello"}),
        ([tensor("text", [b"a", "\u00e9".encode()], "BYTES")], {"body": ["a", "\u00e9"]}),
        ([tensor("text", [b"\xff", b"ok"], "BYTES")], {"body": [b"\xff", "ok"]}),
        ([tensor("x", np.array([[1.0, 2.0]], np.float32))], {"body": [[1.0, 2.0]]}),
        ([tensor("n", np.array(7, np.int64))], {"body": 7}),
        # several inputs: form fields named after them
        (
            [tensor("a", np.array([1, 2], np.int32)), tensor("b", [b"x"], "BYTES")],
            {"a": [1, 2], "b": b"x"},
        ),
    ],
)
def test_plain_item(inputs: list[Tensor], expected: dict[str, Any]) -> None:
    assert bridge.plain_item(bridge.handler_body(v2_request(*inputs))) == expected


# -- rule 3: the handler's answer as tensors -----------------------------------------------------


def test_v2_outputs_are_taken_as_they_are() -> None:
    probabilities = np.full((2, 10), 0.1, np.float32)
    body = {
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [2, 10], "data": probabilities},
            {"name": "labels", "datatype": "BYTES", "shape": [2], "data": ["7", b"1"]},
            {"name": "flat", "datatype": "INT64", "data": [1, 2, 3]},  # shape from the data
        ]
    }
    out = respond(body)
    assert [(t.name, t.datatype, t.shape) for t in out] == [
        ("probabilities", "FP32", (2, 10)),
        ("labels", "BYTES", (2,)),
        ("flat", "INT64", (3,)),
    ]
    np.testing.assert_array_equal(out[0].data, probabilities)
    assert out[1].data.tolist() == [b"7", b"1"]
    assert out[2].data.dtype == np.int64


def test_flat_v2_data_is_reshaped_to_the_declared_shape() -> None:
    body = {"outputs": [{"name": "y", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]}]}
    [out] = respond(body)
    assert out.data.shape == (2, 2)
    assert out.data.dtype == np.float32


@pytest.mark.parametrize(
    ("body", "datatype", "shape", "data"),
    [
        (b"raw", "BYTES", (1,), [b"raw"]),
        ("caf\u00e9", "BYTES", (1,), ["caf\u00e9".encode()]),
        (0.5, "FP64", (), 0.5),
        (3, "INT64", (), 3),
        ([[1.0, 2.0], [3.0, 4.0]], "FP64", (2, 2), [[1.0, 2.0], [3.0, 4.0]]),
        (np.array([1, 2], np.int32), "INT32", (2,), [1, 2]),
        ({"7": 0.98, "1": 0.01}, "BYTES", (1,), [b'{"7":0.98,"1":0.01}']),
        ([[1, 2], [3]], "BYTES", (1,), [b"[[1,2],[3]]"]),  # ragged: JSON, not numbers
        (["a", "b"], "BYTES", (1,), [b'["a","b"]']),
        (None, "BYTES", (1,), [b"null"]),
    ],
)
def test_plain_answers(body: Any, datatype: str, shape: tuple[int, ...], data: Any) -> None:
    [out] = respond(body)
    assert (out.name, out.datatype, out.shape) == ("output0", datatype, shape)
    assert out.data.tolist() == data


def test_a_plain_answer_is_named_after_the_signatures_first_output() -> None:
    [out] = respond([0.1, 0.9], DIGITS_SIGNATURE)
    assert out.name == "probabilities"


def test_response_carries_model_version_and_request_id() -> None:
    response = bridge.response_tensors(
        Prediction([1]), model="m", version="2.0", request_id="abc", signature=None
    )
    assert (response.model_name, response.model_version, response.id) == ("m", "2.0", "abc")


@pytest.mark.parametrize(
    ("status", "body", "error", "message"),
    [
        (400, {"code": 400, "type": "BadRequest", "message": "bad pixels"}, BadRequest, None),
        (404, b"no such label", NotFound, "no such label"),
        (500, "boom", InferenceFailed, "boom"),
        (418, None, TorchgateError, "Handler answered status 418"),
    ],
)
def test_a_per_item_error_status_raises_its_error(
    status: int, body: Any, error: type[TorchgateError], message: str | None
) -> None:
    with pytest.raises(error) as info:
        respond(body, status=status)
    assert info.value.message == (message or "bad pixels")


def test_the_phrase_set_with_the_status_is_the_message_of_a_bodiless_error() -> None:
    prediction = Prediction(None, status=400, message="expected 64 numbers")
    with pytest.raises(BadRequest, match="expected 64 numbers"):
        bridge.response_tensors(prediction, model="m", version="1", request_id=None, signature={})


# -- codec_errors: whose fault -------------------------------------------------------------------


def test_codec_errors_are_the_clients_and_anything_else_the_servers() -> None:
    with pytest.raises(BadRequest, match="bad shape"), bridge.codec_errors():
        raise CodecError("bad shape")
    with pytest.raises(ModelNotFound), bridge.codec_errors():
        raise ModelNotFound("Model not found: m")  # already translated: kept
    with (
        pytest.raises(InferenceFailed, match="not a valid v2 tensor") as info,
        bridge.codec_errors(),
    ):
        raise TypeError("numpy dtype complex64 has no KServe v2 datatype")
    assert isinstance(info.value.__cause__, TypeError)


def test_an_output_the_handler_cannot_encode_is_a_server_error() -> None:
    body = {"outputs": [{"name": "y", "datatype": "FP32", "shape": [3], "data": [1, 2]}]}
    with pytest.raises(InferenceFailed), bridge.codec_errors():
        respond(body)


# -- requested outputs the answer lacks ----------------------------------------------------------


def answered(*names: str) -> V2Response:
    outputs = [tensor(name, [1.0]) for name in names]
    return V2Response("m", "1.0", None, {}, outputs)


def test_a_listed_output_the_handler_did_not_return_is_a_server_error() -> None:
    """The signature's outputs are checked before the model runs (`check_outputs`): a listed
    one missing from the answer is the handler's failure, not the client's."""
    request = v2_request(outputs=("probabilities", "labels"))
    signature = {**DIGITS_SIGNATURE, "outputs": [{"name": "probabilities"}, {"name": "labels"}]}
    with pytest.raises(InferenceFailed, match="did not return output 'labels'") as info:
        bridge.check_answered_outputs(request, answered("probabilities"), signature)
    assert "it returned 'probabilities'" in info.value.message


@pytest.mark.parametrize("signature", [None, {"inputs": DIGITS_SIGNATURE["inputs"]}])
def test_an_unknown_output_of_a_model_without_declared_outputs_is_the_clients(
    signature: dict[str, Any] | None,
) -> None:
    request = v2_request(outputs=("output0", "zz"))
    with pytest.raises(BadRequest, match="unknown output 'zz' requested"):
        bridge.check_answered_outputs(request, answered("output0"), signature)


def test_outputs_the_answer_holds_pass() -> None:
    request = v2_request(outputs=("probabilities",))
    bridge.check_answered_outputs(request, answered("probabilities", "extra"), DIGITS_SIGNATURE)
    bridge.check_answered_outputs(v2_request(), answered("output0"), None)  # none asked: all


# -- the signature check -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [(1, 1, 8, 8), (5, 1, 8, 8), (0, 1, 8, 8), (3, 64), (2, 8, 8)],
)
def test_inputs_that_fit_the_signature(shape: tuple[int, ...]) -> None:
    pixels = np.zeros(shape, np.float32)
    bridge.check_inputs(v2_request(Tensor.from_numpy("pixels", pixels)), DIGITS_SIGNATURE)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            [tensor("pixels", np.zeros((1, 64), np.int32))],
            "input 'pixels': datatype INT32, the model takes FP32",
        ),
        (
            [tensor("pixels", np.zeros((1, 64), np.float64))],
            "input 'pixels': datatype FP64, the model takes FP32",
        ),
        (
            [tensor("pixels", np.zeros((1, 63), np.float32))],
            "input 'pixels': shape [1, 63] does not fit the model's [-1, 1, 8, 8]",
        ),
        ([tensor("pixels", np.zeros(64, np.float32))], "shape [64] does not fit"),
        ([tensor("pixels", np.zeros((1, 2, 8, 8), np.float32))], "shape [1, 2, 8, 8]"),
        ([tensor("input0", np.zeros((1, 64), np.float32))], "unexpected input 'input0'"),
        ([], "missing input 'pixels'"),
        (
            [tensor("pixels", np.zeros((1, 64), np.float32))] * 2,
            "input 'pixels' is given twice",
        ),
    ],
)
def test_inputs_that_do_not_fit_the_signature(inputs: list[Tensor], message: str) -> None:
    with pytest.raises(BadRequest, match=re.escape(message)):
        bridge.check_inputs(v2_request(*inputs), DIGITS_SIGNATURE)


def test_static_dims_after_the_first_and_a_static_batch() -> None:
    signature = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, -1]}]}
    bridge.check_inputs(v2_request(tensor("x", np.zeros((2, 5), np.float32))), signature)
    with pytest.raises(BadRequest, match="shape"):  # no flattening under a static batch dim
        bridge.check_inputs(v2_request(tensor("x", np.zeros((1, 10), np.float32))), signature)
    texts = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}]}
    bridge.check_inputs(v2_request(tensor("text", [[b"a"], [b"b"]], "BYTES")), texts)
    with pytest.raises(BadRequest, match="shape"):
        bridge.check_inputs(v2_request(tensor("text", [[b"a", b"b"]], "BYTES")), texts)


@pytest.mark.parametrize(
    "signature",
    [None, {}, {"inputs": []}, {"outputs": [{"name": "y"}]}],
)
def test_without_declared_inputs_nothing_is_checked(signature: dict[str, Any] | None) -> None:
    bridge.check_inputs(v2_request(tensor("anything", np.zeros(3, np.int8))), signature)


def test_fields_the_signature_leaves_out_are_not_checked() -> None:
    signature = {"inputs": [{"name": "x"}]}
    bridge.check_inputs(v2_request(tensor("x", np.zeros((4, 4, 4), np.uint8))), signature)


def test_the_classification_extension_is_refused() -> None:
    request = v2_request(tensor("pixels", np.zeros((1, 64), np.float32)))
    bridge.check_extensions(request)
    request.outputs = [RequestedOutput("probabilities", None, {"classification": 3})]
    with pytest.raises(BadRequest, match="classification extension is not supported"):
        bridge.check_extensions(request)


@pytest.mark.parametrize(
    "inputs",
    [
        [tensor("pixels", np.zeros((MAX_ITEMS, 64), np.float32))],
        [tensor("pixels", np.zeros((MAX_ITEMS, 1, 8, 8), np.float32))],
        [tensor("text", [b"a"] * MAX_ITEMS, "BYTES")],
        [tensor("features", np.zeros(5000, np.float32))],  # one item of 5,000 numbers
        [tensor("scale", np.float32(2.0))],
    ],
)
def test_up_to_the_item_limit_is_served(inputs: list[Tensor]) -> None:
    bridge.check_items(v2_request(*inputs), MAX_ITEMS)


@pytest.mark.parametrize(
    "inputs",
    [
        [tensor("pixels", np.zeros((MAX_ITEMS + 1, 64), np.float32))],
        [tensor("text", [b"a"] * (MAX_ITEMS + 1), "BYTES")],
        [
            tensor("pixels", np.zeros((1, 64), np.float32)),
            tensor("mask", np.zeros((24_000, 1), np.uint8)),
        ],
    ],
)
def test_more_items_than_the_limit_are_payload_too_large(inputs: list[Tensor]) -> None:
    with pytest.raises(PayloadTooLarge, match=f"over the limit of {MAX_ITEMS} per request"):
        bridge.check_items(v2_request(*inputs), MAX_ITEMS)


# -- end to end: a real LocalBackend behind a real registry and dataplane ------------------------

# Says what it was handed: rule 1 (the v2 request, numpy data) or anything else (repr of the
# item, as a plain TorchServe handler would see it).
ECHO_HANDLER = """
def handle(data, context):
    if data is None:
        return None
    answers = []
    for row in data:
        body = row.get("body")
        if isinstance(body, dict) and isinstance(body.get("inputs"), list):
            seen = [f"{t['name']} {t['datatype']} {type(t['data']).__name__} "
                    f"writeable={t['data'].flags.writeable}"
                    for t in body["inputs"]]
            output = {"name": "seen", "datatype": "BYTES", "shape": [len(seen)], "data": seen}
            answers.append({"outputs": [output]})
        else:
            answers.append(repr(row))
    return answers
"""


def write_archive(path: Path, *, signature: dict[str, Any] | None) -> Path:
    manifest = {
        "runtime": "python",
        "model": {"modelName": "echo", "modelVersion": "1.0", "handler": "handler.py"},
        "archiverVersion": "0.12.0",
    }
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest))
        archive.writestr("handler.py", ECHO_HANDLER)
        if signature is not None:
            archive.writestr("signature.json", json.dumps(signature))
    return path


async def infer_through_workers(
    pool: WorkerPool, tmp_path: Path, signature: dict[str, Any] | None, request: V2Request
) -> list[Tensor]:
    path = write_archive(tmp_path / "echo.mar", signature=signature)
    settings = ModelSettings(batch_size=1)

    async def factory() -> Backend:
        return await load_worker_backend(path, settings, pool=pool, work_dir=tmp_path / "work")

    registry = Registry()
    await registry.register("echo", "1.0", path.name, factory, settings)
    try:
        call = bridge.V2Call(
            DataPlane(registry),
            "echo",
            None,
            request,
            headers={},
            request_id="r",
            api="v2-rest",
            max_items=MAX_ITEMS,
        )
        response = await call.answer()
    finally:
        await registry.close()
    return response.outputs


def test_an_archive_with_a_signature_gets_the_v2_request(
    worker_pool: WorkerPool, tmp_path: Path
) -> None:
    signature = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]}
    # A binary tensor decodes to a read-only view of the request body; the handler still gets
    # a writable array (torch.from_numpy warns on read-only ones).
    view = np.frombuffer(np.ones(2, np.float32).tobytes(), np.float32).reshape(1, 2)
    request = v2_request(Tensor.from_numpy("x", view))
    [out] = run(infer_through_workers(worker_pool, tmp_path, signature, request))
    assert (out.name, out.data.tolist()) == ("seen", [b"x FP32 ndarray writeable=True"])


def test_the_signature_is_checked_before_the_handler_runs(
    worker_pool: WorkerPool, tmp_path: Path
) -> None:
    signature = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]}
    request = v2_request(tensor("x", np.ones((1, 2), np.int32)))
    with pytest.raises(BadRequest, match="datatype INT32"):
        run(infer_through_workers(worker_pool, tmp_path, signature, request))


def test_an_archive_without_a_signature_gets_what_predictions_would_give(
    worker_pool: WorkerPool, tmp_path: Path
) -> None:
    request = v2_request(tensor("x", np.array([[1.0, 2.0]], np.float32)))
    [out] = run(infer_through_workers(worker_pool, tmp_path, None, request))
    assert (out.name, out.data.tolist()) == ("output0", [repr({"body": [[1.0, 2.0]]}).encode()])


def test_an_unknown_model_fails_before_anything_runs() -> None:
    request = v2_request(tensor("x", np.ones(1, np.float32)))
    with pytest.raises(ModelNotFound):
        call = bridge.V2Call(
            DataPlane(Registry()),
            "m",
            None,
            request,
            headers={},
            request_id="",
            api="v2-rest",
            max_items=MAX_ITEMS,
        )
        run(call.answer())
