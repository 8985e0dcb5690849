"""`torchgate start|stop` and `torchgate --start ...`: TorchServe 0.12's command line.

    torchgate start --ncs --model-store store --models mnist=mnist.mar   (background)
    torchgate --start --foreground --model-store=/mnt/models/model-store \\
        --ts-config=/mnt/models/config/config.properties                 (KServe's runtime)
    torchgate stop                                                      (drains, then exits)

Flags mean what `torchserve`'s do (ts/arg_parser.py, ts/model_server.py, ConfigManager): the
config file is `TS_CONFIG_FILE`, else `--ts-config`, else ./config.properties when present;
`--model-store`, `--models`, `--workflow-store`, `--disable-token-auth` and
`--enable-model-api` override the file (`api.config.Overrides`), and `TS_<KEY>` variables
override both when the file says enable_envvars_config=true.

In the background (no `--foreground`) the command starts a detached `--foreground` child
that logs to `$LOG_LOCATION/torchgate.log` (./logs by default) and returns once the child
serves its models (exit 0) or has failed (its one-line error, its exit code). Either way the
server also writes TorchServe's `ts_log.log` and `model_log.log` there
(`api.observability.log_files`). Start-up and config errors, a log folder that cannot be
written among them, are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from api.commands import instances

if TYPE_CHECKING:
    from api.config import Config
    from api.workers.pool import WorkerPool

READY_FD_ENV = "TORCHGATE_READY_FD"
STOP_TIMEOUT_S = 180.0


class UsageError(Exception):
    """A start-up or config error: printed as one line, exit code 2."""


def version() -> str:
    try:
        number = metadata.version("torchgate")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        number = "unknown"
    return f"torchgate version {number} (TorchServe 0.12 command line, archives and APIs)"


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    """torchserve's flags (and torchgate's logging flags), shared by start and --start."""
    parser.add_argument("--ts-config", dest="ts_config", help="config.properties to read")
    parser.add_argument("--model-store", dest="model_store", help="directory of .mar archives")
    parser.add_argument(
        "--models",
        nargs="+",
        action="extend",
        metavar="NAME=URL",
        help="models to load: [NAME=]FILE.mar (in the model store) or `all`; overrides load_models",
    )
    parser.add_argument(
        "--workflow-store", dest="workflow_store", help=".war directory (default: model store)"
    )
    parser.add_argument("--log-config", dest="log_config", help="(a log4j file: not read)")
    parser.add_argument("--cpp-log-config", dest="cpp_log_config", help="(C++ backend: unused)")
    parser.add_argument("--plugins-path", "--ppath", dest="plugins_path", help="(refused)")
    parser.add_argument("--foreground", action="store_true", help="stay in the foreground")
    parser.add_argument(
        "--no-config-snapshots",
        "--ncs",
        dest="no_config_snapshots",
        action="store_true",
        help="neither read nor write the state snapshot",
    )
    parser.add_argument(
        "--disable-token-auth", "--dt", dest="disable_token_auth", action="store_true"
    )
    parser.add_argument("--enable-model-api", dest="enable_model_api", action="store_true")
    add_logging_flags(parser)


def add_logging_flags(parser: argparse.ArgumentParser) -> None:
    """--log-level and --access-log, for `start` and `serve` alike."""
    parser.add_argument(
        "--log-level",
        default=os.environ.get("TORCHGATE_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    parser.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=env_flag("TORCHGATE_ACCESS_LOG"),
        help="the access logs: JSON lines on stdout and TorchServe's access_log.log (default: "
        "torchgate.access_log in config.properties, on when absent; env TORCHGATE_ACCESS_LOG)",
    )


def env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip().lower() not in ("false", "0", "no", "off")


def torchserve_parser() -> argparse.ArgumentParser:
    """`torchgate --start|--stop|--version ...`: torchserve's own form, first word changed."""
    parser = argparse.ArgumentParser(prog="torchgate", description="TorchServe's command line.")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("-v", "--version", action="store_true", help="print the version")
    action.add_argument("--start", action="store_true", help="start the server (the default)")
    action.add_argument("--stop", action="store_true", help="stop the server")
    add_server_flags(parser)
    return parser


def main_torchserve(argv: list[str]) -> int:
    options = torchserve_parser().parse_args(argv)
    if options.version:
        print(version())
        return 0
    if options.stop:
        return stop_command(options.ts_config)
    return start_command(options, [a for a in argv if a != "--start"])


