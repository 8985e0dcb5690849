"""Registration through a real `torchgate serve` cannot be turned against the machine.

The model API is on and token authorization off, the setting that makes registration matter:
whatever a client names, only archives inside the model store load (an archive's handler runs
at import), names follow TorchServe's rule, an archive bomb is refused from its listing, the
server connects to no TorchServe allowed_urls does not name, and a browser page (cross-origin,
or through DNS rebinding) is refused. Over REST and gRPC, while `steady` keeps answering.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from api.rpc.generated import management_pb2 as management
from api.rpc.generated import management_pb2_grpc as management_grpc
from tests.support.archives import ECHO, build_archive
from tests.support.bombs import many_small_members_bomb
from tests.support.server import TorchgateServer, running_torchgate

pytestmark = pytest.mark.integration

# Runs at import: if this archive ever loads, the marker file says so.
EVIL = """
    from pathlib import Path

    Path({marker!r}).write_text("the handler ran")

    def handle(data, context):
        return data
"""


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("registration")
    store = root / "store"
    outside = root / "outside"
    store.mkdir()
    outside.mkdir()
    marker = root / "evil-ran"
    build_archive(root, "steady", "echo.py", {"echo.py": ECHO}, export_dir=store)
    build_archive(root, "spare", "echo.py", {"echo.py": ECHO}, export_dir=store)
    evil = EVIL.format(marker=str(marker))
    build_archive(root, "evil", "evil.py", {"evil.py": evil}, export_dir=outside)
    many_small_members_bomb(store / "bomb.mar")
    return {"store": store, "evil": outside / "evil.mar", "marker": marker}


@pytest.fixture(scope="module")
def server(paths: dict[str, Path]) -> Iterator[TorchgateServer]:
    config = f"model_store={paths['store']}\nload_models=steady.mar\nenable_model_api=true\n"
    with running_torchgate(config) as server:
        yield server


@pytest.fixture
def rest(server: TorchgateServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.management_url, timeout=60) as client:
        yield client


@pytest.fixture
def rpc(server: TorchgateServer) -> Iterator[management_grpc.ManagementAPIsServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_management_port}") as channel:
        yield management_grpc.ManagementAPIsServiceStub(channel)


def still_serving(server: TorchgateServer) -> None:
    assert httpx.get(f"{server.inference_url}/ping").status_code == 200
    answer = httpx.post(f"{server.inference_url}/predictions/steady", content=b"hi")
    assert answer.status_code == 200 and answer.text == "hi"


def models(rest: httpx.Client) -> list[str]:
    return [m["modelName"] for m in rest.get("/models").json()["models"]]


def test_archives_outside_the_model_store_never_load(
    server: TorchgateServer,
    rest: httpx.Client,
    rpc: management_grpc.ManagementAPIsServiceStub,
    paths: dict[str, Path],
) -> None:
    evil = paths["evil"]
    for url in ("../outside/evil.mar", str(evil), evil.as_uri(), str(evil.parent), "/etc"):
        answer = rest.post("/models", params={"url": url})
        assert answer.status_code == 400, (url, answer.text)
        assert "outside the model store" in answer.json()["message"]
        with pytest.raises(grpc.RpcError) as info:
            rpc.RegisterModel(management.RegisterModelRequest(url=url))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, url
        assert "outside the model store" in (info.value.details() or "")
    assert not paths["marker"].exists(), "the archive's handler ran"
    assert models(rest) == ["steady"]
    still_serving(server)


def test_names_follow_the_rule_whatever_their_source(
    server: TorchgateServer, rest: httpx.Client, rpc: management_grpc.ManagementAPIsServiceStub
) -> None:
    for name in ("../../x", "a\nb", "a/b", ".x"):
        answer = rest.post("/models", params={"url": "spare.mar", "model_name": name})
        assert answer.status_code == 400, (name, answer.text)
        assert "Invalid model name" in answer.json()["message"]
        with pytest.raises(grpc.RpcError) as info:
            rpc.RegisterModel(management.RegisterModelRequest(url="spare.mar", model_name=name))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert models(rest) == ["steady"]
    assert "a\nb" not in server.log_text()  # the newline never reached a log line
    still_serving(server)


def test_an_archive_bomb_is_refused_from_its_listing(
    server: TorchgateServer, rest: httpx.Client, rpc: management_grpc.ManagementAPIsServiceStub
) -> None:
    started = time.monotonic()
    answer = rest.post("/models", params={"url": "bomb.mar"})
    elapsed = time.monotonic() - started
    assert answer.status_code == 400, answer.text
    assert "zip bomb" in answer.json()["message"]
    assert elapsed < 30  # a listing, not 401 MB written (well under a second when idle)
    with pytest.raises(grpc.RpcError) as info:
        rpc.RegisterModel(management.RegisterModelRequest(url="bomb.mar"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert models(rest) == ["steady"]
    still_serving(server)


def test_no_torchserve_target_unless_allowed_urls_names_it(
    server: TorchgateServer, rest: httpx.Client, rpc: management_grpc.ManagementAPIsServiceStub
) -> None:
    for url in ("torchserve://127.0.0.1:9/m/1.0", "torchserve://169.254.169.254:80/m/1.0"):
        answer = rest.post("/models", params={"url": url})
        assert answer.status_code == 400
        assert "is not named by allowed_urls" in answer.json()["message"]
        with pytest.raises(grpc.RpcError) as info:
            rpc.RegisterModel(management.RegisterModelRequest(url=url))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert models(rest) == ["steady"]


def test_browser_pages_cannot_register_but_plain_clients_can(
    server: TorchgateServer, rest: httpx.Client
) -> None:
    # A page's form post: cross-origin, "simple" (no preflight).
    simple = {"origin": "http://evil.example", "content-type": "application/x-www-form-urlencoded"}
    answer = rest.post("/models", params={"url": "spare.mar"}, headers=simple)
    assert answer.status_code == 403
    # DNS rebinding: same-origin to the browser, a foreign name in Host.
    port = server.management_url.rsplit(":", 1)[1]
    rebound = {"host": f"rebind.example:{port}", "origin": f"http://rebind.example:{port}"}
    answer = rest.post("/models", params={"url": "spare.mar"}, headers=rebound)
    assert answer.status_code == 403
    assert models(rest) == ["steady"]

    answer = rest.post("/models", params={"url": "spare.mar"})  # curl, httpx: no Origin
    assert answer.status_code == 200, answer.text
    assert sorted(models(rest)) == ["spare", "steady"]
    assert rest.delete("/models/spare/1.0").status_code == 200
    still_serving(server)
