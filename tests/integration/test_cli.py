"""`torchgate`'s command line as real processes: TorchServe's start/stop flags, two instances with
different configs, a stop that drains, start-up errors as one line with exit code 2, the
management CLI against a running server, and the same `torchserve --start ...` command line
(first word changed) starting real TorchServe and torchgate on the same models.

Every command runs with a private TMPDIR (pid files) and LOG_LOCATION, so nothing here meets
another test's or the developer's own servers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.archives import ECHO, build_archive
from tests.support.cli import run_torchgate
from tests.support.processes import wait_until
from tests.support.torchserve import free_addresses

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]

# Touches the file its request names (the test then knows the request is in the handler),
# then takes a while: long enough that a stop arrives while it runs.
SLOW = """
    import pathlib
    import time

    def handle(data, context):
        if data is None:
            return None
        answers = []
        for row in data:
            body = row.get("body") or row.get("data")
            pathlib.Path(body.decode() if isinstance(body, (bytes, bytearray)) else body).touch()
            time.sleep(1.5)
            answers.append("done")
        return answers
"""


@dataclass
class Env:
    root: Path  # working directory of every command
    store: Path
    tmp: Path  # TMPDIR: torchgate's pid files

    def environ(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1",
            "TMPDIR": str(self.tmp),
            "LOG_LOCATION": str(self.root / "logs"),
            **extra,
        }

    def torchgate(
        self, *args: str, timeout: float = 120, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return run_torchgate(*args, cwd=self.root, env=self.environ(**env), timeout=timeout)

    def config(self, name: str, **values: str) -> tuple[Path, dict[str, str]]:
        addresses = free_addresses()
        lines = {**addresses, **values}
        path = self.root / name
        path.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
        return path, addresses


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    # Short, private paths: TorchServe's worker sockets live under TMPDIR (about 100 bytes).
    root = Path(tempfile.mkdtemp(prefix="tgcli-", dir="/tmp"))
    store, tmp = root / "store", root / "tmp"
    store.mkdir()
    tmp.mkdir()
    build_archive(root, "echo", "handler.py", {"handler.py": ECHO}, export_dir=store)
    build_archive(root, "slow", "handler.py", {"handler.py": SLOW}, export_dir=store)
    yield Env(root, store, tmp)
    shutil.rmtree(root, ignore_errors=True)


# The config says otherwise on every point the command line sets: the flags must win.
A_CONFIG = {
    "model_store": "/nonexistent/store",
    "load_models": "missing.mar",
    "enable_model_api": "false",
    "disable_token_authorization": "false",
}


def torchserve_args(env: Env, config: Path) -> list[str]:
    """One command line for both servers: `torchserve` or `torchgate` goes in front."""
    return [
        "--start",
        "--ncs",
        "--model-store",
        str(env.store),
        "--models",
        "echo=echo.mar",
        "slow=slow.mar",
        "--ts-config",
        str(config),
        "--disable-token-auth",
        "--enable-model-api",
    ]


@dataclass
class Servers:
    a_management: str
    a_inference: str
    b_management: str
    b_inference: str
    b_config: Path
    ts_management: str
    ts_inference: str


@pytest.fixture(scope="module")
def servers(env: Env) -> Iterator[Servers]:
    """Real TorchServe and torchgate A started with the same command line (their configs differ
    only in ports), and torchgate B beside A with another config."""
    ts_config, ts_addresses = env.config("ts.properties", **A_CONFIG)
    a_config, a_addresses = env.config("a.properties", **A_CONFIG)
    b_config, b_addresses = env.config(
        "b.properties",
        load_models="slow.mar",
        disable_token_authorization="true",
        enable_envvars_config="true",
    )
    ts_tmp = env.root / "ts-tmp"
    ts_tmp.mkdir()
    ts_env = {
        **os.environ,
        "TEMP": str(ts_tmp),
        "TMPDIR": str(ts_tmp),
        "LOG_LOCATION": str(ts_tmp / "logs"),
        "METRICS_LOCATION": str(ts_tmp / "logs"),
    }
    torchserve = str(Path(sys.executable).with_name("torchserve"))
    launcher = None
    if shutil.which("java") is not None:
        # Own session: the launcher's java and its workers share a group we can kill at once.
        launcher = subprocess.Popen(
            [torchserve, *torchserve_args(env, ts_config)],
            cwd=ts_tmp,
            env=ts_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        # Both at once (each command returns once its server serves): two instances with
        # different configs side by side, and half the start-up wall time on two cores.
        with ThreadPoolExecutor(2) as pool:
            a = pool.submit(env.torchgate, *torchserve_args(env, a_config))
            b = pool.submit(  # KServe's TorchServe runtime's command line, first word changed
                env.torchgate,
                "--start",
                f"--model-store={env.store}",
                f"--ts-config={b_config}",
                TS_JOB_QUEUE_SIZE="7",
            )
            for started in (a.result(), b.result()):
                assert started.returncode == 0, started.stderr
                assert started.stdout.startswith("torchgate started (pid ")
        if launcher is not None:
            _wait_torchserve(ts_addresses["management_address"], ["echo", "slow"])
        yield Servers(
            a_addresses["management_address"],
            a_addresses["inference_address"],
            b_addresses["management_address"],
            b_addresses["inference_address"],
            b_config,
            ts_addresses["management_address"] if launcher else "",
            ts_addresses["inference_address"] if launcher else "",
        )
    finally:
        stopped = env.torchgate("stop")
        if launcher is not None:
            subprocess.run(
                [torchserve, "--stop", "--foreground"], env=ts_env, capture_output=True, timeout=90
            )
            with suppress(ProcessLookupError):
                os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
        assert stopped.returncode == 0, stopped.stderr
        assert not list(env.tmp.glob("torchgate-*.pid"))


def _wait_torchserve(management: str, models: list[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    for name in models:
        while True:
            try:
                answer = httpx.get(f"{management}/models/{name}", timeout=5)
                workers = answer.json()[0]["workers"] if answer.status_code == 200 else []
                if workers and all(w["status"] == "READY" for w in workers):
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"TorchServe did not load {name}"
            time.sleep(0.25)


# --- without a server ----------------------------------------------------------------------------


def test_version_in_every_form(env: Env) -> None:
    for args in (["--version"], ["-v"], ["version"]):
        answer = env.torchgate(*args)
        assert answer.returncode == 0
        assert answer.stdout.startswith("torchgate version ")


def one_line_exit_2(answer: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert answer.returncode == 2, answer.stdout + answer.stderr
    line = answer.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith("torchgate: ")
    for text in expected:
        assert text in line
    return line


def test_missing_model_store_refuses_to_start(env: Env) -> None:
    one_line_exit_2(
        env.torchgate("start", "--foreground", "--model-store", "no-such-store"),
        "model_store directory not found",
        "no-such-store",
    )
    config, _ = env.config("nostore.properties", model_store="gone")
    one_line_exit_2(env.torchgate("serve", "--config", str(config)), "model_store directory")
    one_line_exit_2(
        env.torchgate("start", "--ts-config", str(config)), "model_store directory not found"
    )


def test_config_errors_are_one_line(env: Env) -> None:
    one_line_exit_2(
        env.torchgate("start", "--ts-config", "nowhere.properties"), "--ts-config file not found"
    )
    bad, _ = env.config("bad.properties", model_store=str(env.store), job_queue_size="lots")
    one_line_exit_2(env.torchgate("--start", "--ts-config", str(bad)), "job_queue_size", "lots")
    ref, _ = env.config("ref.properties", model_store="$$TG_TEST_UNSET_STORE$$")
    one_line_exit_2(env.torchgate("start", "--ts-config", str(ref)), "$$TG_TEST_UNSET_STORE$$")
    one_line_exit_2(
        env.torchgate("start", "--model-store", str(env.store), "--plugins-path", str(env.root)),
        "--plugins-path",
    )
    one_line_exit_2(  # as TorchServe's model_server.py: a TEMP that is not a directory
        env.torchgate("start", "--model-store", str(env.store), TEMP=str(env.root / "gone")),
        "Invalid temp directory",
    )


def test_port_in_use_is_one_line_before_anything_is_announced(env: Env) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config, _ = env.config(
            "busy.properties",
            model_store=str(env.store),
            load_models="echo.mar",
            management_address=f"http://127.0.0.1:{port}",
        )
        answer = env.torchgate("start", "--foreground", "--ts-config", str(config))
        one_line_exit_2(answer, "management_address", str(port), "port in use")
        assert "serving" not in answer.stdout + answer.stderr
        # In the background too: the parent reports the child's line and code.
        answer = env.torchgate("start", "--ts-config", str(config))
        one_line_exit_2(answer, "port in use")


# --- against running servers ---------------------------------------------------------------------


def test_flags_override_the_config(env: Env, servers: Servers) -> None:
    """A's config names another store, another model, token auth on and the model API off:
    --model-store, --models, --disable-token-auth and --enable-model-api win."""
    listed = httpx.get(f"{servers.a_management}/models").json()  # no token needed
    assert sorted(m["modelName"] for m in listed["models"]) == ["echo", "slow"]
    answer = httpx.post(f"{servers.a_inference}/predictions/echo", content=b"hello")
    assert answer.status_code == 200
    assert answer.content == b"hello"
    log = (env.root / "logs" / "torchgate.log").read_text()
    assert "torchgate serving 2 model version(s)" in log


def test_environment_variables_override_with_enable_envvars_config(servers: Servers) -> None:
    """B's config says enable_envvars_config=true; it was started with TS_JOB_QUEUE_SIZE=7."""
    described = httpx.get(f"{servers.b_management}/models/slow").json()
    assert described[0]["jobQueueStatus"]["remainingCapacity"] == 7


