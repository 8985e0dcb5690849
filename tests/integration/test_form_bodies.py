"""Form bodies as a handler sees them, against real TorchServe 0.12 and torchgate side by side:
multipart fields' bytes, whatever the form's charset says; a form field named as a header the
frontend sets; and the differences, asserted as such (docs/compatibility.md,
docs/security.md): a multipart form with a charset Java does not know, which TorchServe
refuses, and a urlencoded form past torchgate's bound on fields, which TorchServe serves.
What the handler sees of every other request: test_worker_contract.py.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from api.rest.predictions import MAX_FORM_FIELDS
from tests.support.archives import PROBE_VALUE, build_archive
from tests.support.side_by_side import side_by_side

pytestmark = [pytest.mark.integration, pytest.mark.torchserve]

# Each input's type and bytes (latin-1, to survive JSON), and the headers under the inputs'
# names and the frontend's own.
PROBE = (
    PROBE_VALUE
    + """
    def handle(data, context):
        if data is None:
            return None
        answers = []
        for idx, row in enumerate(data):
            headers = context.get_all_request_header(idx)
            answers.append({
                "row": {name: _value(value) for name, value in row.items()},
                "headers": {
                    name: headers.get(name) for name in [*row, "explain", "url_path"]
                },
            })
        return answers
"""
)


def multipart(*parts: bytes, charset: str = "") -> dict[str, Any]:
    """httpx arguments for a multipart body of `parts` (each its headers, a blank line and its
    content), the form's charset as given."""
    body = b"".join(b"--B\r\n" + part + b"\r\n" for part in parts) + b"--B--\r\n"
    content_type = "multipart/form-data; boundary=B" + (f"; charset={charset}" if charset else "")
    return {"content": body, "headers": {"Content-Type": content_type}}


def field(name: str, value: bytes, *headers: bytes) -> bytes:
    disposition = f'Content-Disposition: form-data; name="{name}"'.encode()
    return b"\r\n".join([disposition, *headers, b"", value])


UTF8_TEXT = field("t", "é".encode())
LATIN1_TEXT = field("l", b"\xe9")
BINARY = field("x", b"\xff\xd8\xff\x00", b"Content-Type: application/octet-stream")
TEXT_TYPED = field("j", b'{"k": 1}', b"Content-Type: application/json")
UNTYPED_FILE = b'Content-Disposition: form-data; name="f"; filename="f.bin"\r\n\r\n\xff'

# (label, method, path, httpx keyword arguments)
REQUESTS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("fields, no charset", "POST", "/predictions/probe", multipart(UTF8_TEXT, LATIN1_TEXT)),
    (
        "fields, latin-1 charset",
        "POST",
        "/predictions/probe",
        multipart(UTF8_TEXT, LATIN1_TEXT, charset="ISO-8859-1"),
    ),
    ("binary field", "POST", "/predictions/probe", multipart(BINARY, TEXT_TYPED)),
    ("file without a content type", "POST", "/predictions/probe", multipart(UNTYPED_FILE)),
    (
        "a field named explain",
        "POST",
        "/explanations/probe",
        {"data": {"explain": "1"}, "files": {"d": ("d", b"x", "text/plain")}},
    ),
    (
        "fields named as the frontend's headers",
        "POST",
        "/predictions/probe/1.0/more",
        {"data": {"explain": "True", "url_path": "v1/x", "k": "v"}},
    ),
]

URLENCODED = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture(scope="module")
def answers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    work = tmp_path_factory.mktemp("form-bodies")
    store = work / "store"
    store.mkdir()
    build_archive(work, "probe", "handler.py", {"handler.py": PROBE}, export_dir=store)
    with side_by_side(store, {"default_workers_per_model": "1"}) as servers:
        return {name: _ask(ends.inference) for name, ends in servers.items()}


def _ask(url: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    with httpx.Client(base_url=url, timeout=60) as client:
        for label, method, path, kwargs in REQUESTS:
            response = client.request(method, path, **kwargs)
            body = response.json()
            seen[label] = (response.status_code, body[0] if isinstance(body, list) else body)
        many = b"&".join(b"f%d=v" % n for n in range(MAX_FORM_FIELDS + 1))
        response = client.post("/predictions/probe", content=many, headers=URLENCODED)
        seen["too many fields"] = (response.status_code, response.json())
        # Python's name for latin-1, not Java's: TorchServe knows no such charset.
        unknown = multipart(UTF8_TEXT, LATIN1_TEXT, charset="latin-1")
        response = client.post("/predictions/probe", **unknown)
        seen["unknown charset"] = (response.status_code, response.json())
    return seen


@pytest.mark.parametrize("label", [label for label, *_ in REQUESTS])
def test_the_handler_sees_what_torchserve_s_handler_sees(
    answers: dict[str, dict[str, Any]], label: str
) -> None:
    assert answers["torchgate"][label] == answers["torchserve"][label]


def test_a_field_s_bytes_are_passed_as_sent(answers: dict[str, dict[str, Any]]) -> None:
    for label in ("fields, no charset", "fields, latin-1 charset"):
        status, seen = answers["torchserve"][label]
        assert status == 200
        assert seen["row"]["t"] == ["bytearray", "é".encode().decode("latin-1")]
        assert seen["row"]["l"] == ["bytearray", "\xe9"]


def test_a_form_with_an_unknown_charset_is_served_where_torchserve_refuses_it(
    answers: dict[str, dict[str, Any]],
) -> None:
    # Differs (docs/compatibility.md): TorchServe answers Java's UnsupportedCharsetException.
    status, seen = answers["torchserve"]["unknown charset"]
    assert status == 403 and seen["type"] == "UnsupportedCharsetException"
    status, seen = answers["torchgate"]["unknown charset"]
    assert status == 200 and seen["row"] == answers["torchgate"]["fields, no charset"][1]["row"]


def test_the_frontend_s_headers_win_over_fields(answers: dict[str, dict[str, Any]]) -> None:
    status, seen = answers["torchserve"]["a field named explain"]
    assert status == 200 and seen["headers"]["explain"] == "True"
    status, seen = answers["torchserve"]["fields named as the frontend's headers"]
    assert status == 200
    assert seen["headers"]["explain"] == "False" and seen["headers"]["url_path"] == "more"


def test_a_form_past_the_bound_on_fields_is_400_where_torchserve_serves_it(
    answers: dict[str, dict[str, Any]],
) -> None:
    # Differs (docs/security.md): TorchServe 0.12 (netty 4.1.53) bounds no form's fields.
    status, seen = answers["torchserve"]["too many fields"]
    assert status == 200 and len(seen["row"]) == MAX_FORM_FIELDS + 1
    status, seen = answers["torchgate"]["too many fields"]
    assert status == 400 and "Maximum number of fields is 1000" in seen["message"]
