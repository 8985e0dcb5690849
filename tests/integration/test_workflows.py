"""Workflows against real TorchServe 0.12 and torchgate side by side: the same `.war` (built
with torch-workflow-archiver, as TorchServe's examples/Workflows are) and the same tiny `.mar`
archives, the same requests; status codes and bodies must match.

The workflow `fan` has a sequential step and a parallel fan-out whose branches meet in an
aggregate function, with as few nodes as that takes (TorchServe starts a worker per node, and
that is most of this module's time): `pre -> [add, agg]`, `add -> [agg]`; `pre` and `agg` are
functions of the workflow handler, `add` a model. The handlers report the types they received,
so the test also pins what each node's input looks like (bytearrays, named after the parent
for an aggregate).
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.archives import build_archive, run_archiver
from tests.support.server import running_torchgate
from tests.support.torchserve import running_torchserve

pytestmark = [pytest.mark.integration, pytest.mark.torchserve]

WORKFLOW_ARCHIVER = Path(sys.executable).with_name("torch-workflow-archiver")

MODEL = """
    import json

    def handle(data, context):
        if data is None:
            return None
        out = []
        for row in data:
            x = row.get("data") or row.get("body")
            seen = type(x).__name__
            if isinstance(x, (bytes, bytearray)):
                x = json.loads(x)
            out.append({"value": x["value"] + 1, "seen": seen, "keys": sorted(row)})
        return out
"""

HANDLER = """
    import json

    def pre(data, context):
        if data:
            out = []
            for row in data:
                x = row.get("data") or row.get("body")
                if isinstance(x, (bytes, bytearray)):
                    x = json.loads(x)
                out.append({"value": x["value"], "pre_seen": type(x).__name__})
            return out

    def agg(data, context):
        if data:
            return [
                {k: [type(v).__name__, json.loads(v)] for k, v in sorted(row.items())}
                for row in data
            ]
"""

SPEC = """
    models:
        min-workers: 1
        max-workers: 1
        batch-size: 1
        max-batch-delay: 50
        retry-attempts: 1
        timeout-ms: 5000
        add:
            url: wf_add.mar
            batch-size: 2
            max-batch-delay: 10
    dag:
        pre: [add, agg]
        add: [agg]
"""

MISSING_MODEL_SPEC = """
    models:
        m:
            url: nope.mar
    dag:
        m: []
"""

BAD_SPEC = """
    models:
        add:
            url: wf_add.mar
    dag:
        pre: [add]
        agg: [add]
