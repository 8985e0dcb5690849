"""Per-model Python requirements: an archive's `requirementsFile`, installed for its workers only.

TorchServe 0.12, with `install_py_dep_per_model=true`, runs `pip install -U -t MODEL_DIR -r
requirements.txt` when a model registers (or, with `useVenv: true` in model-config.yaml, creates
a virtualenv that inherits the base environment and installs into it), before its workers start;
a failure fails the registration with "Custom pip package installation failed for model NAME".
Without `install_py_dep_per_model` the file is ignored.

torchgate's workers are forked from one zygote that has torch imported, so a model cannot get an
interpreter of its own. Instead each model gets a package directory of its own, put on its
workers' `sys.path` right after the model directory (other models never see it), filled in two
pip runs so that nothing the base environment already has is installed again:

1. `pip install --dry-run --report` resolves the requirements against the base environment
   (torch, numpy, ... already satisfy them) and lists only what is missing;
2. `pip install --target DIR --no-deps` installs exactly those.

A requirement that would replace a package the zygote has already imported into every worker
(torch, numpy, TorchServe's `ts`, ...) cannot take effect in a forked worker, so it fails the
registration with a clear message instead of half-working; any other package the base
environment has in another version is installed for the model and shadows the base one there.
`useVenv: true` gets the same per-model directory (logged). pip's own output is part of the
error message when it fails.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from api.backends.archive import safe_name
from api.errors import BadRequest

log = logging.getLogger(__name__)

PIP_TIMEOUT_S = 600.0
MAX_PIP_OUTPUT = 4000  # characters of pip's output kept in an error message
_INVALID_REQUIREMENT = "ERROR: Invalid requirement"
# Imported by the zygote (or by torchgate itself) before any worker exists: a model cannot
# replace them. Names as pip normalises them.
PRELOADED = frozenset(
    {"torch", "numpy", "torchserve", "onnxruntime", "onnxruntime-gpu", "pillow", "pyyaml"}
)


class RequirementsError(BadRequest):
    """The archive's requirements could not be installed (TorchServe's ModelException, 400)."""

    type_name = "ModelException"


def requirements_file(manifest: dict[str, Any]) -> str | None:
    value = manifest.get("model", {}).get("requirementsFile")
    return value if isinstance(value, str) and value else None


async def install_requirements(
    model_dir: Path,
    requirements: str,
    work_dir: Path,
    *,
    model: str,
    python: str = sys.executable,
    timeout: float = PIP_TIMEOUT_S,
) -> Path:
    """Install `requirements` (a file in `model_dir`) into a new directory under `work_dir`.

    Returns the directory for the model's workers' `sys.path`; the caller removes it with the
    model. Raises `RequirementsError` with pip's message.
    """
    path = (model_dir / requirements).resolve()
    if not path.is_relative_to(model_dir.resolve()) or not path.is_file():
        raise RequirementsError(
            f"Custom pip package installation failed for model {model}: requirementsFile "
            f"{requirements!r} is not a file in the archive"
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix=f"{safe_name(model)}-deps-", dir=work_dir))
    try:
        report_file = target / ".report.json"
        await _pip(
            python,
            ["install", "--dry-run", "--quiet", "--report", str(report_file), "-r", str(path)],
            model_dir,
            model,
            timeout,
        )
        missing = _missing(json.loads(report_file.read_text()))
        report_file.unlink()
        _check_replaceable(missing, model)
        if missing:
            specs = [_pinned(item) for item in missing]
            await _pip(
                python,
                ["install", "--no-deps", "--target", str(target), *specs],
                model_dir,
                model,
                timeout,
            )
        names = ", ".join(_describe(item) for item in missing) or "nothing missing"
        log.info("Model %s: %s installed in %s: %s", model, requirements, target, names)
        return target
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


async def _pip(python: str, args: Sequence[str], cwd: Path, model: str, timeout: float) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    process = await asyncio.create_subprocess_exec(
        python,
        "-m",
        "pip",
        *args,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RequirementsError(
            f"Custom pip package installation failed for model {model}: pip did not finish "
            f"within {timeout:g} s"
        ) from None
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    if process.returncode != 0:
        text = output.decode(errors="replace").strip()
        log.error("Model %s: pip %s failed:\n%s", model, args[0], text)
        # pip's ERROR lines say what went wrong; its warnings (an unreachable extra index...)
        # are shown only when there are none.
        errors = [_told(line) for line in text.splitlines() if line.startswith("ERROR")]
        message = "\n".join(errors) if errors else text
        raise RequirementsError(
            f"Custom pip package installation failed for model {model}: {message[-MAX_PIP_OUTPUT:]}"
        )


def _told(error: str) -> str:
    """A pip ERROR line as the client is told it. pip quotes a line it cannot read as a
    requirement, and `-r /etc/passwd` in a requirements file makes that any file the server
    can read: such a line stays in the server log only."""
    if error.startswith(_INVALID_REQUIREMENT):
        return f"{_INVALID_REQUIREMENT} (the line is in the server's log)"
    return error


def _missing(report: dict[str, Any]) -> list[dict[str, Any]]:
    items = report.get("install", [])
    return [item for item in items if isinstance(item, dict)]


def _check_replaceable(missing: Iterable[dict[str, Any]], model: str) -> None:
    for item in missing:
        name = _normalise(item["metadata"]["name"])
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if name in PRELOADED:
            raise RequirementsError(
                f"Custom pip package installation failed for model {model}: the requirements "
                f"ask for {_describe(item)}, which would replace {name} {installed} of the "
                f"server's environment; workers share that one (pin {name}=={installed} or "
                f"leave it out)"
            )
        log.warning(
            "Model %s: %s shadows %s %s of the server's environment for this model's workers",
            model,
            _describe(item),
            name,
            installed,
        )


def _pinned(item: dict[str, Any]) -> str:
    """A requirement for exactly what the dry run chose."""
    name = item["metadata"]["name"]
    info = item.get("download_info", {})
    if item.get("is_direct") and info.get("url"):  # a URL, path or VCS requirement
        vcs = info.get("vcs_info")
        if vcs:
            return f"{name} @ {vcs['vcs']}+{info['url']}@{vcs['commit_id']}"
        return f"{name} @ {info['url']}"
    return f"{name}=={item['metadata']['version']}"


def _describe(item: dict[str, Any]) -> str:
    return f"{item['metadata']['name']} {item['metadata']['version']}"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
