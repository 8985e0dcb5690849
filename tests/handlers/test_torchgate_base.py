"""The shared handler machinery: payload extraction, device and provider choice, formats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
import torch

from handlers import torchgate_base
from handlers.torchgate_base import (
    BadRequest,
    OnnxRunner,
    model_format,
    reason_phrase,
    request_payload,
    select_device,
)


class Props:
    def __init__(self, gpu_id: int | None) -> None:
        self.system_properties: dict[str, Any] = {"gpu_id": gpu_id}
        self.manifest: dict[str, Any] | None = None

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        raise AssertionError("not expected")


@pytest.mark.parametrize(
    ("item", "payload"),
    [
        ({"body": b"x"}, b"x"),
        ({"data": "text"}, "text"),
        ({"body": None, "data": [1]}, [1]),
        ({"inputs": [{"data": [1]}]}, {"inputs": [{"data": [1]}]}),
        ({"topk": b"3", "file": b"img"}, b"img"),  # form field under its own name
        (b"raw", b"raw"),
    ],
)
def test_request_payload(item: Any, payload: Any) -> None:
    assert request_payload(item) == payload


def test_request_payload_without_body_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="empty request"):
        request_payload({"topk": b"3"})


def test_reason_phrase_is_one_short_ascii_line() -> None:
    phrase = reason_phrase("bad\nthing: é" + "x" * 500)
    assert phrase.startswith("bad thing: ?")
    assert len(phrase) == 200 and phrase.isascii()


def test_model_format() -> None:
    assert model_format({"format": "onnx"}, "model.pt") == "onnx"  # the signature wins
    assert model_format({}, "model.onnx") == "onnx"
    assert model_format({}, "model.pt") == "torchscript"
    with pytest.raises(ValueError):
        model_format({}, "model.bin")


def test_device_follows_gpu_id_only_when_cuda_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device(Props(1)) == torch.device("cuda", 1)
    assert select_device(Props(None)) == torch.device("cpu")  # no GPU assigned: CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device(Props(0)) == torch.device("cpu")


@pytest.mark.parametrize("device", [torch.device("cpu"), torch.device("cuda", 1)])
def test_onnx_asks_for_cuda_only_on_a_gpu(
    device: torch.device,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: dict[str, Any] = {"preloaded": False}

    class Session:
        def __init__(self, path: str, sess_options: Any, providers: list[Any]) -> None:
            seen["providers"] = providers
            seen["spinning"] = sess_options.get_session_config_entry(
                "session.intra_op.allow_spinning"
            )

        def get_inputs(self) -> list[Any]:
            return []

        def get_providers(self) -> list[str]:
            return ["CPUExecutionProvider"]  # as a CPU build of onnxruntime answers

    monkeypatch.setattr(onnxruntime, "InferenceSession", Session)
    monkeypatch.setattr(
        onnxruntime, "preload_dlls", lambda: seen.update(preloaded=True), raising=False
    )
    OnnxRunner(tmp_path / "m.onnx", device)
    assert seen["spinning"] == "0"
    if device.type == "cuda":
        assert seen["providers"] == [
            ("CUDAExecutionProvider", {"device_id": 1}),
            "CPUExecutionProvider",
        ]
        assert seen["preloaded"]
        assert "m.onnx runs on CPU: this onnxruntime has no CUDA provider" in caplog.text
    else:
        assert seen["providers"] == ["CPUExecutionProvider"]
        assert not seen["preloaded"]
        assert "runs on CPU" not in caplog.text


def test_v2_response_keeps_numpy_for_numpy_requests() -> None:
    array = np.ones((2, 3), dtype=np.float32)
    as_list = torchgate_base.v2_response("y", array, numpy_out=False)["outputs"][0]
    assert as_list == {"name": "y", "datatype": "FP32", "shape": [2, 3], "data": [1.0] * 6}
    as_numpy = torchgate_base.v2_response("y", array, numpy_out=True)["outputs"][0]
    assert as_numpy["data"] is array


@pytest.mark.parametrize(
    ("text", "limit", "kept"),
    [
        ("short", 10, "short"),
        ("exactly ten", 11, "exactly ten"),
        ("two words", 4, "two"),  # "two " then a word: cut at the space
        ("two words", 5, "two"),  # the cut would split "words"
        ("two\nlines here", 9, "two\nlines"),  # whitespace at the cut: nothing lost
        ("oneverylongword", 4, "onev"),  # no space to go back to
    ],
)
def test_truncate_text_keeps_whole_words(text: str, limit: int, kept: str) -> None:
    assert torchgate_base.truncate_text(text, limit) == kept


class _Properties:
    def __init__(self, **properties: Any) -> None:
        self.system_properties = properties
        self.manifest: dict[str, Any] | None = None

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        raise AssertionError("not used")


@pytest.mark.parametrize(
    ("properties", "limit"),
    [
        ({}, torchgate_base.DEFAULT_MAX_IMAGE_PIXELS),  # TorchServe, or a test's context
        ({"limit_max_image_pixels": True}, torchgate_base.DEFAULT_MAX_IMAGE_PIXELS),
        ({"limit_max_image_pixels": True, "max_image_pixels": 7}, 7),  # torchgate's workers
        ({"limit_max_image_pixels": False, "max_image_pixels": 7}, None),
    ],
)
def test_image_pixel_limit(properties: dict[str, Any], limit: int | None) -> None:
    assert torchgate_base.image_pixel_limit(_Properties(**properties)) == limit


def test_the_handlers_image_default_is_torchgates() -> None:
    from api.workers.main import DEFAULT_MAX_IMAGE_PIXELS

    assert torchgate_base.DEFAULT_MAX_IMAGE_PIXELS == DEFAULT_MAX_IMAGE_PIXELS


def test_deep_json_is_a_bad_request() -> None:
    with pytest.raises(torchgate_base.BadRequest, match="nested deeper"):
        torchgate_base.parse_json("[" * 100_000 + "]" * 100_000)