def test_a_second_start_of_the_same_config_is_refused(env: Env, servers: Servers) -> None:
    one_line_exit_2(env.torchgate("start", "--ts-config", str(servers.b_config)), "already running")


def descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *descendants(int(child))]
    return found


def test_workers_do_not_inherit_the_start_commands_ready_pipe(env: Env, servers: Servers) -> None:
    """`torchgate start` passes the server TORCHGATE_READY_FD; the zygote and its workers,
    started before the server took it out of its environment, inherited it."""
    servers_pids = [int(p.read_text().split()[0]) for p in env.tmp.glob("torchgate-*.pid")]
    children = [child for pid in servers_pids for child in descendants(pid)]
    assert len(children) >= 4  # per server: the zygote and a worker per model, at least
    for child in children:
        assert b"TORCHGATE_READY_FD=" not in Path(f"/proc/{child}/environ").read_bytes()


def test_management_cli(env: Env, servers: Servers) -> None:
    url = ["--url", servers.a_management]
    table = env.torchgate("models", *url, "list")
    assert table.returncode == 0, table.stderr
    assert table.stdout.split("\n")[0].split() == ["MODEL", "URL"]
    assert {line.split()[0] for line in table.stdout.strip().split("\n")[1:]} == {"echo", "slow"}

    listed = env.torchgate(
        "models", "list", "--json", TORCHGATE_MANAGEMENT_URL=servers.a_management
    )
    assert listed.returncode == 0, listed.stderr
    assert {m["modelName"] for m in json.loads(listed.stdout)["models"]} == {"echo", "slow"}

    registered = env.torchgate(
        "models", *url, "register", "echo.mar", "--model-name", "echo2", "--initial-workers", "1"
    )
    assert registered.returncode == 0, registered.stderr
    assert "echo2" in registered.stdout
    described = env.torchgate("models", *url, "describe", "echo2", "--json")
    assert json.loads(described.stdout)[0]["modelName"] == "echo2"
    people = env.torchgate("models", *url, "describe", "echo2")
    assert people.stdout.split("\n")[1].split()[:4] == ["echo2", "1.0", "yes", "READY"]

    missing = env.torchgate("models", *url, "describe", "nope")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "torchgate models: Model not found: nope (HTTP 404)"
    unregistered = env.torchgate("models", *url, "unregister", "echo2")
    assert unregistered.returncode == 0, unregistered.stderr


