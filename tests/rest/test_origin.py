"""The management API's browser checks (api.rest.origin), in-process through the real apps.

Built by `api.app.build` with fake archives, so the loader and the management routes are real:
a refused request must not register anything.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from api.app import Torchgate, build
from api.config import parse_config
from api.rest.origin import HostPolicy
from tests.support.fake_backend import load_fake_backend, write_fake_archive

REGISTER = "/models?url=m-1.0.mar"


@asynccontextmanager
async def management(
    tmp_path: Path, **raw: str
) -> AsyncIterator[tuple[Torchgate, httpx.AsyncClient]]:
    store = tmp_path / "model_store"
    write_fake_archive(store, "m", "1.0")
    settings = {
        "model_store": str(store),
        "disable_token_authorization": "true",
        "enable_model_api": "true",
        "torchgate.snapshot_file": "",
        "torchgate.key_file": str(tmp_path / "key_file.json"),
        **raw,
    }
    tg = build(
        parse_config(settings, base_dir=tmp_path),
        work_dir=tmp_path / "work",
        backend_loader=load_fake_backend,
    )
    await tg.start()
    transport = httpx.ASGITransport(app=tg.management_app)
    # The Host header comes from base_url, as with any client.
    client = httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8081")
    try:
        yield tg, client
    finally:
        await client.aclose()
        await tg.stop()


def test_clients_without_origin_keep_working(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with management(tmp_path) as (tg, client):
            answer = await client.post(REGISTER)  # what curl and TorchServe's clients send
            assert answer.status_code == 200, answer.text
            for host in ("localhost:8081", "[::1]:8081", "127.0.0.1", "LOCALHOST"):
                answer = await client.get("/models", headers={"host": host})
                assert answer.status_code == 200, host
            assert tg.registry.names() == ["m"]

    asyncio.run(scenario())


def test_a_cross_origin_simple_post_is_refused_and_registers_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with management(tmp_path) as (tg, client):
            for origin in ("http://evil.example", "null", "http://127.0.0.1:9999"):
                answer = await client.post(
                    REGISTER,
                    headers={"origin": origin, "content-type": "text/plain"},
                )
                assert answer.status_code == 403, origin
                body = answer.json()
                assert body["code"] == 403 and "cors_allowed_origin" in body["message"]
                assert "access-control-allow-origin" not in answer.headers
            assert tg.registry.names() == []
            # The API's own pages (its /docs) are same-origin, and keep working.
            answer = await client.post(REGISTER, headers={"origin": "http://127.0.0.1:8081"})
            assert answer.status_code == 200, answer.text

    asyncio.run(scenario())


def test_dns_rebinding_is_refused_by_the_host_check(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with management(tmp_path) as (tg, client):
            # The page at http://rebind.example:8081 now resolves to 127.0.0.1: same origin
            # to the browser, so only Host gives it away.
            headers = {"host": "rebind.example:8081", "origin": "http://rebind.example:8081"}
            answer = await client.post(REGISTER, headers=headers)
            assert answer.status_code == 403
            assert "is not this server's address" in answer.json()["message"]
            for host in ("rebind.example", "10.1.2.3:8081", "127.0.0.1.nip.io"):
                answer = await client.get("/models", headers={"host": host})
                assert answer.status_code == 403, host
            assert tg.registry.names() == []

    asyncio.run(scenario())


def test_cors_allowed_origin_and_allowed_hosts_open_what_they_name(tmp_path: Path) -> None:
    async def scenario() -> None:
        raw = {
            "cors_allowed_origin": "https://console.example, https://ops.example",
            "torchgate.allowed_hosts": "Gateway.internal",
        }
        async with management(tmp_path, **raw) as (_, client):
            headers = {"origin": "https://ops.example"}
            answer = await client.post(REGISTER, headers=headers)
            assert answer.status_code == 200, answer.text
            assert answer.headers["access-control-allow-origin"] == "https://ops.example"
            answer = await client.get("/models", headers={"origin": "https://evil.example"})
            assert answer.status_code == 403
            answer = await client.get("/models", headers={"host": "gateway.internal:8081"})
            assert answer.status_code == 200
        async with management(tmp_path / "star", cors_allowed_origin="*") as (_, client):
            answer = await client.get("/models", headers={"origin": "https://any.example"})
            assert answer.status_code == 200
            # TorchServe's header, as written in the key (api.rest.cors).
            assert answer.headers["access-control-allow-origin"] == "*"

    asyncio.run(scenario())


def test_with_token_auth_on_the_key_is_the_guard(tmp_path: Path) -> None:
    async def scenario() -> None:
        raw = {"disable_token_authorization": "false"}
        async with management(tmp_path, **raw) as (tg, client):
            assert tg.auth is not None
            key = tg.auth.key("management")
            headers = {"authorization": f"Bearer {key}", "origin": "https://app.example"}
            answer = await client.get("/models", headers=headers)
            assert answer.status_code == 200  # a browser page cannot send the key by itself
            answer = await client.get("/models", headers={"origin": "https://app.example"})
            assert answer.status_code == 401

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("bound", "host", "allowed"),
    [
        ("127.0.0.1", "127.0.0.1:8081", True),
        ("127.0.0.1", "localhost", True),
        ("127.0.0.1", "[::1]:8081", True),
        ("127.0.0.1", "10.0.0.5", False),  # another interface: not where this listens
        ("127.0.0.1", "attacker.example", False),
        ("10.0.0.5", "10.0.0.5:8081", True),
        ("0.0.0.0", "192.168.1.20:8081", True),  # any of the machine's addresses
        ("0.0.0.0", "[fe80::1]:8081", True),
        ("0.0.0.0", "attacker.example:8081", False),  # names are what rebinding uses
        ("::", "attacker.example", False),
        ("gateway.internal", "gateway.internal:8081", True),
        ("gateway.internal", "other.internal", False),
    ],
)
def test_host_policy(bound: str, host: str, allowed: bool) -> None:
    assert HostPolicy(bound).allows(host) is allowed
