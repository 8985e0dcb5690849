"""Print pyproject.toml's requirements for one image, one per line (for `pip install -r`).

    python docker/requirements.py cpu             runtime deps, onnxruntime instead of -gpu
                                                  (pinned to constraints.txt's -gpu release)
    python docker/requirements.py gpu             runtime deps as declared
    python docker/requirements.py pick grpcio-tools   that one requirement, from any group

The images install from pyproject.toml through this script, so their requirements cannot drift
from the ones `make venv` installs; the versions come from constraints.txt (`pip install -c`), as
in `make venv`. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
CONSTRAINTS = PYPROJECT.with_name("constraints.txt")
# The CPU image has no CUDA: onnxruntime-gpu would only add ~300 MB and warn at every start.
# The swapped package takes the release constraints.txt pins for the other (both are built from
# one source at each release): constraints name onnxruntime-gpu only, which `make venv` installs,
# so the CPU image's onnxruntime was otherwise whatever was newest when it was built.
CPU_SWAPS = {"onnxruntime-gpu": "onnxruntime"}


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return match.group(0).lower().replace("_", "-")


def requirements(
    variant: str, pyproject: Path = PYPROJECT, constraints: Path = CONSTRAINTS
) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    if variant in ("cpu", "gpu"):
        swaps = CPU_SWAPS if variant == "cpu" else {}
        pins = _pins(constraints) if swaps else {}
        lines = []
        for requirement in project["dependencies"]:
            name = _name(requirement)
            if name not in swaps:
                lines.append(requirement)
            elif name in pins:
                lines.append(f"{swaps[name]}=={pins[name]}")
            else:
                lines.append(swaps[name] + requirement[len(name) :])
        return lines
    raise ValueError(f"unknown variant {variant!r}")


def _pins(constraints: Path) -> dict[str, str]:
    """`name==version` lines of a constraints file, by normalized name."""
    pins = {}
    for line in constraints.read_text().splitlines():
        match = re.fullmatch(r"\s*([A-Za-z0-9._-]+)\s*==\s*([^\s;#]+).*", line)
        if match:
            pins[_name(match.group(1))] = match.group(2)
    return pins


def pick(name: str, pyproject: Path = PYPROJECT) -> str:
    """The requirement for package `name`, from the dependencies or any optional group."""
    project = tomllib.loads(pyproject.read_text())["project"]
    groups = [project["dependencies"], *project.get("optional-dependencies", {}).values()]
    for requirement in (r for group in groups for r in group):
        if _name(requirement) == name.lower():
            return str(requirement)
    raise LookupError(f"{name} is not in {pyproject}")


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "pick":
        print(pick(argv[1]))
        return 0
    if len(argv) == 1 and argv[0] in ("cpu", "gpu"):
        print("\n".join(requirements(argv[0])))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