def test_same_torchserve_command_line_serves_the_same_models(servers: Servers) -> None:
    if not servers.ts_management:
        pytest.skip("TorchServe needs Java (java not on PATH)")
    listed = {
        name: httpx.get(f"{management}/models").json()
        for name, management in (("ts", servers.ts_management), ("tg", servers.a_management))
    }
    assert listed["ts"] == listed["tg"]
    for inference in (servers.ts_inference, servers.a_inference):
        answer = httpx.post(f"{inference}/predictions/echo", content=b"same")
        assert (answer.status_code, answer.content) == (200, b"same")


def test_stop_drains_in_flight_requests(env: Env, servers: Servers) -> None:
    """`torchgate stop --ts-config b` while B runs a request: the request is answered, B exits,
    A keeps serving."""
    marker = env.root / "in-handler"
    answers: list[httpx.Response] = []
    request = threading.Thread(
        target=lambda: answers.append(
            httpx.post(
                f"{servers.b_inference}/predictions/slow", content=str(marker).encode(), timeout=60
            )
        )
    )
    request.start()
    wait_until(marker.exists, timeout=30)
    stopped = env.torchgate("stop", "--ts-config", str(servers.b_config))
    request.join()
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.startswith("torchgate has stopped")
    assert answers[0].status_code == 200
    assert answers[0].text == "done"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{servers.b_inference}/ping")
    assert httpx.get(f"{servers.a_inference}/ping").status_code == 200
    assert len(list(env.tmp.glob("torchgate-*.pid"))) == 1