def config_path(ts_config: str | None) -> Path | None:
    """TorchServe's order: TS_CONFIG_FILE, then --ts-config, then ./config.properties."""
    chosen = os.environ.get("TS_CONFIG_FILE") or ts_config
    if chosen:
        path = Path(chosen)
        if not path.is_file():
            raise UsageError(f"--ts-config file not found: {path}")
        return path
    default = Path("config.properties")
    return default if default.is_file() else None


def prepare(options: argparse.Namespace, path: Path | None) -> Config:
    """Read and check everything a start needs (`path`: `config_path`'s choice); raise
    UsageError with the one line to print."""
    from api.config import ConfigError, Overrides, load_config

    if options.plugins_path:
        raise UsageError(
            "--plugins-path: TorchServe's Java plugins cannot run in torchgate (refused)"
        )
    temp = os.environ.get("TEMP")
    if temp and not Path(temp).is_dir():  # TorchServe refuses it too (ts/model_server.py)
        raise UsageError(f"Invalid temp directory: {temp}")
    if not options.foreground:
        _check_log_folder()  # a background start's torchgate.log goes there
    if os.environ.get("METRICS_LOCATION"):
        print(
            "torchgate: warning: METRICS_LOCATION is not used: torchgate writes no metrics "
            "log files; its metrics are on the metrics API (/metrics)",
            file=sys.stderr,
        )
    for flag, value, kind in (
        ("--log-config", options.log_config, "file"),
        ("--cpp-log-config", options.cpp_log_config, "file"),
        ("--workflow-store", options.workflow_store, "directory"),
    ):
        if value is None:
            continue
        exists = Path(value).is_file() if kind == "file" else Path(value).is_dir()
        if not exists:
            raise UsageError(f"{flag} {kind} not found: {value}")
        if flag in _UNUSED:
            print(
                f"torchgate: warning: {flag} is accepted and not used ({_UNUSED[flag]})",
                file=sys.stderr,
            )
    overrides = Overrides(
        model_store=Path(options.model_store) if options.model_store else None,
        models=tuple(options.models or ()),
        workflow_store=Path(options.workflow_store) if options.workflow_store else None,
        disable_token_auth=options.disable_token_auth,
        enable_model_api=options.enable_model_api,
    )
    try:
        config = load_config(path, overrides=overrides)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if "model_store" not in config.raw:
        raise UsageError("missing --model-store (or model_store in config.properties)")
    check_model_store(config)
    _torchserve_paths(config, named=bool(os.environ.get("TS_CONFIG_FILE") or options.ts_config))
    if options.no_config_snapshots:
        config.snapshot_file = None
    return config


def _torchserve_paths(config: Config, *, named: bool) -> None:
    """Where TorchServe keeps its state, and when it reads it back, unless config.properties
    names torchgate's own places (`torchgate.snapshot_file`, `torchgate.key_file`):
    - the snapshot under `$LOG_LOCATION/config` (./logs/config), read at start only when no
      config file is named (TS_CONFIG_FILE, --ts-config): a named file and the flags say what
      loads, and the snapshot is only written then (ConfigManager);
    - key_file.json in the working directory (TokenAuthorization).
    Both stay out of the folder of a config file named elsewhere (KServe mounts it read-only),
    unless the working directory is that folder."""
    if named:
        config.snapshot_restore = False
    from api.snapshot import SNAPSHOT_FILE, SNAPSHOT_FOLDER

    if "torchgate.snapshot_file" not in config.raw:
        folder = Path(os.environ.get("LOG_LOCATION") or "logs").absolute() / "config"
        config.snapshot_file = folder / SNAPSHOT_FOLDER / SNAPSHOT_FILE
        if config.snapshot_restore and not config.snapshot_file.exists():
            _warn_of_torchserve_snapshot(folder)
    if "torchgate.key_file" not in config.raw:
        config.key_file = Path.cwd() / "key_file.json"


# TorchServe's own: `<yyyyMMddHHmmssSSS>-startup.cfg`, `-snapshot.cfg`, `-shutdown.cfg`.
_TORCHSERVE_SNAPSHOT = re.compile(r"\d{17}-(startup|snapshot|shutdown)\.cfg")


