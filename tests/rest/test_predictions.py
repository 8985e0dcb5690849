"""`POST /predictions/{model}[/{version}]` in process (`api.rest.predictions`): routing,
TorchServe's request items, the answer's headers and error bodies. Fake archives answer with
the version that served them (tests/support/fake_backend.py); no worker process runs."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from api.core.types import Prediction
from api.encoding import Encoded, encode_prediction
from api.errors import BadRequest
from api.rest import predictions
from api.rest.invocations import is_invocation_path
from api.rest.predictions import (
    MAX_FORM_FIELDS,
    PARSE_IN_THREAD_BYTES,
    RequestItem,
    request_item,
)
from tests.support.aio import run
from tests.support.fake_backend import load_fake_backend, write_fake_archive
from tests.support.inprocess import started_torchgate


@asynccontextmanager
async def serving(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    store = tmp_path / "model_store"
    archives = [write_fake_archive(store, "m", v) for v in ("1.0", "2.0")]
    archives.append(write_fake_archive(store, "broken", "1.0", fail=True))
    config = {"model_store": str(store), "load_models": ",".join(archives)}
    async with started_torchgate(tmp_path, config, load_fake_backend) as serving:
        transport = httpx.ASGITransport(app=serving.tg.inference_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://torchgate") as client:
            yield client


def test_the_default_or_the_named_version_answers_and_says_which(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            default = await client.post("/predictions/m", json={"x": 1})
            assert default.status_code == 200
            assert default.json() == {"model": "m", "version": "1.0", "body": {"x": 1}}
            assert default.headers["x-model-version"] == "1.0"
            assert default.headers["content-type"] == "application/json"
            named = await client.post("/predictions/m/2.0", content=b"raw")
            assert named.json()["version"] == "2.0" and named.json()["body"] == "raw"
            assert named.headers["x-model-version"] == "2.0"

    run(scenario())


def test_unknown_models_versions_and_paths_are_torchserve_404s(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            for path in ("/predictions/nope", "/predictions/m/9.9", "/predictions/m/9.9/extra"):
                answer = await client.post(path, content=b"1")
                assert answer.status_code == 404, path
                assert set(answer.json()) == {"code", "type", "message"}

    run(scenario())


def test_a_failing_handler_is_500_and_the_server_keeps_serving(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            failed = await client.post("/predictions/broken", content=b"1")
            assert failed.status_code == 500 and failed.json()["code"] == 500
            assert (await client.post("/predictions/m", content=b"1")).status_code == 200

    run(scenario())


def test_malformed_json_reaches_the_handler_as_it_came(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            answer = await client.post(
                "/predictions/m", content=b"{", headers={"content-type": "application/json"}
            )
            # As TorchServe's worker: not decoded, passed on (a bytearray) with a warning.
            assert answer.status_code == 200 and answer.json()["body"] == "{"

    run(scenario())


def test_a_path_below_the_version_is_the_url_path_header(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            answer = await client.post("/predictions/m/2.0/v1/chat/completions", content=b"x")
            assert answer.status_code == 200 and answer.json()["version"] == "2.0"

    run(scenario())


def items(query: bytes, body: bytes, content_type: str, *, takes_query: bool) -> RequestItem:
    scope = {"query_string": query}
    headers = {"content-type": content_type} if content_type else {}
    return run(request_item(scope, body, headers, query=takes_query))


def test_the_body_goes_as_bytes_with_its_media_type() -> None:
    item = items(b"", b'{"x": 1}', "application/json; charset=utf-8", takes_query=False)
    assert item == RequestItem({"body": b'{"x": 1}'}, {"body": "application/json"})
    assert items(b"", b"\x00", "", takes_query=False) == RequestItem({"body": b"\x00"}, {})


def test_query_parameters_join_the_item_only_where_the_path_takes_them() -> None:
    # /predictions drops them, as TorchServe; /invocations and the others pass them as bytes.
    assert items(b"top_k=3", b"x", "text/plain", takes_query=False).inputs == {"body": b"x"}
    taken = items(b"top_k=3&empty=", b"x", "text/plain", takes_query=True)
    assert taken.inputs == {"top_k": b"3", "empty": b"", "body": b"x"}
    assert taken.types == {"body": "text/plain"}


@pytest.mark.parametrize(
    ("path", "taken"),
    [
        ("/invocations", True),
        ("/invocations/", True),
        ("/models/m/invoke", True),
        ("/m/predict", True),
        ("/m/1.0/predict", True),
        ("/invocations/x", False),
        ("/models/m/predict", False),
        ("/ping/predict", False),
        ("/predictions/predict", False),
        ("/m/1.0/x/predict", False),
    ],
)
def test_invocation_paths(path: str, taken: bool) -> None:
    assert is_invocation_path(path) is taken


@pytest.mark.parametrize(
    ("prediction", "status", "payload", "content_type"),
    [
        (Prediction({"a": 1}), 200, b'{"a":1}', "application/json"),
        (Prediction("text"), 200, b"text", "text/plain; charset=utf-8"),
        (Prediction(b"\x01"), 200, b"\x01", "application/octet-stream"),
        (
            Prediction(b"<x/>", headers={"Content-Type": "application/xml"}),
            200,
            b"<x/>",
            "application/xml",
        ),
    ],
)
def test_handler_outputs_are_encoded_as_torchserve_sends_them(
    prediction: Prediction, status: int, payload: bytes, content_type: str
) -> None:
    assert encode_prediction(prediction) == Encoded(
        status, payload, [("content-type", content_type)]
    )


def test_headers_that_frame_the_answer_are_the_servers_own() -> None:
    """A handler's Content-Length or Transfer-Encoding went out beside the server's own: two
    framings of one answer, which clients and proxies read each their own way."""
    headers = {
        "Content-Length": "999",
        "transfer-encoding": "chunked",
        "Connection": "close",
        "x-kept": "yes",
    }
    encoded = encode_prediction(Prediction(b"ok", headers=headers))
    assert encoded.headers == [("x-kept", "yes"), ("content-type", "application/octet-stream")]


def form(fields: int) -> bytes:
    return b"&".join(b"f%d=v" % n for n in range(fields))


def test_a_urlencoded_form_of_more_than_1000_fields_is_400(tmp_path: Path) -> None:
    # As Starlette bounds a multipart form; TorchServe has no bound (docs/security.md).
    async def scenario() -> None:
        async with serving(tmp_path) as client:
            urlencoded = {"content-type": "application/x-www-form-urlencoded"}
            # Pieces without `=` are dropped, as TorchServe drops them: they do not count.
            fitting = form(MAX_FORM_FIELDS) + b"&" * 5000
            answer = await client.post("/predictions/m", content=fitting, headers=urlencoded)
            assert answer.status_code == 200
            over = await client.post(
                "/predictions/m", content=form(MAX_FORM_FIELDS + 1), headers=urlencoded
            )
            assert over.status_code == 400
            assert "Maximum number of fields is 1000" in over.json()["message"]

    run(scenario())


def test_a_large_urlencoded_form_is_parsed_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threads: list[threading.Thread] = []

    def recorded(body: bytes) -> list[tuple[str, bytes]]:
        threads.append(threading.current_thread())
        return parse(body)

    parse = predictions._urlencoded
    monkeypatch.setattr(predictions, "_urlencoded", recorded)
    large = b"a=%C3%A9&b=" + b"x" * PARSE_IN_THREAD_BYTES + b"&c=1+2&d"
    item = items(b"", large, "application/x-www-form-urlencoded", takes_query=False)
    assert item == RequestItem({"a": "é".encode(), "b": b"x" * PARSE_IN_THREAD_BYTES, "c": b"1 2"})
    small = items(b"", b"a=1", "application/x-www-form-urlencoded", takes_query=False)
    assert small == RequestItem({"a": b"1"})
    # The large form in a thread of its own, the small one on the event loop's.
    assert threads[0] is not threading.main_thread()
    assert threads[1] is threading.main_thread()


def multipart(*parts: bytes, charset: str = "") -> tuple[bytes, str]:
    """A multipart body of `parts` (each its headers, a blank line and its content)."""
    body = b"".join(b"--B\r\n" + part + b"\r\n" for part in parts) + b"--B--\r\n"
    return body, "multipart/form-data; boundary=B" + (f"; charset={charset}" if charset else "")


def test_multipart_fields_reach_the_handler_as_the_bytes_sent() -> None:
    # As TorchServe's frontend passes a part without a filename: its bytes, whatever the
    # form's charset says, with no content type of its own.
    text = b'Content-Disposition: form-data; name="t"\r\n\r\n' + "é".encode()
    binary = (
        b'Content-Disposition: form-data; name="x"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n\xff\xd8\xff\x00"
    )
    latin = b'Content-Disposition: form-data; name="l"\r\n\r\n\xe9'
    file = (
        b'Content-Disposition: form-data; name="f"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n\xff"
    )
    for charset in ("", "bogus", "utf-8", "latin-1"):
        body, content_type = multipart(text, binary, latin, file, charset=charset)
        item = items(b"", body, content_type, takes_query=False)
        assert item == RequestItem(
            {"t": b"\xc3\xa9", "x": b"\xff\xd8\xff\x00", "l": b"\xe9", "f": b"\xff"},
            {"f": "image/png"},
        ), charset
        assert list(item.inputs) == ["t", "x", "l", "f"]  # in the order sent


def test_a_file_sent_without_a_content_type_is_octet_stream() -> None:
    # Netty's default, which TorchServe's frontend hands to the worker.
    file = b'Content-Disposition: form-data; name="f"; filename="a.bin"\r\n\r\n\xff'
    item = items(b"", *multipart(file), takes_query=False)
    assert item == RequestItem({"f": b"\xff"}, {"f": "application/octet-stream"})


def test_multipart_keeps_starlette_s_limits() -> None:
    field = b'Content-Disposition: form-data; name="a"\r\n\r\n1'
    body, content_type = multipart(*[field] * 1001)
    with pytest.raises(BadRequest, match="Maximum number of fields is 1000"):
        items(b"", body, content_type, takes_query=False)