def test_a_named_config_and_its_flags_win_over_the_last_snapshot(env: Env) -> None:
    """TorchServe reads its last snapshot only when no config file is named: with
    `--ts-config`, a restart serves what the command line now says (`--models`), not what the
    previous run saved. torchgate still writes its snapshot then."""
    config, addresses = env.config("snap.properties", disable_token_authorization="true")
    management = addresses["management_address"]
    common = ["--start", "--model-store", str(env.store), "--ts-config", str(config)]
    try:
        for model in ("echo", "slow"):
            started = env.torchgate(*common, "--models", f"{model}={model}.mar")
            assert started.returncode == 0, started.stderr
            listed = httpx.get(f"{management}/models").json()["models"]
            assert [m["modelName"] for m in listed] == [model]
            stopped = env.torchgate("stop", "--ts-config", str(config))
            assert stopped.returncode == 0, stopped.stderr
        folder = env.root / "logs/config"
        snapshot = json.loads((folder / "torchgate/torchgate-snapshot.json").read_text())
        assert list(snapshot["models"]) == ["slow"]  # written by the second run
        # TorchServe reads every file there as its own snapshot, and fails to start on a name
        # without its timestamp (FSSnapshotSerializer): torchgate's files are in a folder.
        assert [p.name for p in folder.iterdir() if not p.is_dir()] == []
    finally:
        env.torchgate("stop", "--ts-config", str(config))


def test_load_models_all_loads_every_archive_form_in_the_store(env: Env) -> None:
    """`load_models=ALL` (TorchServe compares it ignoring case) loads each non-hidden entry of
    the store that is a folder (--archive-format no-archive) or a .mar, .model or .tar.gz
    file, as TorchServe's model server does; anything else is left alone."""
    store = env.root / "every-form"
    store.mkdir()
    for name, form in (("plain", "default"), ("folder", "no-archive"), ("tarred", "tgz")):
        build_archive(
            env.root, name, "handler.py", {"handler.py": ECHO},
            archive_format=form, export_dir=store,
        )  # fmt: skip
    (store / ".hidden").mkdir()
    (store / "notes.txt").write_text("not a model")
    config, addresses = env.config(
        "all.properties", model_store=str(store), load_models="ALL",
        disable_token_authorization="true",
    )  # fmt: skip
    try:
        started = env.torchgate("--start", "--ncs", "--ts-config", str(config))
        assert started.returncode == 0, started.stderr
        listed = httpx.get(f"{addresses['management_address']}/models").json()["models"]
        assert sorted(m["modelName"] for m in listed) == ["folder", "plain", "tarred"]
    finally:
        env.torchgate("stop", "--ts-config", str(config))


def test_a_model_that_cannot_load_is_reported_on_the_start_command(env: Env) -> None:
    """The server serves the models it could load (as TorchServe's); `torchgate start` says
    on stderr which it could not, not only in the log."""
    config, addresses = env.config("partial.properties", disable_token_authorization="true")
    args = ["--start", "--ncs", "--model-store", str(env.store), "--ts-config", str(config)]
    try:
        started = env.torchgate(*args, "--models", "echo=echo.mar", "ghost=ghost.mar")
        assert started.returncode == 0, started.stderr
        assert "torchgate: warning: could not load model: " in started.stderr
        assert "ghost.mar" in started.stderr
        listed = httpx.get(f"{addresses['management_address']}/models").json()["models"]
        assert [m["modelName"] for m in listed] == ["echo"]
    finally:
        env.torchgate("stop", "--ts-config", str(config))
