"""Start a real TorchServe (0.12) for tests and benchmarks, and leave nothing behind.

    from tests.support.torchserve import running_torchserve

    with running_torchserve(Path("model_store"), Path("config.properties")) as ts:
        httpx.post(f"{ts.inference_url}/predictions/digits", json=[0.0] * 64)
        ts.management_url, ts.metrics_url, ts.grpc_inference_port, ts.grpc_management_port
    assert not ts.leftover_pids()

The config is copied with the five ports rewritten to free ones on 127.0.0.1, token
authorization off (``extra_config={"disable_token_authorization": "false"}`` turns it on;
``ts.key("inference")`` then reads the keys TorchServe wrote) and ``model_store`` made
absolute; everything else (``models={...}``, batch sizes, ...) is kept. TorchServe keeps its
pid file and worker sockets in ``TEMP``/``TMPDIR`` and writes logs to
``LOG_LOCATION``/``METRICS_LOCATION``: all point into a private temporary directory, so an
instance started here never meets another (or the developer's own) one.

The context manager returns once every model version to load has all its workers READY (GET
/ping turns healthy before workers have loaded). On exit it runs ``torchserve --stop`` with
the same environment, waits, then kills the whole process group (launcher, java, Python
workers) if anything is still alive.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class TorchServe:
    """A running TorchServe; URLs have no trailing slash."""

    inference_url: str
    management_url: str
    metrics_url: str
    grpc_inference_port: int
    grpc_management_port: int
    workdir: Path  # private TEMP: config copy, pid file, sockets, logs/
    config_path: Path
    pid: int  # the `torchserve --foreground` launcher; also the process group id

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    def key(self, kind: str) -> str | None:
        """With token authorization on, the key of `kind` ("inference", "management", "API")
        from the key_file.json TorchServe writes in its working directory; else None."""
        path = self.workdir / "key_file.json"
        if not path.exists():
            return None
        return str(json.loads(path.read_text())[kind]["key"])

    def log_text(self, name: str = "ts_log.log") -> str:
        path = self.log_dir / name
        return path.read_text(errors="replace") if path.exists() else ""

    def leftover_pids(self) -> list[int]:
        """Processes of this instance still alive: its process group, or any process whose
        command line names its private directory (java's tmpdir, the workers' sockets)."""
        return _processes(pgid=self.pid, marker=str(self.workdir))


# Ports handed to test servers come from below the kernel's ephemeral range (see free_ports).
LOWEST_TEST_PORT = 10_000


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (held open together while choosing).

    Not from `bind(0)`: the kernel picks those from its ephemeral range, where any outgoing
    connection (a load test opens thousands) may take the port in the seconds before the server
    binds it, and TorchServe then dies with "Address already in use". Below that range only an
    explicit bind takes a port, and each pytest-xdist worker draws from its own slice of it, so
    two workers never pick the same one. Nor does one worker twice: servers started side by
    side each choose before either binds (a JVM takes seconds to), so a port handed out once is
    not handed out again while the slice has others.
    """
    low, high = _port_slice()
    chosen: list[int] = []
    with _handing_out, ExitStack() as stack:
        unused = [port for port in range(low, high) if port not in _handed_out]
        if len(unused) < 50 * count + 100:
            _handed_out.clear()  # a long session went round the slice: start again
            unused = list(range(low, high))
        for port in _random.sample(unused, k=min(len(unused), 50 * count + 100)):
            sock = stack.enter_context(socket.socket())
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use (or lingering): try another
            chosen.append(port)
            if len(chosen) == count:
                _handed_out.update(chosen)
                return chosen
    raise RuntimeError(f"no {count} free ports between {low} and {high}")


_handed_out: set[int] = set()
_handing_out = threading.Lock()  # side-by-side servers start from threads


_random = random.SystemRandom()  # not the test run's seeded generator: workers must differ


