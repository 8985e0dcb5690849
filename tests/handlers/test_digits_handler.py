"""The digits handler on its TorchScript (digits.mar) and ONNX (digits_v2.mar) archives."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from export.models import digits
from handlers.digits_handler import INK_THRESHOLD, DigitsHandler, image_to_digits
from handlers.torchgate_base import Decoded
from tests.support.bombs import deep_json, png_bomb

ARCHIVES = ["digits", "digits_v2"]  # TorchScript 1.0, ONNX 2.0


@pytest.fixture(scope="module")
def data() -> digits.DigitsData:
    return digits.load_data()


def raw(data: digits.DigitsData, count: int, start: int = 0) -> np.ndarray:
    """Held-out images in dataset units (0..16), [count, 64]."""
    return data.x_test[start : start + count].reshape(count, 64) * digits.PIXEL_SCALE


def image_bytes(values: np.ndarray, dark_on_light: bool, fmt: str = "PNG") -> bytes:
    """A dataset image drawn as a real picture: 64x64, 0..255, optionally inverted."""
    gray = values.reshape(8, 8) / digits.PIXEL_SCALE * 255
    if dark_on_light:
        gray = 255 - gray
    picture = Image.fromarray(gray.astype(np.uint8)).resize((64, 64), Image.Resampling.NEAREST)
    out = io.BytesIO()
    picture.save(out, fmt)
    return out.getvalue()


def top_label(response: dict[str, float]) -> str:
    return next(iter(response))


@pytest.mark.parametrize("stem", ARCHIVES)
def test_json_values_match_the_serialized_model(
    stem: str, loaded_handler: Callable[[str], Any], context_for: Any, data: digits.DigitsData
) -> None:
    handler = loaded_handler(stem)
    images = raw(data, 8)
    context = context_for(stem)
    responses = handler.handle([{"body": image.tolist()} for image in images], context)
    expected = handler.runner.run({"pixels": data.x_test[:8]})
    for response, probabilities in zip(responses, expected, strict=True):
        assert list(response) == [str(i) for i in np.argsort(-probabilities)[:5]]
        for label, probability in response.items():
            assert probability == pytest.approx(float(probabilities[int(label)]), abs=1e-6)
    assert context.statuses == {}
    assert context.headers[0]["x-batch-size"] == "8"


@pytest.mark.parametrize("stem", ARCHIVES)
def test_heldout_accuracy_through_the_handler_equals_the_eager_one(
    stem: str, loaded_handler: Callable[[str], Any], context_for: Any, data: digits.DigitsData
) -> None:
    handler = loaded_handler(stem)
    images = raw(data, len(data.x_test))
    responses = handler.handle([{"body": image.tolist()} for image in images], context_for(stem))
    predicted = np.array([int(top_label(r)) for r in responses])
    accuracy = float((predicted == data.y_test).mean())
    # signature.json records the eager model's accuracy on the same held-out split.
    assert accuracy == pytest.approx(handler.signature["training"]["heldout_accuracy"], abs=1e-4)
    assert accuracy >= 0.95


@pytest.mark.parametrize("stem", ARCHIVES)
@pytest.mark.parametrize(("dark_on_light", "fmt"), [(True, "PNG"), (False, "PNG"), (True, "JPEG")])
def test_images_classify_like_their_values(
    stem: str,
    dark_on_light: bool,
    fmt: str,
    loaded_handler: Callable[[str], Any],
    context_for: Any,
    data: digits.DigitsData,
) -> None:
    handler = loaded_handler(stem)
    images = raw(data, 40)
    by_image = handler.handle(
        [{"data": image_bytes(v, dark_on_light, fmt)} for v in images], context_for(stem)
    )
    by_values = handler.handle([{"body": v.tolist()} for v in images], context_for(stem))
    agree = np.mean(
        [top_label(a) == top_label(b) for a, b in zip(by_image, by_values, strict=True)]
    )
    assert agree >= 0.9


def centered_full_height(values: np.ndarray) -> bool:
    """All ink (also the faint ink the handler's crop ignores) in a box as high as the image
    and centred in it: cropping to the ink and padding square gives back the same 8x8."""
    square = values.reshape(8, 8)
    any_ink, strong_ink = square > 0, square > INK_THRESHOLD * 16
    cols = np.flatnonzero(any_ink.any(axis=0))
    width = cols[-1] - cols[0] + 1
    same_box = (np.flatnonzero(strong_ink.any(axis=0))[[0, -1]] == cols[[0, -1]]).all()
    full_height = strong_ink[0].any() and strong_ink[-1].any()
    return bool(same_box and full_height and cols[0] * 2 == 8 - width)


def test_image_preprocessing_reproduces_a_dataset_digit(data: digits.DigitsData) -> None:
    values = next(v for v in raw(data, len(data.x_test)) if centered_full_height(v))
    for dark_on_light in (True, False):
        restored = image_to_digits(image_bytes(values, dark_on_light))
        # 8-bit grey levels: one level of 255 is 16/255 of a dataset unit.
        np.testing.assert_allclose(restored, values, atol=16 / 255 + 1e-4)


def test_base64_image_and_data_object(
    loaded_handler: Callable[[str], Any], context_for: Any, data: digits.DigitsData
) -> None:
    handler = loaded_handler("digits")
    values = raw(data, 3)[2]
    encoded = base64.b64encode(image_bytes(values, True)).decode()
    responses = handler.handle(
        [{"body": encoded}, {"body": {"data": values.tolist(), "topk": 2}}, {"body": values}],
        context_for("digits"),
    )
    assert top_label(responses[0]) == top_label(responses[1]) == top_label(responses[2])
    assert len(responses[1]) == 2


def test_topk_from_query_parameter_and_header(
    loaded_handler: Callable[[str], Any], context_for: Any, data: digits.DigitsData
) -> None:
    handler = loaded_handler("digits")
    values = raw(data, 1)[0].tolist()
    context = context_for("digits", request_headers=[{}, {"topk": "1"}])
    responses = handler.handle([{"body": values, "topk": b"3"}, {"body": values}], context)
    assert [len(r) for r in responses] == [3, 1]


@pytest.mark.parametrize("stem", ARCHIVES)
@pytest.mark.parametrize(
    ("data_of", "shape"),
    [
        (lambda v: v.ravel().tolist(), [1, 64]),
        (lambda v: v.reshape(1, 1, 8, 8).tolist(), [1, 1, 8, 8]),
        (lambda v: v.astype(np.float32).reshape(1, 1, 8, 8), [1, 1, 8, 8]),
        (lambda v: v.astype(np.float32).ravel(), [64]),
    ],
    ids=["flat-list", "nested-list", "numpy-4d", "numpy-flat"],
)
def test_v2_item_gets_v2_outputs(
    stem: str,
    data_of: Callable[[np.ndarray], Any],
    shape: list[int],
    loaded_handler: Callable[[str], Any],
    context_for: Any,
    data: digits.DigitsData,
) -> None:
    handler = loaded_handler(stem)
    values = raw(data, 1)[0]
    tensor = {"name": "pixels", "shape": shape, "datatype": "FP32", "data": data_of(values)}
    for item in ({"body": {"inputs": [tensor]}}, {"inputs": [tensor]}):
        (response,) = handler.handle([item], context_for(stem))
        (output,) = response["outputs"]
        assert output["name"] == "probabilities"
        assert output["datatype"] == "FP32"
        assert output["shape"] == [1, 10]
        assert isinstance(output["data"], np.ndarray) == isinstance(tensor["data"], np.ndarray)
        expected = handler.runner.run({"pixels": data.x_test[:1]})
        np.testing.assert_allclose(np.ravel(output["data"]), expected.ravel(), atol=1e-6)
        if isinstance(tensor["data"], list):
            json.dumps(response)  # TorchServe json.dumps()es the response


def test_labels_come_by_probability_and_ties_keep_label_order(
    loaded_handler: Callable[[str], Any],
) -> None:
    handler = loaded_handler("digits")
    probabilities = np.array([[0.1, 0.3, 0.05, 0.3, 0.0, 0.1, 0.05, 0.1, 0.0, 0.0]], np.float32)
    item = Decoded(1, None, options={"topk": 6})
    response = handler.respond(item, probabilities)
    assert list(response) == ["1", "3", "0", "5", "7", "2"]
    assert all(type(value) is float for value in response.values())  # JSON numbers, not numpy
    assert response["1"] == float(np.float32(0.3))


def test_v2_item_with_several_images(
    loaded_handler: Callable[[str], Any], context_for: Any, data: digits.DigitsData
) -> None:
    handler = loaded_handler("digits_v2")
    values = raw(data, 3)
    item = {
        "inputs": [
            {
                "name": "pixels",
                "shape": [3, 64],
                "datatype": "FP32",
                "data": values.ravel().tolist(),
            }
        ]
    }
    (response,) = handler.handle([item], context_for("digits_v2"))
    assert response["outputs"][0]["shape"] == [3, 10]
    assert len(response["outputs"][0]["data"]) == 30


@pytest.mark.parametrize("stem", ARCHIVES)
def test_bad_items_fail_alone_in_one_forward_pass(
    stem: str, loaded_handler: Callable[[str], Any], context_for: Any, data: digits.DigitsData
) -> None:
    handler = loaded_handler(stem)
    good = raw(data, 4)
    batch: list[Any] = [
        {"body": good[0].tolist()},
        {"body": b"\x89PNG\r\n\x1a\n not really a png"},  # undecodable image
        {"body": image_bytes(good[1], True)},
        {"body": [1.0, 2.0, 3.0]},  # wrong length
        {"body": b'{"data": [1, 2,'},  # broken JSON
        {
            "inputs": [{"name": "pixels", "shape": [2, 32], "datatype": "FP32", "data": [0.0] * 64}]
        },  # v2 shape that is not images
        {"body": {"data": good[2].tolist(), "topk": 99}},  # topk out of range
        {
            "inputs": [
                {"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": good[3].tolist()}
            ]
        },
    ]
    context = context_for(stem)
    calls: list[int] = []
    original_run = handler.runner.run

    def counting_run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        calls.append(len(inputs["pixels"]))
        return original_run(inputs)

    handler.runner.run = counting_run
    try:
        responses = handler.handle(batch, context)
    finally:
        del handler.runner.run
    assert calls == [3]  # the three valid items, together
    assert sorted(context.statuses) == [1, 3, 4, 5, 6]
    for idx in (1, 3, 4, 5, 6):
        code, phrase = context.statuses[idx]
        assert code == 400
        assert responses[idx] == {"code": 400, "type": "BadRequest", "message": phrase}
    assert "neither JSON nor a readable image" in responses[1]["message"]
    assert "got 3" in responses[3]["message"]
    assert "invalid JSON" in responses[4]["message"]
    assert "[..., 64]" in responses[5]["message"]
    assert "topk" in responses[6]["message"]
    assert top_label(responses[0]) == str(data.y_test[0])
    assert isinstance(responses[2], dict) and len(responses[2]) == 5
    assert responses[7]["outputs"][0]["shape"] == [1, 10]
    assert all(context.headers[idx]["x-batch-size"] == "8" for idx in range(8))


def test_handler_imports_from_the_repo_too(extracted: dict[str, Any], context_for: Any) -> None:
    handler = DigitsHandler()
    handler.initialize(context_for("digits"))
    assert handler.format == "torchscript"
    assert handler.device.type == "cpu"
    handler_v2 = DigitsHandler()
    handler_v2.initialize(context_for("digits_v2"))
    assert handler_v2.format == "onnx"


@pytest.mark.parametrize("stem", ["digits", "digits_v2"])
def test_bad_v2_shape_fails_alone_and_json_topk_works_as_bytes(
    stem: str, loaded_handler: Callable[[str], Any], context_for: Any
) -> None:
    """Regressions: a malformed v2 shape failed the whole batch; a JSON body's topk sent as
    bytes was ignored."""
    good = json.dumps({"data": [0.0] * 64, "topk": 2}).encode()
    bad_shape = {
        "inputs": [{"name": "pixels", "shape": ["a"], "datatype": "FP32", "data": [0.0] * 64}]
    }
    context = context_for(stem)
    responses = loaded_handler(stem).handle([{"body": good}, {"body": bad_shape}], context)
    assert len(responses[0]) == 2
    assert context.statuses[1][0] == 400
    assert 0 not in context.statuses or context.statuses[0][0] == 200


# -- bounded inputs (docs/security.md) ------------------------------------------------------------


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The sizes of the images Pillow decodes pixels of, from here on."""
    sizes: list[tuple[int, int]] = []
    load = ImageFile.ImageFile.load

    def recording_load(image: ImageFile.ImageFile) -> Any:
        sizes.append(image.size)
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    return sizes


@pytest.mark.parametrize("stem", ARCHIVES)
def test_an_image_over_the_pixel_limit_is_refused_from_its_header_alone(
    stem: str,
    loaded_handler: Callable[[str], Any],
    context_for: Any,
    data: digits.DigitsData,
    decoded: list[tuple[int, int]],
) -> None:
    handler = loaded_handler(stem)
    bomb = png_bomb()  # 13000 x 13000: 169 M pixels in 20 KB
    good = raw(data, 1)[0]
    context = context_for(stem)
    started = time.perf_counter()
    responses = handler.handle(
        [
            {"body": bomb},
            {"body": image_bytes(good, True)},
            {"body": base64.b64encode(bomb).decode()},  # a text body
        ],
        context,
    )
    elapsed = time.perf_counter() - started
    assert set(decoded) == {(64, 64)}  # only the good image's pixels were ever decoded
    assert elapsed < 1.0  # decoding the bomb took 5-7 s and 1.5 GB
    for idx in (0, 2):
        code, phrase = context.statuses[idx]
        assert code == 413
        assert responses[idx] == {"code": 413, "type": "PayloadTooLarge", "message": phrase}
        assert phrase == ("image of 13000x13000 pixels is over the limit of 40,000,000 pixels")
    assert top_label(responses[1]) == str(data.y_test[0])


@pytest.mark.parametrize(
    ("properties", "status"),
    [
        ({"max_image_pixels": 4095}, 413),  # the 64x64 image has 4096
        ({"max_image_pixels": 4096}, 200),
        ({"max_image_pixels": 100, "limit_max_image_pixels": False}, 200),  # no limit at all
    ],
)
def test_the_pixel_limit_comes_from_the_context(
    properties: dict[str, Any],
    status: int,
    extracted: dict[str, Any],
    context_for: Any,
    data: digits.DigitsData,
) -> None:
    context = context_for("digits")
    context.system_properties.update(properties)
    handler = DigitsHandler()
    handler.initialize(context)
    responses = handler.handle([{"body": image_bytes(raw(data, 1)[0], True)}], context)
    assert context.statuses.get(0, (200, ""))[0] == status, responses


@pytest.mark.parametrize("stem", ARCHIVES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_are_refused_on_every_path(
    stem: str, bad: float, loaded_handler: Callable[[str], Any], context_for: Any
) -> None:
    """/predictions refused NaN pixels; a v2 tensor (JSON list, or numpy from binary or gRPC
    contents) got 200 with null probabilities."""
    pixels = np.zeros((2, 64), np.float32)
    pixels[1, 7] = bad
    tensor = {"name": "pixels", "shape": [2, 64], "datatype": "FP32"}
    batch = [
        {"body": pixels[1].tolist()},
        {"body": {"inputs": [{**tensor, "data": pixels}]}},
        {"body": {"inputs": [{**tensor, "data": pixels.ravel().tolist()}]}},
        {"body": {"inputs": [{**tensor, "data": pixels[:1].copy(), "shape": [1, 64]}]}},
    ]
    context = context_for(stem)
    responses = loaded_handler(stem).handle(batch, context)
    for idx in range(3):
        assert context.statuses[idx] == (400, "pixel values must be finite numbers")
    assert 3 not in context.statuses
    assert np.isfinite(responses[3]["outputs"][0]["data"]).all()


@pytest.mark.parametrize(
    "body", [deep_json(), deep_json().decode(), base64.b64encode(deep_json()).decode()]
)
def test_deeply_nested_json_is_a_bad_request(
    body: Any, loaded_handler: Callable[[str], Any], context_for: Any
) -> None:
    context = context_for("digits")
    [response] = loaded_handler("digits").handle([{"body": body}], context)
    assert context.statuses[0][0] == 400, response


def transparent(values: np.ndarray, dark_ink: bool, mode: str, opacity: float = 1.0) -> bytes:
    """The digit as a canvas draws it: ink of one colour, its strength in the alpha channel
    (at most `opacity`), on a fully transparent background."""
    alpha = (values.reshape(8, 8) / digits.PIXEL_SCALE * 255 * opacity).astype(np.uint8)
    ink = np.full((8, 8), 0 if dark_ink else 255, dtype=np.uint8)
    picture = Image.fromarray(np.dstack([ink, ink, ink, alpha]), "RGBA")
    if mode == "LA":
        picture = picture.convert("LA")
    picture = picture.resize((64, 64), Image.Resampling.NEAREST)
    out = io.BytesIO()
    picture.save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
@pytest.mark.parametrize("dark_ink", [True, False], ids=["dark ink", "light ink"])
def test_a_drawing_on_a_transparent_background_reads_as_on_paper(
    data: digits.DigitsData, dark_ink: bool, mode: str
) -> None:
    # Grey conversion alone turned the transparent background black: all ink, a blank digit.
    values = raw(data, 1, start=5)[0]
    on_paper = image_to_digits(image_bytes(values, dark_on_light=dark_ink))
    drawn = image_to_digits(transparent(values, dark_ink, mode))
    assert drawn.max() > 8
    np.testing.assert_allclose(drawn, on_paper, atol=16 / 255 * 2)


def test_a_faint_drawing_on_a_transparent_background_is_read_too(data: digits.DigitsData) -> None:
    # Strokes at most 40 % opaque: none is "opaque", and light ink was taken for dark on
    # white paper (a blank digit). Light or dark, the faint drawing reads the same.
    values = raw(data, 1, start=5)[0]
    dark = image_to_digits(transparent(values, True, "RGBA", opacity=0.4))
    light = image_to_digits(transparent(values, False, "RGBA", opacity=0.4))
    assert dark.max() > 4  # 40 % of full ink: 6.4 of 16
    np.testing.assert_allclose(light, dark, atol=16 / 255 * 2)


def test_base64_wrapped_in_lines_or_as_a_data_url_is_an_image(
    loaded_handler: Callable[[str], Any], context_for: Any, data: digits.DigitsData
) -> None:
    # As the `base64` tool wraps it and a browser canvas exports it (TorchServe's decoder is
    # lenient too).
    handler = loaded_handler("digits")
    picture = image_bytes(raw(data, 3)[2], True)
    wrapped = base64.encodebytes(picture).decode()
    url = "data:image/png;base64," + base64.b64encode(picture).decode()
    responses = handler.handle(
        [{"body": picture}, {"body": wrapped}, {"body": url}], context_for("digits")
    )
    assert responses[0] == responses[1] == responses[2]
