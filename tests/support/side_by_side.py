"""Real TorchServe and torchgate on the same model store and keys, started together.

    with side_by_side(store, {"service_envelope": "kserve"}) as servers:
        servers["torchserve"].inference, servers["torchgate"].grpc_port

The two start-ups overlap (TorchServe's in a thread), which roughly halves a differential test
module's set-up time. Every archive in `store` is loaded (`load_models=all`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.server import running_torchgate
from tests.support.torchserve import running_torchserve


@dataclass(frozen=True)
class Endpoints:
    inference: str  # base URL, no trailing slash
    grpc_port: int
    management: str  # base URL, no trailing slash


@contextmanager
def side_by_side(
    store: Path, config: Mapping[str, str] | None = None, *, workdir: Path | None = None
) -> Iterator[dict[str, Endpoints]]:
    config = dict(config or {})
    found: dict[str, Endpoints] = {}
    failure: list[BaseException] = []
    ready, stop = threading.Event(), threading.Event()

    def torchserve() -> None:
        try:
            with running_torchserve(store, None, "all", extra_config=config) as ts:
                found["torchserve"] = Endpoints(
                    ts.inference_url, ts.grpc_inference_port, ts.management_url
                )
                ready.set()
                stop.wait()
        except BaseException as exc:
            failure.append(exc)
            ready.set()

    thread = threading.Thread(target=torchserve, name="torchserve")
    thread.start()
    try:
        text = f"model_store={store}\nload_models=all\n"
        text += "".join(f"{key}={value}\n" for key, value in config.items())
        with running_torchgate(text, workdir=workdir) as tg:
            ready.wait()
            if failure:
                raise failure[0]
            yield {
                "torchserve": found["torchserve"],
                "torchgate": Endpoints(tg.inference_url, tg.grpc_inference_port, tg.management_url),
            }
    finally:
        stop.set()
        thread.join()
