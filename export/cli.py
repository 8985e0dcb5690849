"""``torchgate export``: build the example model archives.

    torchgate export NAME [--format torchscript|onnx] [--version V] [--seed S] [--out DIR]
    torchgate export --all [--out model_store] [--if-stale]

`main` takes the arguments after ``export`` (a leading ``"export"`` is dropped too, so the
top-level CLI may pass its argv either way) and returns the exit status: 0 on success, 1 when
an export fails (accuracy, parity, serializing, archiving, files) with the reason on one line
of stderr, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from export.build import (
    ALL,
    DEFAULT_BUILD_DIR,
    DEFAULT_FORMATS,
    FORMATS,
    ExportSpec,
    build,
    build_all,
)
from export.recipes import RECIPES

# What an export can meet besides a bug: ExportError, ParityError, ArchiveError and the
# exporters' errors (all RuntimeErrors; serialize turns onnx's and ONNX Runtime's into one), and
# paths that cannot be read or written (OSError).
EXPORT_FAILURES: tuple[type[Exception], ...] = (OSError, RuntimeError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchgate export",
        description="Train/load an example model, serialize it (TorchScript and ONNX), check "
        "parity with eager PyTorch, and archive it as a TorchServe .mar.",
    )
    parser.add_argument("name", nargs="?", choices=sorted(RECIPES), help="model to export")
    parser.add_argument(
        "--all",
        action="store_true",
        help="build every example archive: "
        + ", ".join(f"{s.archive_file} ({s.name} {s.version}, {s.format})" for s in ALL),
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        help="archive format (default: "
        + ", ".join(f"{name} {fmt}" for name, fmt in DEFAULT_FORMATS.items())
        + ")",
    )
    parser.add_argument("--version", default="1.0", help="model version (default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (digits)")
    parser.add_argument(
        "--archive-name",
        help="file stem in the store (default: NAME for 1.0, NAME_vMAJOR for other versions)",
    )
    parser.add_argument("--out", type=Path, default=Path("model_store"), help="model store")
    parser.add_argument(
        "--build-dir",
        type=Path,
        default=DEFAULT_BUILD_DIR,
        help="intermediate files (default build/export)",
    )
    parser.add_argument(
        "--if-stale",
        action="store_true",
        help="skip archives newer than every source file of export/, handlers/",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["export"]:
        args_list = args_list[1:]
    parser = _parser()
    args = parser.parse_args(args_list)
    if args.all == (args.name is not None):
        parser.error("give a model NAME or --all")
    started = time.monotonic()
    try:
        if args.all:
            build_all(args.out, args.build_dir, force=not args.if_stale)
        else:
            fmt = args.format or DEFAULT_FORMATS[args.name]
            spec = ExportSpec(args.name, fmt, args.version, args.seed, args.archive_name)
            build(spec, args.out, args.build_dir, force=not args.if_stale)
    except EXPORT_FAILURES as exc:
        print(f"torchgate export: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    print(f"done in {time.monotonic() - started:.1f}s")
    return 0


def _one_line(exc: BaseException) -> str:
    """The message on one line (exporters' messages span several); the type when it is empty."""
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    raise SystemExit(main())