def _warn_of_torchserve_snapshot(folder: Path) -> None:
    """TorchServe would start from its last snapshot here; torchgate reads only its own, so a
    user moving over from TorchServe is told how to keep what the snapshot holds (a snapshot
    is a whole config file, read as one)."""
    from api.snapshot import SNAPSHOT_FILE

    if (folder / SNAPSHOT_FILE).exists():
        return  # an earlier torchgate's own, moved and restored at start (`move_legacy_files`)
    try:
        names = [p.name for p in folder.iterdir()]
    except OSError:  # none there, or unreadable: nothing to say
        return
    found = sorted(name for name in names if _TORCHSERVE_SNAPSHOT.fullmatch(name))
    if found:
        print(
            f"torchgate: warning: TorchServe's snapshot {folder / found[-1]} is not restored "
            "(torchgate restores only its own); to start from it as TorchServe would, pass "
            f"--ts-config {folder / found[-1]}",
            file=sys.stderr,
        )


def _check_log_folder() -> None:
    """A background start writes its console output to torchgate.log there: a folder that
    cannot be made or written stops it here, in one line, rather than with a traceback. A
    foreground start serves without TorchServe's log files then, with a warning, as
    TorchServe does (`api.server.run`)."""
    from api.observability.log_files import check_folder, describe_failure, log_folder

    folder = log_folder()
    try:
        check_folder(folder)
    except OSError as exc:
        raise UsageError(describe_failure(folder, exc)) from None


_UNUSED = {
    "--log-config": "a log4j file; torchgate logs with Python logging, see --log-level",
    "--cpp-log-config": "torchgate has no C++ backend",
}


def check_model_store(config: Config) -> None:
    if not config.model_store.is_dir():
        raise UsageError(f"model_store directory not found: {config.model_store}")


def start_command(options: argparse.Namespace, argv: list[str]) -> int:
    try:
        # As TorchServe: a running instance is reported before the flags are checked.
        path = config_path(options.ts_config)
        key = instances.instance_key(path)
        pid = instances.is_running(key)
        if pid is not None:
            raise instances.AlreadyRunning(pid)
        config = prepare(options, path)
    except (UsageError, instances.AlreadyRunning) as exc:
        print(f"torchgate: {exc}", file=sys.stderr)
        return 2
    if options.foreground:
        return serve_foreground(config, options, lock_key=key)
    return start_background(argv, config)


def serve_foreground(config: Config, options: argparse.Namespace, *, lock_key: str | None) -> int:
    """Bind, lock, load, serve until SIGTERM/SIGINT. `lock_key` None: no pid file (`serve`)."""
    from api.commands.listen import StartupError, bind_listeners
    from api.config import ConfigError
    from api.observability.log_files import log_folder

    lock = instances.InstanceLock(lock_key) if lock_key is not None else None
    try:
        if lock is not None:
            lock.acquire()
        sockets = bind_listeners(config)
    except (instances.AlreadyRunning, StartupError) as exc:
        if lock is not None:
            lock.release()
        print(f"torchgate: {exc}", file=sys.stderr)
        return 2
    try:
        notify_ready = _ready_notifier()  # out of the environment before the zygote inherits it
        pool = _launch_worker_pool(config)
        from api.server import run  # ~1.5 s of imports, while the zygote imports torch

        run(  # start-up errors past this point (a bad torchgate.traffic, ...) are ConfigError
            config,
            log_level=options.log_level,
            access_log=options.access_log,
            pool=pool,
            sockets=sockets,
            on_ready=notify_ready,
            log_folder=log_folder(),  # TorchServe's ts_log.log and model_log.log
        )
    except ConfigError as exc:
        print(f"torchgate: {exc}", file=sys.stderr)
        return 2
    finally:
        for sock in sockets.values():  # closed by the servers already unless start-up failed
            sock.close()
        if lock is not None:
            lock.release()
    return 0


def _ready_notifier() -> Callable[[], None] | None:
    """Tell a waiting `torchgate start` (through the pipe it passed) that models serve."""
    fd_text = os.environ.pop(READY_FD_ENV, "")
    if not fd_text.isdigit():
        return None
    fd = int(fd_text)

    def notify() -> None:
        with contextlib.suppress(OSError):
            os.write(fd, b"1")
            os.close(fd)

    return notify


