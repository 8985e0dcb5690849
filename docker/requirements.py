"""Print pyproject.toml's requirements for one image, one per line (for `pip install -r`).

    python docker/requirements.py cpu             runtime deps, onnxruntime instead of -gpu
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
# The CPU image has no CUDA: onnxruntime-gpu would only add ~300 MB and warn at every start.
CPU_SWAPS = {"onnxruntime-gpu": "onnxruntime"}


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return match.group(0).lower().replace("_", "-")


def requirements(variant: str, pyproject: Path = PYPROJECT) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    if variant in ("cpu", "gpu"):
        swaps = CPU_SWAPS if variant == "cpu" else {}
        lines = []
        for requirement in project["dependencies"]:
            name = _name(requirement)
            lines.append(swaps[name] + requirement[len(name) :] if name in swaps else requirement)
        return lines
    raise ValueError(f"unknown variant {variant!r}")


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
