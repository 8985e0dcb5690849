"""Generate ``api/rpc/generated`` from ``api/rpc/protos`` with grpcio-tools.

Usage: ``python scripts/gen_protos.py`` (what ``make protos`` runs). Idempotent; takes about a
second. Everything in ``api/rpc/generated`` except its ``__init__.py`` is replaced.

protoc writes modules that import each other as top-level names (``import inference_pb2``,
``from google.rpc import status_pb2``) and register themselves in protobuf's default descriptor
pool. Two rewrites make them fit torchgate:

1. imports of our own generated modules become ``from api.rpc.generated[...] import ...``;
2. ``_descriptor_pool.Default()`` becomes torchgate's private pool, after the well-known types
   the file imports are adopted into it (why: ``api/rpc/generated/__init__.py``).
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "api" / "rpc" / "protos"
GENERATED = ROOT / "api" / "rpc" / "generated"
PACKAGE = "api.rpc.generated"
KEEP = {"__init__.py"}

_IMPORT = re.compile(r"^import (?P<module>[\w.]+) as (?P<alias>\w+)$", re.MULTILINE)
_FROM_IMPORT = re.compile(
    r"^from (?P<parent>[\w.]+) import (?P<module>\w+)(?P<alias> as \w+)?$", re.MULTILINE
)
_WELL_KNOWN_IMPORT = re.compile(
    r"^from google\.protobuf import \w+_pb2 as (?P<alias>\w+)$", re.MULTILINE
)
_DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("


def main() -> int:
    protos = sorted(p.relative_to(PROTOS).as_posix() for p in PROTOS.rglob("*.proto"))
    ours = {_module_of(p) for p in protos}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _run_protoc(protos, out)
        for path in sorted(out.rglob("*.py*")):
            if path.name.endswith("_pb2_grpc.py") and "class " not in path.read_text():
                path.unlink()  # a .proto without services: grpc's file would be empty
                continue
            path.write_text(_rewrite(path.read_text(), ours, is_pb2=path.name.endswith("_pb2.py")))
        for package_dir in {d for p in out.rglob("*.py") for d in p.parents if out in d.parents}:
            (package_dir / "__init__.py").touch()  # google/, google/rpc/: regular packages
        _replace_generated(out)
    print(f"generated {len(protos)} protos into {GENERATED.relative_to(ROOT)}")
    return 0


def _module_of(proto: str) -> str:
    """``google/rpc/status.proto`` -> ``google.rpc.status_pb2``."""
    return proto.removesuffix(".proto").replace("/", ".") + "_pb2"


def _run_protoc(protos: list[str], out: Path) -> None:
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTOS}",
        f"--proto_path={well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def _rewrite(text: str, ours: set[str], *, is_pb2: bool) -> str:
    def absolute_import(match: re.Match[str]) -> str:
        module = match["module"]
        if module not in ours:
            return match[0]
        parent, _, name = f"{PACKAGE}.{module}".rpartition(".")
        return f"from {parent} import {name} as {match['alias']}"

    def absolute_from_import(match: re.Match[str]) -> str:
        if f"{match['parent']}.{match['module']}" not in ours:
            return match[0]
        return f"from {PACKAGE}.{match['parent']} import {match['module']}{match['alias'] or ''}"

    text = _IMPORT.sub(absolute_import, text)
    text = _FROM_IMPORT.sub(absolute_from_import, text)
    if not is_pb2:
        return text
    if text.count(_DEFAULT_POOL) != 1:
        raise SystemExit("unexpected protoc output: no single default-pool registration")
    adopt = "".join(f"_adopt({alias}.DESCRIPTOR)\n" for alias in _WELL_KNOWN_IMPORT.findall(text))
    private = f"from {PACKAGE} import POOL as _POOL, adopt as _adopt\n{adopt}\n"
    return text.replace(_DEFAULT_POOL, private + "DESCRIPTOR = _POOL.AddSerializedFile(")


def _replace_generated(out: Path) -> None:
    for entry in GENERATED.iterdir():
        if entry.name in KEEP:
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    for entry in out.iterdir():
        shutil.move(str(entry), GENERATED / entry.name)


if __name__ == "__main__":
    sys.exit(main())
