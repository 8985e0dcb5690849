"""The same requests against real TorchServe 0.12 and against torchgate, on the same archives and
the same config.properties: status codes and bodies must match, except where TorchServe is wrong,
where the test asserts torchgate's behaviour and says why.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from tests.support.bombs import png_bomb
from tests.support.server import running_torchgate
from tests.support.torchserve import running_torchserve

pytestmark = [pytest.mark.integration, pytest.mark.torchserve]

ROOT = Path(__file__).resolve().parents[2]
DIGITS = load_digits()


@dataclass(frozen=True)
class Urls:
    inference: str
    management: str
    metrics: str


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Urls]]:
    with (
        running_torchserve(ROOT / "model_store", ROOT / "config.properties") as ts,
        running_torchgate(ROOT / "config.properties") as tg,
    ):
        yield {
            "torchserve": Urls(ts.inference_url, ts.management_url, ts.metrics_url),
            "torchgate": Urls(tg.inference_url, tg.management_url, tg.metrics_url),
        }


def both(
    servers: dict[str, Urls], method: str, api: str, path: str, **kwargs: object
) -> dict[str, httpx.Response]:
    answers = {}
    for name, urls in servers.items():
        base = getattr(urls, api)
        answers[name] = httpx.request(method, base + path, timeout=60, **kwargs)  # type: ignore[arg-type]
    return answers


def png(index: int) -> bytes:
    image = Image.fromarray(np.uint8(255 - DIGITS.images[index] / 16 * 255)).resize((32, 32))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def assert_same_probabilities(a: dict[str, float], b: dict[str, float]) -> None:
    assert list(a) == list(b)  # same labels, same order
    assert [a[k] for k in a] == pytest.approx([b[k] for k in a], abs=1e-5)


def test_ping(servers: dict[str, Urls]) -> None:
    answers = both(servers, "GET", "inference", "/ping")
    assert {r.status_code for r in answers.values()} == {200}
    assert answers["torchgate"].json() == answers["torchserve"].json() == {"status": "Healthy"}
    assert [r.headers["content-type"] for r in answers.values()] == ["application/json"] * 2
    assert all(r.headers.get("x-request-id") for r in answers.values())


@pytest.mark.parametrize("method", ["HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
@pytest.mark.parametrize("path", ["/ping", "/ping/", "/ping?probe=1"])
def test_ping_answers_every_method_and_a_trailing_slash(
    servers: dict[str, Urls], method: str, path: str
) -> None:
    """TorchServe answers its health check whatever the method (load balancers probe with HEAD)
    and with a trailing slash; a body sent with it is ignored."""
    body = b'{"probe": true}' if method in ("POST", "PUT", "PATCH") else None
    answers = both(servers, method, "inference", path, content=body)
    assert {r.status_code for r in answers.values()} == {200}, answers
    if method == "HEAD":
        assert [r.content for r in answers.values()] == [b"", b""]
    else:
        assert answers["torchgate"].json() == answers["torchserve"].json() == {"status": "Healthy"}


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
@pytest.mark.parametrize(
    ("api", "path"),
    [
        ("inference", "/api-description"),
        ("management", "/api-description"),
        ("metrics", "/metrics"),
        ("metrics", "/metrics/"),
    ],
)
def test_descriptions_and_metrics_answer_every_method(
    servers: dict[str, Urls], method: str, api: str, path: str
) -> None:
    """As /ping: TorchServe serves these whatever the method, and /metrics/ without a redirect.
    (The documents' contents are each server's own; the metrics are compared elsewhere.)"""
    answers = both(servers, method, api, path)
    assert {r.status_code for r in answers.values()} == {200}, answers
    if method == "HEAD":
        assert [r.content for r in answers.values()] == [b"", b""]
    elif api == "metrics":
        assert all(r.text.startswith("# HELP") for r in answers.values())
    else:
        assert all("paths" in r.json() for r in answers.values())


@pytest.mark.parametrize(
    ("method", "api", "path"),
    [
        ("GET", "inference", "/ping"),
        ("POST", "inference", "/predictions/digits"),
        ("POST", "inference", "/predictions/nope"),
        ("GET", "inference", "/api-description"),
        ("GET", "management", "/models"),
        ("GET", "management", "/models/nope"),
        ("GET", "metrics", "/metrics"),
        ("GET", "metrics", "/nope"),
        ("GET", "management", "/api-description"),
        ("PATCH", "management", "/models"),
    ],
)
def test_every_answer_is_uncacheable_and_has_a_request_id(
    servers: dict[str, Urls], method: str, api: str, path: str
) -> None:
    """TorchServe sends the same three headers on every REST answer, errors included, so no
    cache between client and server keeps a prediction or a health answer; and an
    `x-request-id` (torchgate sent it on the inference paths only, until this test)."""
    answers = both(servers, method, api, path, json=[0.0] * 64 if method == "POST" else None)
    assert answers["torchgate"].status_code == answers["torchserve"].status_code
    names = ("cache-control", "expires", "pragma")
    sent = {name: [answer.headers.get(n) for n in names] for name, answer in answers.items()}
    assert sent["torchgate"] == sent["torchserve"]
    assert sent["torchgate"][0] == "no-cache; no-store, must-revalidate, private"
    assert all(answer.headers.get("x-request-id") for answer in answers.values()), answers
    asked = both(servers, method, api, path, headers={"x-request-id": "probe-42"})
    assert asked["torchgate"].headers["x-request-id"] == "probe-42"


def test_the_model_list_with_a_trailing_slash(servers: dict[str, Urls]) -> None:
    answers = both(servers, "GET", "management", "/models/")
    assert {r.status_code for r in answers.values()} == {200}  # no redirect
    assert answers["torchgate"].json() == answers["torchserve"].json()
    refused = both(servers, "POST", "management", "/models/?url=digits.mar")
    assert {r.status_code for r in refused.values()} == {405}


# Found by sending 7 methods x 14 paths to both servers: torchgate answered each of these with a
# 307 redirect, a 404 or a 405 where TorchServe answers as below. TorchServe splits a path on
# '/' and drops the empty segments at its end, and looks only at the first segment for /ping.
@pytest.mark.parametrize(
    ("method", "api", "path", "status"),
    [
        ("GET", "management", "/models/digits/1.0/", 200),
        ("POST", "management", "/models/digits/1.0/", 405),
        ("PATCH", "management", "/models/digits/1.0/", 405),
        ("GET", "management", "/workflows/", 200),
        ("POST", "management", "/workflows/", 400),  # "Parameter url is required."
        ("PUT", "management", "/workflows/", 405),
        ("GET", "inference", "/api-description/", 200),
        ("DELETE", "inference", "/api-description/", 200),
        ("GET", "inference", "/ping/anything", 200),
        ("HEAD", "inference", "/ping/anything/else", 200),
        ("GET", "metrics", "/api-description", 200),
        ("POST", "metrics", "/api-description/", 200),
        ("OPTIONS", "metrics", "/", 200),
        ("GET", "metrics", "/", 405),
        ("PUT", "metrics", "/", 405),
    ],
)
def test_paths_answer_as_in_torchserve(
    servers: dict[str, Urls], method: str, api: str, path: str, status: int
) -> None:
    answers = both(servers, method, api, path)
    assert [r.status_code for r in answers.values()] == [status, status], answers
    if method == "HEAD":
        return
    ours, theirs = answers["torchgate"].json(), answers["torchserve"].json()
    if status != 200:
        assert ours["type"] == theirs["type"]
    elif isinstance(theirs, dict) and "paths" in theirs:  # each server's own API description
        assert "paths" in ours
    elif path.startswith("/models/"):
        assert [(m["modelName"], m["modelVersion"]) for m in ours] == [("digits", "1.0")]
        assert [(m["modelName"], m["modelVersion"]) for m in theirs] == [("digits", "1.0")]
    else:
        assert ours == theirs


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/models/digits", 200),
        ("/models/digits/2.0", 200),
        ("/models/digits/2.0/set-default", 200),
        ("/models/digits/9.9/set-default", 200),  # TorchServe looks up the model only there
        ("/models/nope", 404),
        ("/models/digits/9.9", 404),
        ("/models/digits/all", 404),  # "all" is a version name to OPTIONS
    ],
)
def test_options_on_a_model_describes_its_management_api(
    servers: dict[str, Urls], path: str, status: int
) -> None:
    """What a browser's CORS preflight for `PUT /models/digits` gets: 200 and the API the model
    offers (it was 405 on torchgate, which fails the preflight), or 404 as for a GET."""
    answers = both(servers, "OPTIONS", "management", path)
    assert [r.status_code for r in answers.values()] == [status, status], answers
    ours, theirs = answers["torchgate"].json(), answers["torchserve"].json()
    if status == 404:
        assert ours["type"] == theirs["type"]
        return
    assert ours["info"]["title"] == theirs["info"]["title"] == "RESTful Management API for: digits"
    assert len(ours["paths"]) == len(theirs["paths"]) == 3
    for document in (ours, theirs):
        assert {"get", "put", "delete"} <= set(document["paths"]["/models/{model_name}"])


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE"])
def test_no_token_api_with_token_authorization_off(servers: dict[str, Urls], method: str) -> None:
    answers = both(servers, method, "management", "/token?type=inference")
    assert [r.status_code for r in answers.values()] == [404, 404], answers
    assert answers["torchgate"].json()["type"] == answers["torchserve"].json()["type"]


@pytest.mark.parametrize("path", ["/predictions/digits", "/predictions/digits/2.0"])
def test_digits_json_and_image(servers: dict[str, Urls], path: str) -> None:
    for kwargs in ({"json": DIGITS.data[5].tolist()}, {"content": png(5)}):
        answers = both(servers, "POST", "inference", path, **kwargs)
        assert answers["torchgate"].status_code == answers["torchserve"].status_code == 200
        assert_same_probabilities(answers["torchgate"].json(), answers["torchserve"].json())


def test_minilm_text(servers: dict[str, Urls]) -> None:
    answers = both(servers, "POST", "inference", "/predictions/minilm", content=b"same archive")
    assert answers["torchgate"].status_code == answers["torchserve"].status_code == 200
    assert answers["torchgate"].json() == pytest.approx(answers["torchserve"].json(), abs=1e-5)


@pytest.mark.parametrize(
    ("api", "method", "path"),
    [
        ("inference", "POST", "/predictions/nope"),
        ("management", "GET", "/models/nope"),
        ("management", "GET", "/models/digits/9.9"),
    ],
)
def test_not_found_has_the_same_status_and_shape(
    servers: dict[str, Urls], api: str, method: str, path: str
) -> None:
    answers = both(servers, method, api, path, content=b"[]")
    assert answers["torchgate"].status_code == answers["torchserve"].status_code == 404
    ours, theirs = answers["torchgate"].json(), answers["torchserve"].json()
    assert set(ours) == set(theirs) == {"code", "type", "message"}
    assert ours["code"] == theirs["code"] == 404


def test_unknown_version_prediction(servers: dict[str, Urls]) -> None:
    answers = both(servers, "POST", "inference", "/predictions/digits/9.9", json=[0.0] * 64)
    assert answers["torchgate"].status_code == answers["torchserve"].status_code == 404


def test_oversized_body(servers: dict[str, Urls]) -> None:
    body = b"0" * 7_000_000  # over TorchServe's default max_request_size of 6553500
    answers = both(servers, "POST", "inference", "/predictions/digits", content=body)
    assert answers["torchgate"].status_code == answers["torchserve"].status_code == 413


def test_bounded_handler_inputs_answer_alike(servers: dict[str, Urls]) -> None:
    """The shipped handlers bound their inputs themselves, so in TorchServe too (which passes
    limit_max_image_pixels but none of torchgate's own limits: the handlers' defaults apply)."""
    bomb = both(servers, "POST", "inference", "/predictions/digits", content=png_bomb())
    assert bomb["torchgate"].status_code == bomb["torchserve"].status_code == 413
    assert bomb["torchgate"].json() == bomb["torchserve"].json()
    nan = "[" + ", ".join(["NaN"] * 64) + "]"
    answers = both(servers, "POST", "inference", "/predictions/digits", content=nan)
    assert answers["torchgate"].status_code == answers["torchserve"].status_code == 400
    assert answers["torchgate"].json() == answers["torchserve"].json()
    huge = " ".join(["tokens"] * 900_000).encode()  # 6.3 MB, under max_request_size
    texts = both(servers, "POST", "inference", "/predictions/minilm", content=huge)
    assert texts["torchgate"].status_code == texts["torchserve"].status_code == 200
    np.testing.assert_allclose(texts["torchgate"].json(), texts["torchserve"].json(), atol=1e-5)


def test_list_and_describe_models(servers: dict[str, Urls]) -> None:
    listed = both(servers, "GET", "management", "/models")
    assert listed["torchgate"].json() == listed["torchserve"].json()
    for path in ("/models/digits", "/models/digits/all", "/models/minilm/1.0"):
        answers = both(servers, "GET", "management", path)
        ours, theirs = answers["torchgate"].json(), answers["torchserve"].json()
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            for key in (
                "modelName",
                "modelVersion",
                "modelUrl",
                "minWorkers",
                "maxWorkers",
                "batchSize",
                "maxBatchDelay",
            ):
                assert a[key] == b[key], key
            assert [w["status"] for w in a["workers"]] == [w["status"] for w in b["workers"]]
            assert a["jobQueueStatus"].keys() == b["jobQueueStatus"].keys()


def test_model_api_is_off_by_default(servers: dict[str, Urls]) -> None:
    registered = both(servers, "POST", "management", "/models?url=digits.mar")
    deleted = both(servers, "DELETE", "management", "/models/minilm/1.0")
    for answers in (registered, deleted):
        assert answers["torchgate"].status_code == answers["torchserve"].status_code == 405


def test_set_default_to_a_missing_version(servers: dict[str, Urls]) -> None:
    answers = both(servers, "PUT", "management", "/models/digits/9.9/set-default")
    # TorchServe answers a missing version with 500 here; it is a client error, so torchgate
    # answers 404, as it does for every other unknown version.
    assert answers["torchserve"].status_code >= 400
    assert answers["torchgate"].status_code == 404


def test_malformed_json_body(servers: dict[str, Urls]) -> None:
    answers = both(
        servers,
        "POST",
        "inference",
        "/predictions/digits",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    # Both hand undecodable JSON to the handler as it came (a bytearray); torchgate's digits
    # handler refuses it as the client's mistake.
    assert answers["torchserve"].status_code >= 400
    assert answers["torchgate"].status_code == 400


def test_one_malformed_item_fails_alone_in_a_batch(servers: dict[str, Urls]) -> None:
    bodies = [json.dumps(DIGITS.data[i].tolist()).encode() for i in range(7)] + [b"[1, 2]"]

    async def burst(base: str) -> list[int]:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            replies = await asyncio.gather(
                *(
                    client.post(
                        "/predictions/digits",
                        content=body,
                        headers={"content-type": "application/json"},
                    )
                    for body in bodies
                )
            )
        return [r.status_code for r in replies]

    for name, urls in servers.items():
        # The example handler reports a bad item through set_response_status(400, ..., idx), so
        # in TorchServe too only that item fails. (A naive handler that raises would make
        # TorchServe fail all eight with 503; torchgate's batcher isolates per-item statuses.)
        assert asyncio.run(burst(urls.inference)) == [200] * 7 + [400], name


def test_ping_stays_healthy_with_a_model_scaled_to_zero(servers: dict[str, Urls]) -> None:
    """TorchServe counts a model's healthy workers against its minWorkers: scaled to 0 on
    purpose, it lacks nothing. Its predictions answer 503 on both until it is scaled back."""
    scaled = both(servers, "PUT", "management", "/models/digits?min_worker=0&synchronous=true")
    try:
        assert {r.status_code for r in scaled.values()} == {200}
        ping = both(servers, "GET", "inference", "/ping")
        assert {r.status_code for r in ping.values()} == {200}
        assert ping["torchgate"].json() == ping["torchserve"].json() == {"status": "Healthy"}
        refused = both(servers, "POST", "inference", "/predictions/digits", json=[0.0] * 64)
        assert refused["torchgate"].status_code == refused["torchserve"].status_code == 503
        described = both(servers, "GET", "management", "/models/digits")
        assert [d.json()[0]["workers"] for d in described.values()] == [[], []]
    finally:
        restored = both(
            servers, "PUT", "management", "/models/digits?min_worker=1&synchronous=true"
        )
    assert {r.status_code for r in restored.values()} == {200}
    served = both(servers, "POST", "inference", "/predictions/digits", json=[0.0] * 64)
    assert {r.status_code for r in served.values()} == {200}
