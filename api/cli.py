"""`torchgate` command line.

torchgate start|stop [torchserve's flags]    TorchServe's command line (api.commands.launch);
torchgate --start|--stop|--version [...]     also in torchserve's own form
torchgate serve --config config.properties   serve in the foreground (what `make serve` runs)
torchgate models list|describe|register|...  the management API (api.commands.models)
torchgate export ...                         build the example archives (export.cli)
"""

from __future__ import annotations

import argparse
import sys

# Imported where used: `torchgate --help` and `torchgate models` stay quick.


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "export":
        from export.cli import main as export_main

        return export_main(args[1:])
    if args and args[0] == "models":
        from api.commands.models import main as models_main

        return models_main(args[1:])
    if args and args[0].startswith("-") and args[0] not in ("-h", "--help"):
        from api.commands.launch import main_torchserve  # `torchgate --start ...`

        return main_torchserve(args)

    from api.commands import launch

    parser = argparse.ArgumentParser(
        prog="torchgate",
        description="Serve TorchServe model archives without Java. `torchgate --start ...` "
        "takes torchserve's own command line.",
    )
    sub = parser.add_subparsers(dest="command")
    start = sub.add_parser("start", help="start a server (in the background unless --foreground)")
    launch.add_server_flags(start)
    stop = sub.add_parser("stop", help="stop running servers; they finish accepted requests")
    stop.add_argument("--ts-config", dest="ts_config", help="only the one running this config")
    sub.add_parser("version", help="print the version")
    serve = sub.add_parser("serve", help="serve config.properties in the foreground")
    serve.add_argument(
        "--config",
        "--ts-config",
        default="config.properties",
        help="a TorchServe config.properties (default: ./config.properties)",
    )
    launch.add_logging_flags(serve)
    serve.add_argument(
        "--ncs",
        "--no-snapshot",
        dest="no_snapshot",
        action="store_true",
        help="neither read nor write the state snapshot (TorchServe's --ncs): start from "
        "config.properties",
    )
    sub.add_parser("models", help="list, describe, register, scale, ... models", add_help=False)
    sub.add_parser(
        "export", help="train/export example models and build .mar archives", add_help=False
    )

    options = parser.parse_args(args)
    if options.command == "version":  # -v/--version: torchserve's form (main_torchserve)
        print(launch.version())
        return 0
    if options.command == "start":
        return launch.start_command(options, args[1:])
    if options.command == "stop":
        return launch.stop_command(options.ts_config)
    if options.command == "serve":
        return _serve(options)
    parser.print_help()
    return 2


def _serve(options: argparse.Namespace) -> int:
    from api.commands.launch import UsageError, check_model_store, serve_foreground
    from api.config import ConfigError, load_config

    try:
        config = load_config(options.config)
        check_model_store(config)
    except (ConfigError, UsageError) as exc:
        print(f"torchgate: {exc}", file=sys.stderr)
        return 2
    if options.no_snapshot:
        config.snapshot_file = None
    return serve_foreground(config, options, lock_key=None)


if __name__ == "__main__":
    sys.exit(main())
