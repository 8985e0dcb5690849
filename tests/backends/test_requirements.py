"""`api.backends.requirements`: an archive's requirements.txt installed with the real pip from the
package index this machine reaches, into a directory of the model's own; what the server's
environment already has (numpy, torch) is never installed again."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from api.backends.archive import open_archive
from api.backends.requirements import (
    RequirementsError,
    _check_replaceable,
    install_requirements,
)
from api.backends.workers import WorkerBackend
from api.core.types import ModelSettings
from tests.support.aio import run
from tests.support.archives import ECHO, build_archive


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "model"
    directory.mkdir()
    return directory


def test_only_what_is_missing_is_installed(model_dir: Path, tmp_path: Path) -> None:
    (model_dir / "requirements.txt").write_text("termcolor\nnumpy\n")
    target = run(install_requirements(model_dir, "requirements.txt", tmp_path / "work", model="m"))
    assert target.parent == tmp_path / "work"
    installed = sorted(p.name for p in target.iterdir())
    assert "termcolor" in installed
    # numpy is in the server's environment: the model uses that one.
    assert not [name for name in installed if name.startswith(("numpy", "torch"))]
    assert all(name.startswith("termcolor") for name in installed), installed


def test_pip_failure_is_a_registration_error(model_dir: Path, tmp_path: Path) -> None:
    (model_dir / "requirements.txt").write_text("torchgate-no-such-package==0.0.1\n")
    work = tmp_path / "work"
    with pytest.raises(RequirementsError) as raised:
        run(install_requirements(model_dir, "requirements.txt", work, model="m"))
    message = raised.value.message
    assert message.startswith("Custom pip package installation failed for model m: ERROR:")
    assert "torchgate-no-such-package" in message
    assert list(work.iterdir()) == []  # the half-made directory is gone


def test_a_file_pip_reads_as_requirements_is_not_quoted_to_the_client(
    model_dir: Path, tmp_path: Path
) -> None:
    """`-r` in a requirements file names any file the server can read; pip quotes each line it
    cannot parse: those lines stay in the server's log, not in the API's answer."""
    secret = tmp_path / "secret.txt"
    secret.write_text("root:s3cr3t-t0ken:0:0\n")
    (model_dir / "requirements.txt").write_text(f"-r {secret}\n")
    with pytest.raises(RequirementsError) as raised:
        run(install_requirements(model_dir, "requirements.txt", tmp_path / "work", model="m"))
    assert "ERROR: Invalid requirement" in raised.value.message
    assert "s3cr3t" not in raised.value.message


def test_a_requirements_file_outside_the_archive_is_refused(
    model_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "elsewhere.txt").write_text("termcolor\n")
    with pytest.raises(RequirementsError, match="is not a file in the archive"):
        run(install_requirements(model_dir, "../elsewhere.txt", tmp_path / "work", model="m"))


def report_item(name: str, version: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "version": version}, "download_info": {"url": "x"}}


def test_replacing_what_workers_share_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(RequirementsError, match=r"would replace torch .* of the server's"):
        _check_replaceable([report_item("torch", "1.0.0")], "m")
    with caplog.at_level(logging.WARNING, logger="api.backends.requirements"):
        _check_replaceable([report_item("httpx", "0.0.1"), report_item("nothere", "1")], "m")
    assert "httpx 0.0.1 shadows httpx" in caplog.text
    assert "nothere" not in caplog.text


def test_without_install_py_dep_per_model_requirements_are_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = build_archive(
        tmp_path,
        "withreq",
        "handler.py",
        {"handler.py": ECHO, "requirements.txt": "torchgate-no-such-package\n"},
        requirements="requirements.txt",
    )
    archive = open_archive(path, work_dir=tmp_path / "work")
    backend = WorkerBackend(archive, ModelSettings(), pool=mock.Mock())
    with caplog.at_level(logging.WARNING, logger="api.backends.workers"):
        run(backend.prepare(ModelSettings(batch_size=3), install_requirements=False, model="w"))
    assert backend.settings.batch_size == 3
    assert "Model w: requirementsFile requirements.txt is not installed: " in caplog.text
    assert "install_py_dep_per_model is false" in caplog.text
    run(backend.close())
