"""Package a serialized model, its handler and extra files into a .mar with torch-model-archiver.

The archiver always names its output ``{model_name}.mar``; two versions of one model can only
sit side by side in a model store under different file names, so it writes into a scratch
directory and the result is moved to the file name asked for (``digits_v2.mar`` holds model
``digits`` version 2.0: TorchServe and torchgate take name and version from the manifest).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def make_archive(
    *,
    model_name: str,
    version: str,
    serialized_file: Path,
    handler: Path,
    extra_files: Sequence[Path],
    destination: Path,
) -> Path:
    """Write ``destination`` (a .mar file) atomically and return it."""
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".archiving-") as scratch:
        config = ModelArchiverConfig(
            model_name=model_name,
            handler=str(handler),
            version=version,
            serialized_file=str(serialized_file),
            extra_files=",".join(str(path) for path in extra_files),
            export_path=scratch,
            force=True,
        )
        # The archiver stages files in `tempfile.gettempdir()/model_name`, shared by every
        # process archiving a model of that name: point it at our private scratch directory.
        # It also configures the root logger on every call; keep it from raising ours.
        saved_tempdir, root_level = tempfile.tempdir, logging.getLogger().level
        tempfile.tempdir = scratch
        try:
            generate_model_archive(config)
        finally:
            tempfile.tempdir = saved_tempdir
            logging.getLogger().setLevel(root_level)
        built = Path(scratch) / f"{model_name}.mar"
        os.replace(built, destination)
    return destination


def read_manifest(archive: Path) -> dict[str, Any]:
    """MAR-INF/MANIFEST.json of a built archive."""
    with zipfile.ZipFile(archive) as mar:
        manifest: dict[str, Any] = json.loads(mar.read("MAR-INF/MANIFEST.json"))
    return manifest


def extract(archive: Path, directory: Path) -> Path:
    """Unpack an archive flat, the way TorchServe and torchgate's local backend do."""
    if directory.exists():
        shutil.rmtree(directory)
    with zipfile.ZipFile(archive) as mar:
        mar.extractall(directory)
    return directory
