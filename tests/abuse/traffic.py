"""Good traffic: clients that each send valid digits predictions at a steady rate, in a process
of their own, so the attacks' Python (which holds the test process's GIL) cannot delay them and
pass for a slow server.

    traffic = GoodTraffic.start(server.inference_url, log_path)
    ...
    traffic.wait_past(time.monotonic())   # every request started before now has its answer
    for sample in traffic.samples(): ...
    traffic.stop()

Each answer is one line of the log: client, start (CLOCK_MONOTONIC, shared by every process on
the machine, so the attacker's timestamps compare with it), latency, status (-1 for a failed
connection) and the error's text.

Run as `python -m tests.abuse.traffic URL LOG [CLIENTS] [RATE]` (what `start` does).
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tests.support.server import ROOT

BODY = json.dumps([0.0] * 64).encode()  # a valid digits row


@dataclass(frozen=True, slots=True)
class Sample:
    client: int
    started: float
    latency: float
    status: int  # -1: the connection failed
    error: str

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class GoodTraffic:
    process: subprocess.Popen[bytes]
    log_path: Path
    clients: int

    @classmethod
    def start(cls, url: str, log_path: Path, clients: int = 4, rate: float = 50) -> GoodTraffic:
        log_path.write_text("")
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.abuse.traffic",
                url,
                str(log_path),
                str(clients),
                str(rate),
            ],
            cwd=ROOT,
        )
        traffic = cls(process, log_path, clients)
        traffic.wait_past(time.monotonic())  # it is flowing before anything is measured
        return traffic

    def samples(self) -> list[Sample]:
        text = self.log_path.read_text()
        lines = text.splitlines()[: text.count("\n")]  # a line still being written is skipped
        samples = []
        for line in lines:
            client, started, latency, status, error = line.split(" ", 4)
            samples.append(Sample(int(client), float(started), float(latency), int(status), error))
        return samples

    def wait_past(self, moment: float, timeout: float = 60) -> None:
        """Until every client has started a request after `moment`: a client sends one request
        at a time, so every one it started before has been answered (or has failed)."""
        deadline = time.monotonic() + timeout
        while True:
            latest: dict[int, float] = {}
            for sample in self.samples():
                latest[sample.client] = max(latest.get(sample.client, 0.0), sample.started)
            if len(latest) == self.clients and min(latest.values()) > moment:
                return
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the good-traffic process exited with {self.process.returncode}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"good traffic did not get past {moment:.1f} in {timeout} s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)


def _client(index: int, url: str, rate: float, stop: threading.Event, log: Log) -> None:
    """Paced, not closed-loop: a slow answer delays the next request but no burst follows it,
    so the server sees the same load whatever it does."""
    parts = urlsplit(url)
    assert parts.hostname and parts.port, url
    headers = {"content-type": "application/json"}
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    next_at = time.monotonic()
    while not stop.is_set():
        stop.wait(max(0.0, next_at - time.monotonic()))
        started = time.monotonic()
        next_at = max(next_at + 1 / rate, started)
        try:
            connection.request("POST", "/predictions/digits", BODY, headers)
            response = connection.getresponse()
            response.read()
            status, error = response.status, ""
        except (OSError, http.client.HTTPException) as exc:
            status, error = -1, repr(exc)
            connection.close()  # http.client reconnects on the next request
        log.write(index, started, time.monotonic() - started, status, error)
    connection.close()


class Log:
    def __init__(self, path: Path) -> None:
        self.file = open(path, "a")  # noqa: SIM115 (open for the process's life)
        self.lock = threading.Lock()

    def write(self, client: int, started: float, latency: float, status: int, error: str) -> None:
        line = f"{client} {started:.6f} {latency:.6f} {status} {' '.join(error.split())}\n"
        with self.lock:
            self.file.write(line)
            self.file.flush()


def main(argv: list[str]) -> None:
    url, path = argv[0], Path(argv[1])
    clients = int(argv[2]) if len(argv) > 2 else 4
    rate = float(argv[3]) if len(argv) > 3 else 50
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    log = Log(path)
    threads = [
        threading.Thread(target=_client, args=(i, url, rate, stop, log)) for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        stop.wait(0.2)  # the main thread takes the signal; the clients finish their request
    log.file.close()


if __name__ == "__main__":
    main(sys.argv[1:])
