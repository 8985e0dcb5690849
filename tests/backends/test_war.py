"""Workflow archives: torch-workflow-archiver's output opens, broken ones are refused with a
400 naming the problem, function nodes become model directories, and urls resolve only inside
the workflow store."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest

from api.backends.archive import open_archive
from api.backends.war import function_model, open_war
from api.config import Config, parse_config
from api.core.registry import Registry
from api.core.routing import TrafficRouter
from api.core.types import Backend, ModelSettings, NullObserver
from api.core.workflow import WORKFLOW_KEY
from api.errors import BadRequest, InvalidWorkflow, WorkflowNotFound, http_status
from api.model_loader import ModelLoader
from api.snapshot import capture
from api.workflow_loader import WorkflowLoader
from tests.support import aio
from tests.support.archives import run_archiver
from tests.support.echo_backend import EchoBackend, factory

WORKFLOW_ARCHIVER = Path(sys.executable).with_name("torch-workflow-archiver")
SPEC = "models:\n  m:\n    url: m.mar\ndag:\n  pre: [m]\n"
HANDLER = "def pre(data, context):\n    return data\n"


@pytest.fixture
def war(tmp_path: Path) -> Path:
    if not WORKFLOW_ARCHIVER.exists():
        pytest.skip("torch-workflow-archiver is not installed (pip install -e .[dev])")
    (tmp_path / "wf.yaml").write_text(SPEC)
    (tmp_path / "wf_handler.py").write_text(HANDLER)
    (tmp_path / "store").mkdir()
    command = [
        str(WORKFLOW_ARCHIVER),
        "--workflow-name", "wf",
        "--spec-file", str(tmp_path / "wf.yaml"),
        "--handler", str(tmp_path / "wf_handler.py"),
        "--export-path", str(tmp_path / "store"),
    ]  # fmt: skip
    run_archiver(command, tmp_path)
    return tmp_path / "store" / "wf.war"


def test_open_war_reads_the_archivers_output(war: Path, tmp_path: Path) -> None:
    archive = open_war(war, tmp_path / "work")
    assert archive.name == "wf"
    assert archive.spec == {"models": {"m": {"url": "m.mar"}}, "dag": {"pre": ["m"]}}
    assert archive.handler.read_text() == HANDLER
    assert open_war(war, tmp_path / "work", name="renamed").name == "renamed"
    model_dir = function_model(archive, "pre", "wf__pre")
    opened = open_archive(model_dir)
    assert (opened.name, opened.handler.spec) == ("wf__pre", "wf_handler.py:pre")
    # Another node's directory shares the files (hard links), not copies of them.
    other = function_model(archive, "post", "wf__post")
    handler = "wf_handler.py"
    assert (other / handler).stat().st_ino == (model_dir / handler).stat().st_ino
    archive.remove()
    assert not archive.directory.exists()


def zip_with(path: Path, members: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return path


MANIFEST = json.dumps(
    {"workflow": {"workflowName": "wf", "specFile": "wf.yaml", "handler": "h.py"}}
)


@pytest.mark.parametrize(
    ("members", "problem"),
    [
        ({"wf.yaml": SPEC}, "missing WAR-INF/MANIFEST.json"),
        ({"WAR-INF/MANIFEST.json": "{"}, "is not JSON"),
        ({"WAR-INF/MANIFEST.json": "{}"}, 'has no "workflow"'),
        ({"WAR-INF/MANIFEST.json": MANIFEST.replace("wf.yaml", "x.yaml")}, "specFile 'x.yaml'"),
        ({"WAR-INF/MANIFEST.json": MANIFEST, "wf.yaml": ":\n  - ]["}, "not valid YAML"),
        ({"WAR-INF/MANIFEST.json": MANIFEST, "../evil": "x"}, "evil"),
    ],
)
def test_broken_archives_are_refused(tmp_path: Path, members: dict[str, str], problem: str) -> None:
    members = {"h.py": HANDLER, "wf.yaml": SPEC, **members}
    path = zip_with(tmp_path / "wf.war", members)
    with pytest.raises(InvalidWorkflow) as info:
        open_war(path, tmp_path / "work")
    assert problem in info.value.message and http_status(info.value) == 400
    assert not any((tmp_path / "work").glob("*"))  # nothing left behind


def test_not_a_zip_and_a_bad_name_are_refused(war: Path, tmp_path: Path) -> None:
    (tmp_path / "text.war").write_text("hello")
    with pytest.raises(InvalidWorkflow):
        open_war(tmp_path / "text.war", tmp_path / "work")
    with pytest.raises(InvalidWorkflow, match="invalid workflow name"):
        open_war(war, tmp_path / "work", name="../up")


def loader_for(config: Config, work: Path) -> WorkflowLoader:
    registry = Registry(NullObserver())
    return WorkflowLoader(ModelLoader(config, registry, work, factory_loader), work)


async def factory_loader(path: Path, settings: ModelSettings, work: Path) -> Backend:
    raise AssertionError("not used")


def test_urls_resolve_inside_the_workflow_store_only(war: Path, tmp_path: Path) -> None:
    store = war.parent
    host = loader_for(Config(model_store=tmp_path / "models", workflow_store=store), tmp_path)
    assert host.resolve("wf.war") == war.resolve()
    for url in ("nope.war", "../wf.yaml", str(tmp_path / "wf.yaml"), "file:///etc/passwd"):
        with pytest.raises(WorkflowNotFound, match="Workflow not found in workflow store"):
            host.resolve(url)
    for url in ("https://example.com/wf.war", "ftp://x/wf.war", "wf\x00.war", "a" * 300):
        with pytest.raises(BadRequest):
            host.resolve(url)
    # Without workflow_store, TorchServe's default: the model store.
    assert loader_for(Config(model_store=store), tmp_path).resolve("wf.war") == war.resolve()


def test_snapshots_leave_workflow_nodes_out() -> None:
    async def scenario() -> dict[str, object]:
        registry = Registry(NullObserver())
        settings = ModelSettings()
        await registry.register("plain", "1.0", "plain.mar", factory(EchoBackend("1.0")), settings)
        await registry.register(
            "wf__m",
            "1.0",
            "m.mar",
            factory(EchoBackend("1.0")),
            settings,
            backend_info={WORKFLOW_KEY: "wf"},
        )
        try:
            return capture(registry, TrafficRouter(registry))
        finally:
            await registry.close()

    assert list(aio.run(scenario())["models"]) == ["plain"]  # type: ignore[call-overload]


def test_workflow_store_key(tmp_path: Path) -> None:
    assert parse_config({}, base_dir=tmp_path).workflow_store is None
    relative = parse_config({"workflow_store": "wars"}, base_dir=tmp_path)
    assert relative.workflow_store == tmp_path / "wars"
    absolute = parse_config({"workflow_store": "/srv/wars"}, base_dir=tmp_path)
    assert absolute.workflow_store == Path("/srv/wars")
