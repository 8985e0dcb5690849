"""Build model archives the way TorchServe users do: torch-model-archiver over source files."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

ARCHIVER = Path(sys.executable).with_name("torch-model-archiver")
_counter = itertools.count()

# A handler that answers each request with its own body: traffic that costs the model nothing.
ECHO = """
    def handle(data, context):
        if data is None:
            return None
        return [row.get("body") or row.get("data") for row in data]
"""


def build_archive(
    workdir: Path,
    name: str,
    handler: str,
    files: Mapping[str, str | bytes] | None = None,
    *,
    serialized: str | None = None,
    version: str = "1.0",
    config: str | None = None,
    model_file: str | None = None,
    archive_format: str = "default",
    export_dir: Path | None = None,
    requirements: str | None = None,
) -> Path:
    """Write `files` under `workdir`, run torch-model-archiver, return the archive's path.

    `handler` is a file among `files` or a built-in handler name; the files not named by
    `handler`, `serialized`, `config`, `model_file` or `requirements` (--requirements-file)
    become --extra-files. The archive goes to
    `export_dir` (a fresh folder under `workdir` unless given).
    """
    files = files or {}
    src = workdir / f"src-{name}-{next(_counter)}"
    src.mkdir(parents=True)
    for file_name, content in files.items():
        # The archiver copies a directory's *contents*: nested files go under _tree/.
        target = src / "_tree" / file_name if "/" in file_name else src / file_name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(textwrap.dedent(content))
    export = export_dir or workdir / f"export-{next(_counter)}"
    export.mkdir(parents=True, exist_ok=True)
    special = {handler, serialized, config, model_file, requirements}
    extra = [str(src / f) for f in files if f not in special and "/" not in f]
    if any("/" in f for f in files):
        extra.append(str(src / "_tree"))
    command = [
        str(ARCHIVER),
        "--model-name", name,
        "--version", version,
        "--handler", str(src / handler) if handler in files else handler,
        "--export-path", str(export),
        "--archive-format", archive_format,
        "--force",
    ]  # fmt: skip
    if serialized:
        command += ["--serialized-file", str(src / serialized)]
    if config:
        command += ["--config-file", str(src / config)]
    if model_file:
        command += ["--model-file", str(src / model_file)]
    if requirements:
        command += ["--requirements-file", str(src / requirements)]
    if extra:
        command += ["--extra-files", ",".join(extra)]
    run_archiver(command, workdir)
    suffix = {"default": ".mar", "tgz": ".tar.gz", "no-archive": ""}[archive_format]
    return export / f"{name}{suffix}"


def run_archiver(command: Sequence[str], workdir: Path) -> None:
    """Run torch-model-archiver or torch-workflow-archiver with a temporary directory of its own.

    Both stage an archive's files in `$TMPDIR/<model or workflow name>`, deleting that directory
    before and after: two test modules archiving models of the same name at once (pytest-xdist
    runs modules side by side) would delete each other's files, and a model called "echo"
    deletes a /tmp/echo that has nothing to do with it.
    """
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".archiving-") as scratch:
        env = {**os.environ, "TMPDIR": scratch}
        subprocess.run(list(command), check=True, capture_output=True, env=env)


# Handler source for probes that report what the handler saw (indented as a test's handler
# source is, dedented with it): a row's value as its type's name and its content, bytes as
# latin-1 text so that any byte survives JSON.
PROBE_VALUE = """
    def _value(value):
        if isinstance(value, (bytes, bytearray)):
            return [type(value).__name__, bytes(value).decode("latin-1")]
        return [type(value).__name__, value]
"""
