"""Package a serialized model, its handler and extra files into a .mar with torch-model-archiver.

The archiver always names its output ``{model_name}.mar``; two versions of one model can only
sit side by side in a model store under different file names, so it writes into a scratch
directory and the result is moved to the file name asked for (``digits_v2.mar`` holds model
``digits`` version 2.0: TorchServe and torchgate take name and version from the manifest).

The archiver reads its extra files as one comma-separated list of glob patterns, so a path with
a comma or ``[``, ``*``, ``?`` would be split or matched as a pattern, and a file it does not find
is only a warning. The extra files therefore travel through a private staging directory, and the
finished archive is checked for every member before it replaces anything.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model_archiver.model_archiver_config import ModelArchiverConfig

MANIFEST_MEMBER = "MAR-INF/MANIFEST.json"


class ArchiveError(RuntimeError):
    """torch-model-archiver failed, or left out a file the archive must hold."""


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

    destination.parent.mkdir(parents=True, exist_ok=True)
    named = [serialized_file, handler, *extra_files]
    expected = {*_member_names(named), MANIFEST_MEMBER}
    with (
        _staged(extra_files) as extra_dir,
        tempfile.TemporaryDirectory(dir=destination.parent, prefix=".archiving-") as scratch,
    ):
        config = ModelArchiverConfig(
            model_name=model_name,
            handler=str(handler),
            version=version,
            serialized_file=str(serialized_file),
            # One directory: the archiver copies what it holds, flat, into the archive.
            extra_files=glob.escape(str(extra_dir)),
            export_path=scratch,
            force=True,
        )
        _run_archiver(config, scratch)
        built = Path(scratch) / f"{model_name}.mar"
        _check_members(built, expected, destination)
        os.replace(built, destination)
    return destination


def _member_names(files: Sequence[Path]) -> list[str]:
    """The archive is flat: two files with one name (an extra file named as the handler or
    the serialized model too) would silently become one, the later copied over the other."""
    names = [path.name for path in files]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ArchiveError(f"files of the archive share a file name: {', '.join(duplicates)}")
    return names


@contextmanager
def _staged(extra_files: Sequence[Path]) -> Iterator[Path]:
    """Copies of `extra_files` in a fresh directory of the system temp dir, whose path (unlike
    the build or store directory a user picks) holds no comma or glob character."""
    with tempfile.TemporaryDirectory(prefix="torchgate-extra-") as staging:
        if "," in staging:  # only with a TMPDIR holding a comma: the archiver would split it
            raise ArchiveError(f"temporary directory {staging!r} contains a comma")
        for path in extra_files:
            shutil.copy2(path, Path(staging) / path.name)
        yield Path(staging)


def _run_archiver(config: ModelArchiverConfig, scratch: str) -> None:
    from model_archiver.model_archiver_error import ModelArchiverError
    from model_archiver.model_packaging import generate_model_archive

    # The archiver stages files in `tempfile.gettempdir()/model_name`, shared by every
    # process archiving a model of that name: point it at our private scratch directory.
    # It also configures the root logger on every call; keep it from raising ours.
    saved_tempdir, root_level = tempfile.tempdir, logging.getLogger().level
    tempfile.tempdir = scratch
    try:
        generate_model_archive(config)
    except (ModelArchiverError, ValueError) as exc:
        raise ArchiveError(f"torch-model-archiver failed: {exc}") from exc
    finally:
        tempfile.tempdir = saved_tempdir
        logging.getLogger().setLevel(root_level)


def _check_members(built: Path, expected: set[str], destination: Path) -> None:
    with zipfile.ZipFile(built) as mar:
        missing = expected - set(mar.namelist())
    if missing:
        raise ArchiveError(
            f"{destination.name}: the archiver left out {', '.join(sorted(missing))}"
        )


def read_manifest(archive: Path) -> dict[str, Any]:
    """MAR-INF/MANIFEST.json of a built archive."""
    [manifest] = read_json_members(archive, MANIFEST_MEMBER)
    return manifest


def read_json_members(archive: Path, *members: str) -> list[dict[str, Any]]:
    """JSON members of a built archive (MANIFEST_MEMBER, "signature.json"), in one opening."""
    with zipfile.ZipFile(archive) as mar:
        return [json.loads(mar.read(member)) for member in members]


def extract(archive: Path, directory: Path) -> Path:
    """Unpack an archive flat, the way TorchServe and torchgate's local backend do."""
    if directory.exists():
        shutil.rmtree(directory)
    with zipfile.ZipFile(archive) as mar:
        mar.extractall(directory)
    return directory
