"""The workflow routes in process, through the real app factory, ModelLoader and .war reader,
with fake backends standing in for worker processes (function nodes included)."""

from __future__ import annotations

import functools
import json
import zipfile
from pathlib import Path

import httpx

from api.app import build
from api.config import parse_config
from api.core.types import ModelSettings
from api.core.workflow import WORKFLOW_KEY
from tests.support import aio
from tests.support.fake_backend import FakeBackend, load_fake_backend, write_fake_archive
from tests.support.inprocess import started_torchgate

run = functools.partial(aio.run, timeout=30)

SPEC = "models:\n  m:\n    url: m.mar\n    batch-size: 4\ndag:\n  pre: [m]\n  m: [post]\n"


async def load(
    path: Path, settings: ModelSettings, work_dir: Path, name: str | None = None
) -> FakeBackend:
    """Fake archives, and the model directories torchgate writes for function nodes."""
    if path.is_dir():
        manifest = json.loads((path / "MAR-INF" / "MANIFEST.json").read_text())
        assert manifest["model"]["handler"] == f"wf_handler.py:{path.name}"
        return FakeBackend(manifest["model"]["modelName"], "1.0")
    return await load_fake_backend(path, settings, work_dir)


def write_war(store: Path) -> None:
    store.mkdir(parents=True)
    manifest = {
        "workflow": {"workflowName": "wf", "specFile": "wf.yaml", "handler": "wf_handler.py"}
    }
    with zipfile.ZipFile(store / "wf.war", "w") as archive:
        archive.writestr("WAR-INF/MANIFEST.json", json.dumps(manifest))
        archive.writestr("wf.yaml", SPEC)
        archive.writestr("wf_handler.py", "def pre(data, context):\n    return data\n")


def test_register_run_and_unregister_in_process(tmp_path: Path) -> None:
    write_fake_archive(tmp_path / "model_store", "m", "1.0", file_name="m.mar")
    write_war(tmp_path / "wars")

    async def scenario() -> None:
        config = {"workflow_store": str(tmp_path / "wars")}
        async with started_torchgate(tmp_path, config, load) as started:
            tg = started.tg
            management = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=tg.management_app),
                base_url="http://127.0.0.1:8081",
            )
            inference = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=tg.inference_app),
                base_url="http://127.0.0.1:8080",
            )
            answer = await management.post("/workflows", params={"url": "wf.war"})
            assert answer.status_code == 200, answer.text
            node = tg.registry.get("wf__m")
            assert node.settings.batch_size == 4 and node.backend_info[WORKFLOW_KEY] == "wf"
            assert tg.registry.get("wf__pre").url == "wf.war:pre"

            answer = await inference.post("/wfpredict/wf", content=b"hello")
            assert answer.status_code == 200, answer.text
            assert answer.headers["content-type"] == "application/json"
            post = answer.json()
            assert post["model"] == "wf__post"
            middle = json.loads(post["body"])  # the model node's answer, handed on as bytes
            assert middle["model"] == "m"  # the fake archive names its own model
            assert json.loads(middle["body"]) == {
                "model": "wf__pre",
                "version": "1.0",
                "body": "hello",
            }

            described = (await management.get("/workflows/wf")).json()
            assert described[0]["workflowDag"] == "{pre=[m], m=[post]}"
            answer = await management.delete("/workflows/wf")
            assert answer.json() == {"status": 'Workflow "wf" unregistered'}
            assert tg.registry.names() == []
            answer = await inference.post("/wfpredict/wf", content=b"hello")
            assert answer.status_code == 404
            assert answer.json()["type"] == "WorkflowNotFoundException"

    run(scenario())


def test_a_node_whose_model_name_is_taken_fails_the_workflow_and_leaves_that_model(
    tmp_path: Path,
) -> None:
    """Added beside a model already named `wf__m` as a version of it, the node was not its
    default: /wfpredict went to the model already there, and DELETE /workflows/wf tried to
    remove that model's default version (refused), leaving the node's own version behind."""
    write_fake_archive(tmp_path / "model_store", "m", "1.0", file_name="m.mar")
    write_fake_archive(tmp_path / "model_store", "wf__m", "2.0", file_name="taken.mar")
    write_war(tmp_path / "wars")

    async def scenario() -> None:
        config = {"workflow_store": str(tmp_path / "wars"), "load_models": "taken.mar"}
        async with started_torchgate(tmp_path, config, load) as started:
            tg = started.tg
            management = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=tg.management_app),
                base_url="http://127.0.0.1:8081",
            )
            answer = await management.post("/workflows", params={"url": "wf.war"})
            assert answer.status_code == 500, answer.text
            assert "Model wf__m is already registered" in answer.json()["message"]
            assert tg.registry.names() == ["wf__m"]
            assert [v.version for v in tg.registry.versions("wf__m")] == ["2.0"]

    run(scenario())


def test_wfpredict_needs_the_inference_key_and_the_factory_takes_a_store(tmp_path: Path) -> None:
    raw = {
        "model_store": str(tmp_path / "model_store"),
        "torchgate.key_file": str(tmp_path / "keys.json"),
        "torchgate.snapshot_file": "",
    }
    tg = build(
        parse_config(raw, base_dir=tmp_path),
        work_dir=tmp_path / "work",
        backend_loader=load,
        access_log=False,
        workflow_store=tmp_path / "wars",
    )
    assert tg.config.workflow_store == tmp_path / "wars"
    assert tg.auth is not None

    async def scenario() -> None:
        inference = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=tg.inference_app), base_url="http://127.0.0.1:8080"
        )
        answer = await inference.post("/wfpredict/wf", content=b"x")
        assert answer.status_code == 401
        key = {"Authorization": f"Bearer {tg.auth.key('inference')}"}  # type: ignore[union-attr]
        answer = await inference.post("/wfpredict/wf", content=b"x", headers=key)
        assert answer.status_code == 404  # past the key check: no such workflow
        await tg.stop()

    run(scenario())
