"""`api.tls`: the key material from PEM files, PKCS12 and JKS keystores, and what is refused.

A JKS keystore is made by the real keytool (OpenJDK), PKCS12 by `cryptography`.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, pkcs12

from api.config import Config, ConfigError, parse_config
from api.tls import load_tls, self_signed, server_ssl_context
from tests.support.tls import write_certificate

HTTPS = {"inference_address": "https://127.0.0.1:8443"}


def config_with(tmp_path: Path, **raw: str) -> Config:
    return parse_config({**HTTPS, **raw}, base_dir=tmp_path)


def test_pem_files_make_a_server_context(tmp_path: Path) -> None:
    cert, key = write_certificate(tmp_path)
    # Relative paths start at config.properties' folder.
    material = load_tls(
        config_with(tmp_path, certificate_file="cert.pem", private_key_file=key.name)
    )
    assert material is not None and material.chain_pem == cert.read_bytes()
    context = server_ssl_context(material)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_no_https_address_and_no_grpc_ssl_means_no_tls(tmp_path: Path) -> None:
    cert, key = write_certificate(tmp_path)
    raw = {"certificate_file": str(cert), "private_key_file": str(key)}
    assert load_tls(parse_config(raw, base_dir=tmp_path)) is None
    raw["enable_grpc_ssl"] = "true"
    assert load_tls(parse_config(raw, base_dir=tmp_path)) is not None


def test_bad_pem_settings_are_clear_config_errors(tmp_path: Path) -> None:
    cert, key = write_certificate(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, other_key = write_certificate(other)
    cases = [
        ({"certificate_file": str(cert)}, "private_key_file is missing"),
        ({"certificate_file": str(cert), "private_key_file": str(other_key)}, "is not the key of"),
        ({"certificate_file": str(key), "private_key_file": str(key)}, "not a PEM certificate"),
        ({"certificate_file": str(cert), "private_key_file": "nope.pem"}, "cannot read"),
    ]
    for raw, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_tls(config_with(tmp_path, **raw))


def write_pkcs12(tmp_path: Path, password: bytes) -> Path:
    cert, key = write_certificate(tmp_path)
    material = load_tls(
        config_with(tmp_path, certificate_file=str(cert), private_key_file=str(key))
    )
    assert material is not None
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    blob = pkcs12.serialize_key_and_certificates(
        b"torchgate",
        load_pem_private_key(material.key_pem, None),  # type: ignore[arg-type]
        x509.load_pem_x509_certificate(material.chain_pem),
        None,
        BestAvailableEncryption(password),
    )
    path = tmp_path / "server.p12"
    path.write_bytes(blob)
    return path


def test_pkcs12_keystore(tmp_path: Path) -> None:
    store = write_pkcs12(tmp_path, b"s3cret")
    material = load_tls(config_with(tmp_path, keystore=str(store), keystore_pass="s3cret"))
    assert material is not None and material.source.startswith("keystore")
    server_ssl_context(material)
    with pytest.raises(ConfigError, match="cannot open it as PKCS12"):
        load_tls(config_with(tmp_path, keystore=str(store), keystore_pass="wrong"))
    with pytest.raises(ConfigError, match="keystore_type='BKS' is not supported"):
        load_tls(config_with(tmp_path, keystore=str(store), keystore_type="BKS"))


@pytest.mark.skipif(shutil.which("keytool") is None, reason="needs OpenJDK's keytool")
def test_a_jks_keystore_is_refused_with_the_keytool_command(tmp_path: Path) -> None:
    jks = tmp_path / "server.jks"
    subprocess.run(
        ["keytool", "-genkeypair", "-alias", "tg", "-keyalg", "RSA", "-keysize", "2048",
         "-dname", "CN=localhost", "-validity", "2", "-storetype", "JKS",
         "-keystore", str(jks), "-storepass", "changeit", "-keypass", "changeit"],
        check=True, capture_output=True,
    )  # fmt: skip
    # Named PKCS12 (TorchServe's default type) or JKS: either way the file is recognised.
    for keystore_type in ("PKCS12", "JKS"):
        with pytest.raises(ConfigError) as refused:
            load_tls(config_with(tmp_path, keystore=str(jks), keystore_type=keystore_type))
        message = str(refused.value)
        assert "JKS keystore" in message
        assert f"keytool -importkeystore -srckeystore {jks} -srcstoretype JKS" in message
        assert "-deststoretype PKCS12" in message


def test_https_without_a_key_serves_a_self_signed_certificate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    material = load_tls(config_with(tmp_path))
    assert material is not None and material.source == "self-signed certificate"
    assert "self-signed" in caplog.text
    server_ssl_context(self_signed())
