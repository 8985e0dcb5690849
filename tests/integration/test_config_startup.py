"""`torchgate serve` start-up with TorchServe's keys: HTTPS from a PKCS12 keystore, models from
`model_snapshot=`, warnings for unknown and unsupported keys, the effective configuration in
the log with the keystore password masked, and a refused keystore stopping the start cleanly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    load_pem_private_key,
    pkcs12,
)

from tests.support.archives import ECHO, build_archive
from tests.support.server import ROOT, TorchgateServer, running_torchgate
from tests.support.tls import write_certificate
from tests.support.torchserve import free_addresses

pytestmark = pytest.mark.integration

PASSWORD = "p12-secret-pass"


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TorchgateServer, Path]]:
    folder = tmp_path_factory.mktemp("startup")
    cert, key = write_certificate(folder)
    keystore = folder / "server.p12"
    keystore.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"torchgate",
            load_pem_private_key(key.read_bytes(), None),  # type: ignore[arg-type]
            x509.load_pem_x509_certificate(cert.read_bytes()),
            None,
            BestAvailableEncryption(PASSWORD.encode()),
        )
    )
    # Version 3.0 as the snapshot names it: TorchServe registers the archive's own version.
    store = build_archive(folder, "echo", "echo.py", {"echo.py": ECHO}, version="3.0").parent
    snapshot = {
        "name": "startup.cfg",
        "modelCount": 1,
        "models": {
            "snapecho": {
                "3.0": {"defaultVersion": True, "marName": "echo.mar", "minWorkers": 1,
                        "maxWorkers": 1, "batchSize": 1, "maxBatchDelay": 100,
                        "responseTimeout": 120}
            }
        },
    }  # fmt: skip
    config = (
        f"model_store={store}\n"
        "load_models=echo.mar\n"  # not read: model_snapshot replaces it, as in TorchServe
        f"model_snapshot={json.dumps(snapshot)}\n"
        f"keystore={keystore}\nkeystore_pass={PASSWORD}\nkeystore_type=PKCS12\n"
        "torchgate.snapshot_file=\n"
        "inferance_address=http://127.0.0.1:1\n"
        "ipex_enable=true\n"
        "number_of_netty_threads=4\n"
    )
    with running_torchgate(config, scheme="https") as tg:
        yield tg, cert


def test_https_from_a_pkcs12_keystore(started: tuple[TorchgateServer, Path]) -> None:
    tg, cert = started
    answer = httpx.get(f"{tg.inference_url}/ping", verify=str(cert), timeout=10)
    assert answer.status_code == 200 and answer.json() == {"status": "Healthy"}


def test_model_snapshot_models_are_loaded_instead_of_load_models(
    started: tuple[TorchgateServer, Path],
) -> None:
    tg, cert = started
    models = httpx.get(f"{tg.management_url}/models", verify=str(cert), timeout=10).json()
    assert [m["modelName"] for m in models["models"]] == ["snapecho"]
    answer = httpx.post(
        f"{tg.inference_url}/predictions/snapecho/3.0", content=b"hi", verify=str(cert)
    )
    assert answer.status_code == 200 and answer.content == b"hi"


def test_startup_log_warns_and_prints_the_effective_config(
    started: tuple[TorchgateServer, Path],
) -> None:
    log = started[0].log_text()
    assert "unknown config key inferance_address; did you mean inference_address?" in log
    assert "config key ipex_enable is not supported by torchgate" in log
    # An ignored-harmless key is not warned about, but named at start.
    said = [line for line in log.splitlines() if "number_of_netty_threads (" in line]
    assert len(said) == 1 and " INFO torchgate.config: config keys with no effect" in said[0]
    assert "effective configuration" in log
    assert "keystore_pass: ********" in log
    assert PASSWORD not in log


def test_a_jks_keystore_stops_the_start_with_the_conversion_command(tmp_path: Path) -> None:
    jks = tmp_path / "server.jks"
    jks.write_bytes(b"\xfe\xed\xfe\xed" + b"\x00" * 60)  # JKS magic (test_tls makes a real one)
    config = tmp_path / "config.properties"
    # The other listeners on free ports: the start must stop at the keystore, not at a port
    # some other server holds.
    listeners = {**free_addresses(), "inference_address": "https://127.0.0.1:1"}
    config.write_text(
        f"model_store={tmp_path}\nkeystore={jks}\n"
        + "".join(f"{key}={value}\n" for key, value in listeners.items())
    )
    done = subprocess.run(
        [sys.executable, "-m", "api.cli", "serve", "--config", str(config)],
        cwd=tmp_path,  # its logs/ (TorchServe's log files) there, not in the repository
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "JKS keystore" in done.stderr and "keytool -importkeystore" in done.stderr
    assert "Traceback" not in done.stderr
