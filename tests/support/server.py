"""Run the real `torchgate serve` as a subprocess on free ports, for integration tests.

    from tests.support.server import running_torchgate

    with running_torchgate("model_store=/abs/store\\nload_models=all\\n") as tg:
        httpx.post(f"{tg.inference_url}/predictions/digits", json=[0.0] * 64)
        tg.management_url, tg.metrics_url, tg.grpc_inference_port, tg.grpc_management_port

`config` is config.properties text, or the path of one (copied; a relative ``model_store`` keeps
pointing where it pointed). The copy is written as ``config.properties`` in `workdir` (a private
temporary directory unless given) with the five ports set to free ones on 127.0.0.1 and token
authorization off unless the config turns it on; everything else is kept. Pass the same
`workdir` to a second `running_torchgate` to restart on the same state: the default snapshot
lives in ``<workdir>/logs/config/``.

The context manager returns once GET /ping answers 200 (torchgate turns healthy only after its
start-up models are loaded). On exit the server gets SIGTERM (a graceful stop), and SIGKILL if
it is still running after `stop_timeout`; `kill()` sends SIGKILL at once, as a crash would.

`post_many` sends many requests over a few keep-alive connections with a minimal HTTP/1.1
client: an order of magnitude cheaper per request than httpx, which matters on a 2-core machine
where the client and the server share the cores.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from api.config import read_properties
from tests.support.torchserve import free_addresses

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class TorchgateServer:
    """A running `torchgate serve`; URLs have no trailing slash."""

    inference_url: str
    management_url: str
    metrics_url: str
    grpc_inference_port: int
    grpc_management_port: int
    workdir: Path
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is drained, flushed or saved."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful), then SIGKILL after `timeout`; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(timeout=10)


@contextmanager
def running_torchgate(
    config: str | Path,
    *,
    workdir: Path | None = None,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    startup_timeout: float = 60.0,
    stop_timeout: float = 30.0,
    healthy: bool = True,
    command: str = "serve",
    scheme: str = "http",
) -> Iterator[TorchgateServer]:
    """Start `torchgate serve --config <copy of config> *args`; see the module docstring.

    `command="start"`: TorchServe's form instead, `torchgate start --foreground
    --ts-config=<copy of config> *args` (as KServe's runtime starts it).

    `healthy=False`: return once the start-up models are loaded (torchgate logs "torchgate
    serving"), even if one of them is not ready and /ping stays unhealthy. `scheme="https"`:
    the three REST addresses are https:// (the config must name the key; /ping is polled
    without verifying the certificate).
    """
    private = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="torchgate-")) if workdir is None else workdir
    workdir.mkdir(parents=True, exist_ok=True)
    if isinstance(config, Path):
        text, base = config.read_text(), config.resolve().parent
    else:
        text, base = config, workdir
    raw = read_properties(text)
    overrides = {
        **free_addresses(scheme),
        "disable_token_authorization": raw.get("disable_token_authorization", "true"),
        "model_store": str(base / raw.get("model_store", "model_store")),
    }
    # Later keys win in a .properties file, so the overrides are appended.
    config_path = workdir / "config.properties"
    config_path.write_text(text + "\n" + "".join(f"{k}={v}\n" for k, v in overrides.items()))
    log_path = workdir / "torchgate.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "api.cli", *_command(command, config_path), *args],
            cwd=workdir,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C on the test run is not sent to it twice
        )
    server = TorchgateServer(
        inference_url=overrides["inference_address"],
        management_url=overrides["management_address"],
        metrics_url=overrides["metrics_address"],
        grpc_inference_port=int(overrides["grpc_inference_port"]),
        grpc_management_port=int(overrides["grpc_management_port"]),
        workdir=workdir,
        config_path=config_path,
        log_path=log_path,
        process=process,
    )
    try:
        _wait_healthy(server, startup_timeout, "/ping" if healthy else None)
        yield server
    finally:
        server.stop(stop_timeout)
        if private:
            shutil.rmtree(workdir, ignore_errors=True)


def _command(command: str, config_path: Path) -> list[str]:
    if command == "serve":
        return ["serve", "--config", str(config_path)]
    assert command == "start", command
    return ["start", "--foreground", f"--ts-config={config_path}"]


def _wait_healthy(server: TorchgateServer, timeout: float, ping: str | None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"torchgate exited with {server.process.returncode} during start-up:\n"
                + _tail(server.log_text())
            )
        if ping is None:
            if "torchgate serving" in server.log_text():
                return
        else:
            try:
                url = f"{server.inference_url}{ping}"
                # A test server's certificate is its own: not verified here.
                unverified = ssl._create_unverified_context() if url.startswith("https") else None
                with urllib.request.urlopen(url, timeout=5, context=unverified) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet, or 500 "Unhealthy" while models load
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"torchgate not healthy after {timeout:.0f}s:\n" + _tail(server.log_text())
            )
        time.sleep(0.05)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


async def post_many(
    url: str,
    count: int,
    *,
    concurrency: int = 16,
    body: bytes = b"x",
    headers: Callable[[int], Mapping[str, str]] | None = None,
) -> list[Reply]:
    """POST `body` to `url` `count` times over `concurrency` keep-alive connections.

    Request i carries `headers(i)`; the replies come back in request order. Every response must
    carry a Content-Length (torchgate's all do); anything else fails the call.
    """
    parts = urlsplit(url)
    assert parts.hostname and parts.port, url
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    replies: list[Reply | None] = [None] * count
    indexes = iter(range(count))  # shared: each connection takes the next request

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            for i in indexes:
                extra = "".join(f"{k}: {v}\r\n" for k, v in (headers(i) if headers else {}).items())
                head = (
                    f"POST {target} HTTP/1.1\r\nhost: {parts.netloc}\r\n"
                    f"content-length: {len(body)}\r\n{extra}\r\n"
                )
                writer.write(head.encode("latin-1") + body)
                status_line, *lines = (
                    (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                )
                fields = dict(line.split(":", 1) for line in lines if line)
                received = {k.lower(): v.strip() for k, v in fields.items()}
                content = await reader.readexactly(int(received["content-length"]))
                replies[i] = Reply(int(status_line.split()[1]), received, content)
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(min(concurrency, count))))
    assert all(reply is not None for reply in replies)
    return [reply for reply in replies if reply is not None]


def scale_workers(server: TorchgateServer, model: str, workers: int) -> httpx.Response:
    """Set `model`'s default version to exactly `workers` workers; answers once they run."""
    params: dict[str, int | str] = {
        "min_worker": workers,
        "max_worker": workers,
        "synchronous": "true",
    }
    return httpx.put(f"{server.management_url}/models/{model}", params=params, timeout=60)


def worker_pids(server: TorchgateServer, model: str) -> list[int]:
    """The pids of `model`'s default version's READY workers, from describe."""
    with urllib.request.urlopen(f"{server.management_url}/models/{model}", timeout=30) as reply:
        described = json.loads(reply.read())
    return [int(w["pid"]) for w in described[0]["workers"] if w["status"] == "READY"]
