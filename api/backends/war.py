"""Open a TorchServe workflow archive (`.war`): extract it safely and read what it declares.

torch-workflow-archiver writes a zip with `WAR-INF/MANIFEST.json`
(`{"workflow": {"workflowName", "specFile", "handler"}, ...}`), the spec YAML and the workflow
handler `.py` (plus any `--extra-files`). Members are checked as model archives' are (paths
escaping the directory, links, zip bombs: `extract.py`); the manifest and spec are bounded in
size. The spec's meaning (`models:`, `dag:`) is `api.core.workflow.parse_spec`'s.

Function nodes run as models in torchgate's workers, as TorchServe runs them: `function_model`
writes a model directory (`MAR-INF/MANIFEST.json` naming `HANDLER.py:NODE`, and the handler
file with the archive's other files) that `api.backends.archive.open_archive` then opens.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from api.backends.extract import ArchiveLimits, ExtractError, open_reader
from api.core.names import MODEL_NAME
from api.errors import InvalidWorkflow

MANIFEST = PurePosixPath("WAR-INF", "MANIFEST.json")
MAX_METADATA_BYTES = 1024 * 1024  # manifest, spec


@dataclass
class WorkflowArchive:
    path: Path
    name: str  # the manifest's workflowName, or the name the register request gave
    spec: Any  # the spec YAML, loaded
    directory: Path  # the extracted files (removed by `remove`)
    handler: Path  # the workflow handler file, inside `directory`

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def open_war(
    path: Path, work_dir: Path, *, name: str | None = None, limits: ArchiveLimits | None = None
) -> WorkflowArchive:
    """Validate and extract the archive at `path` into a fresh folder under `work_dir`.

    Blocking: run it in a thread. Raises InvalidWorkflow naming the archive and what is wrong.
    """
    target: Path | None = None
    try:
        with open_reader(path, limits or ArchiveLimits()) as reader:
            if MANIFEST not in reader.members:
                raise InvalidWorkflow(
                    f"Workflow archive {path.name}: missing {MANIFEST}: not a workflow archive"
                )
            manifest = _json(reader.read(MANIFEST, MAX_METADATA_BYTES), path)
            workflow = manifest.get("workflow") if isinstance(manifest, dict) else None
            if not isinstance(workflow, dict):
                raise InvalidWorkflow(f'Workflow archive {path.name}: {MANIFEST} has no "workflow"')
            workflow_name = name or workflow.get("workflowName")
            if not isinstance(workflow_name, str) or not MODEL_NAME.fullmatch(workflow_name):
                raise InvalidWorkflow(
                    f"Workflow archive {path.name}: invalid workflow name {workflow_name!r} "
                    f"(letters, digits, '_', '-', '.'; starting with a letter or digit)"
                )
            spec_file = _member(workflow, "specFile", reader.members, path)
            handler_file = _member(workflow, "handler", reader.members, path)
            try:
                spec = yaml.safe_load(reader.read(spec_file, MAX_METADATA_BYTES))
            except yaml.YAMLError as exc:
                raise InvalidWorkflow(
                    f"Workflow archive {path.name}: {spec_file} is not valid YAML: {exc}"
                ) from exc
            work_dir.mkdir(parents=True, exist_ok=True)
            target = Path(tempfile.mkdtemp(prefix=f"{workflow_name}-war-", dir=work_dir))
            reader.extract_all(target / "files")
    except ExtractError as exc:
        _remove(target)
        raise InvalidWorkflow(f"Workflow archive {path.name}: {exc}") from exc
    except OSError as exc:
        _remove(target)
        raise InvalidWorkflow(f"Workflow archive {path.name} cannot be read: {exc}") from exc
    except BaseException:
        _remove(target)
        raise
    return WorkflowArchive(
        path=path,
        name=workflow_name,
        spec=spec,
        directory=target,
        handler=target.joinpath("files", *handler_file.parts),
    )


def function_model(archive: WorkflowArchive, node: str, model_name: str) -> Path:
    """A model directory whose handler is the workflow handler's function `node`.

    The worker's model directory holds the archive's files, so the handler imports its
    neighbours as it would in TorchServe. They are hard links to the extracted files, not
    copies: a workflow's nodes share its files, as in TorchServe, and 50 function nodes of a
    workflow with 1 GiB of files take 1 GiB, not 50. Blocking.
    """
    model_dir = archive.directory / "nodes" / node
    shutil.copytree(archive.directory / "files", model_dir, copy_function=_link_or_copy)
    manifest = {
        "runtime": "python",
        "model": {
            "modelName": model_name,
            "modelVersion": "1.0",
            "handler": f"{archive.handler.name}:{node}",
        },
    }
    (model_dir / "MAR-INF").mkdir(exist_ok=True)
    manifest_file = model_dir / "MAR-INF" / "MANIFEST.json"
    manifest_file.unlink(missing_ok=True)  # a link to the files' own: never written through
    manifest_file.write_text(json.dumps(manifest))
    return model_dir


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copy2(source, target)


def _json(raw: bytes, path: Path) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise InvalidWorkflow(
            f"Workflow archive {path.name}: {MANIFEST} is not JSON: {exc}"
        ) from exc


def _member(
    workflow: dict[str, Any], key: str, members: dict[PurePosixPath, Any], path: Path
) -> PurePosixPath:
    value = workflow.get(key)
    member = PurePosixPath(value) if isinstance(value, str) and value else None
    if member is None or member not in members:
        raise InvalidWorkflow(
            f"Workflow archive {path.name}: the manifest's {key} {value!r} is not in the archive"
        )
    return member


def _remove(target: Path | None) -> None:
    if target is not None:
        shutil.rmtree(target, ignore_errors=True)
