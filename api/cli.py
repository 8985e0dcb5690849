"""`torchgate` command line: serve, export, bench."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: `torchgate --help` stays instant
    from api.config import Config
    from api.workers.pool import WorkerPool


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="torchgate",
        description="Serve TorchServe model archives without Java.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the archives config.properties names")
    serve.add_argument(
        "--config",
        "--ts-config",
        default="config.properties",
        help="a TorchServe config.properties (default: ./config.properties)",
    )
    serve.add_argument(
        "--log-level",
        default=os.environ.get("TORCHGATE_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    serve.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=_env_flag("TORCHGATE_ACCESS_LOG"),
        help="JSON access log lines on stdout (default: torchgate.access_log in "
        "config.properties, on when absent; env TORCHGATE_ACCESS_LOG)",
    )
    serve.add_argument(
        "--ncs",
        "--no-snapshot",
        dest="no_snapshot",
        action="store_true",
        help="neither read nor write the state snapshot (TorchServe's --ncs): start from "
        "config.properties",
    )
    sub.add_parser(
        "export", help="train/export example models and build .mar archives", add_help=False
    )
    sub.add_parser("bench", help="closed-loop load test against a URL", add_help=False)

    if args and args[0] == "export":
        from export.cli import main as export_main

        return export_main(args[1:])
    if args and args[0] == "bench":
        from api.bench import main as bench_main

        return bench_main(args[1:])

    options = parser.parse_args(args)
    if options.command == "serve":
        from api.config import ConfigError, load_config
        from api.tls import load_tls

        try:
            config = load_config(options.config)
            load_tls(config)  # a bad key or keystore: a clear message before anything starts
        except ConfigError as exc:
            print(f"torchgate: {exc}", file=sys.stderr)
            return 2
        if options.no_snapshot:
            config.snapshot_file = None
        pool = _launch_worker_pool(config)
        from api.server import run  # ~1.5 s of imports, while the zygote imports torch

        run(config, log_level=options.log_level, access_log=options.access_log, pool=pool)
        return 0
    parser.print_help()
    return 2


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip().lower() not in ("false", "0", "no", "off")


def _launch_worker_pool(config: Config) -> WorkerPool:
    """Start the zygote first: its imports (torch, onnxruntime: ~3 s) then overlap the
    frontend's own (~1.5 s), which shortens start-up to ready by about that much."""
    from api.backends.workdir import make_work_dir
    from api.workers.pool import WorkerPool

    pool = WorkerPool(cleanup=make_work_dir(), preload=config.worker_preload)
    pool.launch()
    return pool


if __name__ == "__main__":
    sys.exit(main())