"""


def build_war(workdir: Path, name: str, spec: str, handler: str, export: Path) -> Path:
    src = workdir / f"war-{name}"
    src.mkdir()
    (src / f"{name}.yaml").write_text(textwrap.dedent(spec))
    (src / f"{name}_handler.py").write_text(textwrap.dedent(handler))
    command = [
        str(WORKFLOW_ARCHIVER),
        "--workflow-name", name,
        "--spec-file", str(src / f"{name}.yaml"),
        "--handler", str(src / f"{name}_handler.py"),
        "--export-path", str(export),
        "-f",
    ]  # fmt: skip
    run_archiver(command, workdir)
    return export / f"{name}.war"


@dataclass(frozen=True)
class Urls:
    inference: str
    management: str


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Urls]]:
    if not WORKFLOW_ARCHIVER.exists():
        pytest.skip("torch-workflow-archiver is not installed (pip install -e .[dev])")
    workdir = tmp_path_factory.mktemp("workflows")
    models, wars = workdir / "models", workdir / "wars"
    models.mkdir()
    wars.mkdir()
    build_archive(workdir, "wf_add", "model.py", {"model.py": MODEL}, export_dir=models)
    build_war(workdir, "fan", SPEC, HANDLER, wars)
    build_war(workdir, "bad", BAD_SPEC, HANDLER, wars)
    build_war(workdir, "missing", MISSING_MODEL_SPEC, HANDLER, wars)
    with ExitStack() as stack, ThreadPoolExecutor(2) as pool:
        # Started side by side: each waits for its own Python processes.
        ts_started = pool.submit(
            stack.enter_context,
            running_torchserve(models, extra_config={"workflow_store": str(wars)}),
        )
        tg_started = pool.submit(
            stack.enter_context,
            running_torchgate(f"model_store={models}\nworkflow_store={wars}\n"),
        )
        both_started: list[Future[Any]] = [ts_started, tg_started]
        wait(both_started)  # both entered (or failed) before the stack may unwind
        ts, tg = ts_started.result(), tg_started.result()
        yield {
            "torchserve": Urls(ts.inference_url, ts.management_url),
            "torchgate": Urls(tg.inference_url, tg.management_url),
        }


def both(
    servers: dict[str, Urls], method: str, api: str, path: str, **kwargs: object
) -> dict[str, httpx.Response]:
    """The same request to both servers at once (registrations start workers on both)."""

    def send(urls: Urls) -> httpx.Response:
        base = urls.inference if api == "inference" else urls.management
        return httpx.request(method, base + path, timeout=120, **kwargs)  # type: ignore[arg-type]

    with ThreadPoolExecutor(len(servers)) as pool:
        futures = {name: pool.submit(send, urls) for name, urls in servers.items()}
        return {name: future.result() for name, future in futures.items()}


def same(answers: dict[str, httpx.Response], status: int) -> object:
    """Both answered `status` with the same JSON body; returns it."""
    ts, tg = answers["torchserve"], answers["torchgate"]
    assert (ts.status_code, ts.json()) == (tg.status_code, tg.json()), (ts.text, tg.text)
    assert tg.status_code == status
    assert tg.headers["content-type"].startswith("application/json")
    return tg.json()


def test_workflow_lifecycle(servers: dict[str, Urls]) -> None:
    """Register (without enable_model_api, as TorchServe allows), list, describe, run,
    refuse a second registration, unregister; each step answered as TorchServe answers it."""
    body = same(both(servers, "POST", "management", "/workflows?url=fan.war"), 200)
    assert body == {"status": "Workflow fan has been registered and scaled successfully."}

    conflict = same(both(servers, "POST", "management", "/workflows?url=fan.war"), 409)
    assert conflict == {
        "code": 409,
        "type": "ConflictStatusException",
        "message": "Workflow fan is already registered.",
    }

    listed = same(both(servers, "GET", "management", "/workflows"), 200)
    assert listed == {"workflows": [{"workflowName": "fan", "workflowUrl": "fan.war"}]}
    page = same(both(servers, "GET", "management", "/workflows?limit=1&next_page_token=0"), 200)
    assert page == {"nextPageToken": "1", "workflows": listed["workflows"]}

    described = same(both(servers, "GET", "management", "/workflows/fan"), 200)
    assert described == [
        {
            "workflowName": "fan",
            "workflowUrl": "fan.war",
            "minWorkers": 1,
            "maxWorkers": 1,
            "batchSize": 1,
            "maxBatchDelay": 50,
            "workflowDag": "{pre=[add, agg], add=[agg]}",
        }
    ]

    # The model nodes are models named {workflow}__{node}, with the spec's per-node settings.
    for answer in both(servers, "GET", "management", "/models/fan__add").values():
        model = answer.json()[0]
        assert (model["modelName"], model["modelUrl"]) == ("fan__add", "wf_add.mar")
        assert (model["batchSize"], model["maxBatchDelay"]) == (2, 10)

    result = same(both(servers, "POST", "inference", "/wfpredict/fan", json={"value": 3}), 200)
    assert result == {
        "add": ["bytearray", {"value": 4, "seen": "bytearray", "keys": ["body"]}],
        "pre": ["bytearray", {"value": 3, "pre_seen": "dict"}],
    }
    form = both(servers, "POST", "inference", "/wfpredict/fan", files={"data": b'{"value": 1}'})
    assert same(form, 200) == {
        "add": ["bytearray", {"value": 2, "seen": "bytearray", "keys": ["body"]}],
        "pre": ["bytearray", {"value": 1, "pre_seen": "dict"}],
    }

    # A node that raises (pre cannot read this body) fails the request as TorchServe's does.
    failed = same(both(servers, "POST", "inference", "/wfpredict/fan", content=b"not json"), 500)
    assert failed == {
        "code": 500,
        "type": "InternalServerException",
        "message": "Error executing pre",
    }

    gone = same(both(servers, "DELETE", "management", "/workflows/fan"), 200)
    assert gone == {"status": 'Workflow "fan" unregistered'}
    for answer in both(servers, "GET", "management", "/models/fan__add").values():
        assert answer.status_code == 404  # the nodes went with it
    missing = same(both(servers, "POST", "inference", "/wfpredict/fan", json={"value": 3}), 404)
    assert missing == {
        "code": 404,
        "type": "WorkflowNotFoundException",
        "message": "Workflow not found: fan",
    }
    same(both(servers, "DELETE", "management", "/workflows/fan"), 404)
    assert same(both(servers, "GET", "management", "/workflows"), 200) == {"workflows": []}


NOT_IN_STORE = "Workflow not found in workflow store: nope.war"


@pytest.mark.parametrize(
    ("query", "status", "error"),
    [
        ("url=bad.war", 400, ("InvalidDAGException", "DAG should have only one start node")),
        ("url=nope.war", 404, ("WorkflowNotFoundException", NOT_IN_STORE)),
        ("", 400, ("BadRequestException", "Parameter url is required.")),
    ],
)  # fmt: skip
def test_register_errors(
    servers: dict[str, Urls], query: str, status: int, error: tuple[str, str]
) -> None:
    body = same(both(servers, "POST", "management", f"/workflows?{query}"), status)
    assert body == {"code": status, "type": error[0], "message": error[1]}


def test_describe_unknown_and_wrong_method(servers: dict[str, Urls]) -> None:
    missing = same(both(servers, "GET", "management", "/workflows/nope"), 404)
    assert missing == {
        "code": 404,
        "type": "WorkflowNotFoundException",
        "message": "Workflow not found: nope",
    }
    not_allowed = same(both(servers, "PUT", "management", "/workflows/nope"), 405)
    assert json.dumps(not_allowed).count("MethodNotAllowedException") == 1


def test_a_node_that_cannot_register_fails_the_workflow(servers: dict[str, Urls]) -> None:
    answers = both(servers, "POST", "management", "/workflows?url=missing.war")
    for answer in answers.values():
        assert answer.status_code == 500, answer.text
        body = answer.json()
        assert (body["code"], body["type"]) == (500, "WorkflowException")
        # The details name the archive each server could not find, in its own words.
        assert body["message"].startswith(
            "Workflow missing has failed to register. Failures: [Workflow Node missing__m "
            "failed to register. Details: "
        )
        assert "nope.mar" in body["message"]
    assert same(both(servers, "GET", "management", "/workflows/missing"), 404)