@functools.cache  # the range and the worker's name do not change while the process runs
def _port_slice() -> tuple[int, int]:
    """[low, high) for this process: below the ephemeral range, split among xdist workers."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768  # Linux's default
    low, high = LOWEST_TEST_PORT, max(ephemeral_low, LOWEST_TEST_PORT + 1000)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ...
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if worker.startswith("gw") and worker[2:].isdigit() and workers > 1:
        size = (high - low) // workers
        low += int(worker[2:]) % workers * size
        high = low + size
    return low, high


def free_addresses(scheme: str = "http") -> dict[str, str]:
    """config.properties keys putting all five listeners on free loopback ports, so a test's
    server never meets another server on the default ports (a `make serve` left running)."""
    ports = free_ports(5)
    return {
        "inference_address": f"{scheme}://127.0.0.1:{ports[0]}",
        "management_address": f"{scheme}://127.0.0.1:{ports[1]}",
        "metrics_address": f"{scheme}://127.0.0.1:{ports[2]}",
        "grpc_inference_address": "127.0.0.1",
        "grpc_management_address": "127.0.0.1",
        "grpc_inference_port": str(ports[3]),
        "grpc_management_port": str(ports[4]),
    }


def read_properties(path: Path) -> list[tuple[str | None, str]]:
    """(key, logical line) pairs of a .properties file; continuation lines (trailing ``\\``)
    are joined into their logical line, comments and blanks get key None."""
    entries: list[tuple[str | None, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        pending += line + "\n"
        if line.endswith("\\") and not line.endswith("\\\\"):
            continue
        stripped = pending.lstrip()
        if not stripped.strip() or stripped[0] in "#!":
            entries.append((None, pending))
        else:
            entries.append((re.split(r"\s*[=:]", stripped, maxsplit=1)[0].strip(), pending))
        pending = ""
    if pending:
        entries.append((None, pending))
    return entries


def property_value(logical_line: str) -> str:
    value = re.split(r"\s*[=:]\s*", logical_line.strip(), maxsplit=1)[1]
    return re.sub(r"\\\n\s*", "", value).strip()


def write_test_config(
    source: Path | None, target: Path, overrides: Mapping[str, str]
) -> dict[str, str]:
    """Copy `source` to `target` with `overrides` applied; the effective key -> value map."""
    entries = read_properties(source) if source is not None else []
    remaining = dict(overrides)
    lines: list[str] = []
    values: dict[str, str] = {}
    for key, text in entries:
        if key is not None and key in remaining:
            text = f"{key}={remaining.pop(key)}\n"
        if key is not None:
            values[key] = property_value(text)
        lines.append(text)
    for key, value in remaining.items():
        lines.append(f"{key}={value}\n")
        values[key] = value
    target.write_text("".join(lines))
    return values


def expected_versions(load_models: str, model_store: Path) -> list[tuple[str, str]]:
    """(model name, version) for each archive in a ``load_models`` value, from its manifest."""
    if load_models.strip().lower() == "all":
        entries = [path.name for path in sorted(model_store.glob("*.mar"))]
    else:
        entries = [entry.strip() for entry in load_models.split(",") if entry.strip()]
    expected = []
    for entry in entries:
        name, _, url = entry.rpartition("=")
        with zipfile.ZipFile(model_store / url) as mar:
            model = json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]
        expected.append((name or model["modelName"], model.get("modelVersion", "1.0")))
    return expected


@contextmanager
def running_torchserve(
    model_store: Path,
    config_path: Path | None = None,
    models: str | None = None,
    *,
    extra_config: Mapping[str, str] | None = None,
    startup_timeout: float = 240.0,
    scheme: str = "http",
) -> Iterator[TorchServe]:
    """Run TorchServe on `model_store` with a test copy of `config_path`.

    `models` (TorchServe's ``load_models`` syntax: ``"digits=digits.mar,minilm.mar"`` or
    ``"all"``) replaces the config's ``load_models``; `extra_config` sets any other key.
    `scheme="https"`: the three REST addresses are https:// (`extra_config` names the key;
    readiness is polled without verifying the certificate).
    """
    torchserve = Path(sys.executable).with_name("torchserve")
    if shutil.which("java") is None:
        raise RuntimeError("TorchServe needs Java (java not on PATH)")
    # A short private directory: worker sockets live in it and unix socket paths are limited
    # to about 100 bytes, which pytest's tmp_path can exceed.
    workdir = Path(tempfile.mkdtemp(prefix="ts-", dir="/tmp"))
    overrides = {
        **free_addresses(scheme),
        "disable_token_authorization": "true",
        "model_store": str(model_store.resolve()),
        **({"load_models": models} if models is not None else {}),
        **(extra_config or {}),
    }
    config = workdir / "config.properties"
    values = write_test_config(config_path, config, overrides)
    env = {
        **os.environ,
        "TEMP": str(workdir),
        "TMPDIR": str(workdir),
        "TMP": str(workdir),
        "LOG_LOCATION": str(workdir / "logs"),
        "METRICS_LOCATION": str(workdir / "logs"),
    }
    with open(workdir / "torchserve.out", "wb") as out:
        # Own session: launcher, java and workers share a process group we can kill at once.
        process = subprocess.Popen(
            [str(torchserve), "--start", "--ncs", "--foreground", "--ts-config", str(config)],
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    instance = TorchServe(
        inference_url=overrides["inference_address"],
        management_url=overrides["management_address"],
        metrics_url=overrides["metrics_address"],
        grpc_inference_port=int(overrides["grpc_inference_port"]),
        grpc_management_port=int(overrides["grpc_management_port"]),
        workdir=workdir,
        config_path=config,
        pid=process.pid,
    )
    try:
        wanted = expected_versions(values.get("load_models", ""), model_store)
        _wait_ready(instance, process, wanted, startup_timeout)
        yield instance
    finally:
        _stop(instance, process, env)
        shutil.rmtree(workdir, ignore_errors=True)


def _get_json(url: str, key: str | None = None) -> Any:
    # A test server's certificate is its own: not verified here.
    unverified = ssl._create_unverified_context() if url.startswith("https") else None
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(request, timeout=5, context=unverified) as response:
        return json.loads(response.read())


def _wait_ready(
    ts: TorchServe,
    process: subprocess.Popen[bytes],
    wanted: list[tuple[str, str]],
    timeout: float,
) -> None:
    deadline = time.monotonic() + timeout
    pending = list(wanted)
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"TorchServe exited with {process.returncode} during startup:\n"
                + _tail(ts.workdir / "torchserve.out")
            )
        try:
            # With token authorization on, TorchServe 0.12 wants the inference key for /ping.
            _get_json(f"{ts.inference_url}/ping", ts.key("inference"))
            pending = [mv for mv in pending if not _workers_ready(ts, *mv)]
            if not pending:
                return
        except urllib.error.HTTPError as exc:
            if exc.code == 400 and ts.key("API"):
                _renew_keys(ts)  # a short token_expiration_min outlived by a slow start
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            pass  # not listening yet, or the model not registered yet
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"TorchServe models not READY after {timeout:.0f}s: {pending}\n"
                + _tail(ts.log_dir / "ts_log.log")
            )
        time.sleep(0.25)


def _workers_ready(ts: TorchServe, name: str, version: str) -> bool:
    try:
        described = _get_json(f"{ts.management_url}/models/{name}/{version}", ts.key("management"))
    except urllib.error.HTTPError as exc:
        if exc.code == 400 and ts.key("API"):
            _renew_keys(ts)  # expired (its 400 InvalidKeyException); asked again next round
        return False  # 404 until registered
    workers = described[0].get("workers", []) if described else []
    return bool(workers) and all(worker.get("status") == "READY" for worker in workers)


def _renew_keys(ts: TorchServe) -> None:
    """New inference and management keys (TorchServe writes them to key_file.json), asked for
    with the API key, which never expires."""
    for kind in ("inference", "management"):
        request = urllib.request.Request(
            f"{ts.management_url}/token?type={kind}",
            method="POST",
            headers={"Authorization": f"Bearer {ts.key('API')}"},
        )
        with suppress(urllib.error.URLError, TimeoutError):
            urllib.request.urlopen(request, timeout=5).close()


def _stop(ts: TorchServe, process: subprocess.Popen[bytes], env: Mapping[str, str]) -> None:
    torchserve = Path(sys.executable).with_name("torchserve")
    try:
        subprocess.run(
            [str(torchserve), "--stop"],
            env=dict(env),
            cwd=ts.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=STOP_TIMEOUT_S,
            check=False,
        )
        process.wait(timeout=STOP_TIMEOUT_S)  # --stop only signals java; the launcher follows
    except subprocess.TimeoutExpired:
        pass
    # Java stops its workers on SIGTERM; whatever is left after that is killed.
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while (leftovers := ts.leftover_pids()) and time.monotonic() < deadline:
        for pid in leftovers:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    if process.poll() is None:
        process.kill()
    process.wait(timeout=5)


def _processes(pgid: int, marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # exited meanwhile
        # Fields after the parenthesised command: state, ppid, pgrp, ...
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue  # a zombie is dead; its parent reaps it
        if (pgid and int(fields[2]) == pgid) or marker in cmdline:
            found.append(int(entry.name))
    return found


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"({path} not written)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