def _launch_worker_pool(config: Config) -> WorkerPool:
    """Start the zygote first: its imports (torch, onnxruntime: ~3 s) then overlap the
    frontend's own (~1.5 s), which shortens start-up to ready by about that much."""
    from api.backends.workdir import make_work_dir
    from api.workers.pool import WorkerPool

    pool = WorkerPool(
        cleanup=make_work_dir(),
        preload=config.worker_preload,
        spin_us=config.spin_us,
        environment=config.worker_environment,
    )
    pool.launch()
    return pool


def start_background(argv: list[str], config: Config) -> int:
    """A detached `--foreground` child with the same arguments (`argv`: the flags after
    `start`); return once it serves, or with its error once it has exited."""
    from api.observability.log_files import log_folder

    log_path = log_folder() / "torchgate.log"  # the folder is made by `prepare`
    read_end, write_end = os.pipe()
    with open(log_path, "ab") as log:
        offset = log.tell()
        child = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "start", "--foreground", *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, READY_FD_ENV: str(write_end)},
            pass_fds=(write_end,),
            start_new_session=True,  # survives this shell; `torchgate stop` ends it
        )
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as ready:
            signalled = ready.read(1)  # EOF without a byte: the child exited before serving
    except KeyboardInterrupt:
        print(
            f"\ntorchgate: stopped waiting; the server (pid {child.pid}) goes on starting "
            "(`torchgate stop` ends it)",
            file=sys.stderr,
        )
        return 130
    if signalled:
        print(
            f"torchgate started (pid {child.pid}): serving on {config.inference_address} "
            f"(management {config.management_address}, "
            f"metrics {config.metrics_address if config.enable_metrics_api else 'off'}); "
            f"log: {log_path}"
        )
        # The server runs on without a model it could not load, as TorchServe's does; the
        # operator who started it hears about it here, not only in the log.
        for failure in _load_failures(log_path, offset):
            print(f"torchgate: warning: {failure}", file=sys.stderr)
        return 0
    code = child.wait()
    print(f"torchgate: {_last_error(log_path, offset)}", file=sys.stderr)
    return code or 2


def _lines_since(log_path: Path, offset: int) -> list[str]:
    """What the server logged since `offset`: this start's lines."""
    with open(log_path, "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace").splitlines()


# How the server logs what it could not load at start: from config.properties, from the
# snapshot (`api.snapshot.restore`), traffic policies, and a handler whose worker could not
# start (`api.core.registry`: its version stays, retried, and answers 503 meanwhile). Each
# pattern's group is what the operator is told.
_LOAD_FAILURES = (
    re.compile(r"(could not load model: .*)"),
    re.compile(r"(could not restore from snapshot: .*)"),
    re.compile(r"(could not apply the traffic policy .*)"),
    re.compile(r"api\.core\.registry: (\S+ worker \d+ failed to start: .*)"),
)


def _load_failures(log_path: Path, offset: int) -> list[str]:
    """What failed to load at start, from the log written since `offset`."""
    failures = []
    for line in _lines_since(log_path, offset):
        for pattern in _LOAD_FAILURES:
            if found := pattern.search(line):
                failures.append(found.group(1))
                break
    return failures


def _last_error(log_path: Path, offset: int) -> str:
    lines = _lines_since(log_path, offset)
    errors = [line.removeprefix("torchgate: ") for line in lines if line.startswith("torchgate: ")]
    if errors:
        return errors[-1]
    tail = [line for line in lines if line.strip()][-1:]
    return f"the server exited during start-up ({tail[0] if tail else 'no output'}); see {log_path}"


def stop_command(ts_config: str | None) -> int:
    """Stop the instance running `ts_config` or, without one, every instance (TorchServe has
    only one), each draining its accepted requests first."""
    key = None
    if ts_config or os.environ.get("TS_CONFIG_FILE"):
        try:
            key = instances.instance_key(config_path(ts_config))
        except UsageError as exc:
            print(f"torchgate: {exc}", file=sys.stderr)
            return 2
    found = instances.running(key)
    if not found:
        print("torchgate is not currently running.")
        return 0
    failed = False
    for instance in found:
        if instances.stop(instance, STOP_TIMEOUT_S):
            print(f"torchgate has stopped (pid {instance.pid}).")
        else:
            print(
                f"torchgate: pid {instance.pid} did not stop within {STOP_TIMEOUT_S:.0f}s",
                file=sys.stderr,
            )
            failed = True
    return 1 if failed else 0
