"""HTTPS and gRPC TLS from TorchServe's keys.

TorchServe serves TLS on every REST address written `https://...`, with the key and certificate
chain taken from (first match wins, as in TorchServe's ConfigManager.getSslContext):

    keystore, keystore_pass (changeit), keystore_type (PKCS12)   a PKCS12 keystore
    certificate_file + private_key_file                          PEM files
    neither                                                      a self-signed certificate

and `enable_grpc_ssl=true` puts the same key and chain on both gRPC ports. A JKS keystore (Java's
own format) cannot be read outside Java: it is refused at start with the keytool command that
converts it to PKCS12. Relative paths resolve against config.properties' folder, as model_store.

`load_tls(config)` reads the files once, at start before the servers are built (the ports are
bound and the worker pool launched already, so that torch's import overlaps the frontend's; a
bad file stops the start with a ConfigError naming the key); `server_ssl_context` and
`grpc_credentials` build what uvicorn and grpc take from it.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc

from api.config import Config, ConfigError

log = logging.getLogger(__name__)

DEFAULT_KEYSTORE_PASS = "changeit"  # TorchServe's default, Java's too
JKS_MAGIC = b"\xfe\xed\xfe\xed"
JCEKS_MAGIC = b"\xce\xce\xce\xce"


@dataclass(frozen=True, slots=True)
class KeyMaterial:
    """A private key and its certificate chain, PEM encoded; `source` says where from."""

    key_pem: bytes
    chain_pem: bytes
    source: str


def tls_wanted(config: Config) -> bool:
    """True when a REST address is https:// or gRPC TLS is on."""
    schemes = {address.scheme for _, address in config.http_addresses()}
    return "https" in schemes or config.enable_grpc_ssl


def load_tls(config: Config) -> KeyMaterial | None:
    """The key material torchgate serves TLS with, or None when nothing asks for TLS."""
    if not tls_wanted(config):
        for key in ("certificate_file", "private_key_file", "keystore"):
            if key in config.raw:
                log.warning(
                    "%s is set but no address is https:// and enable_grpc_ssl is off: "
                    "nothing is served over TLS",
                    key,
                )
                break
        return None
    raw = config.raw
    base = config.base_dir
    if raw.get("keystore"):
        return _from_keystore(
            _path(raw["keystore"], base),
            raw.get("keystore_pass", DEFAULT_KEYSTORE_PASS),
            raw.get("keystore_type", "PKCS12"),
        )
    cert_file, key_file = raw.get("certificate_file"), raw.get("private_key_file")
    if cert_file and key_file:
        return _from_pem(_path(cert_file, base), _path(key_file, base))
    if cert_file or key_file:
        missing = "private_key_file" if cert_file else "certificate_file"
        raise ConfigError(f"TLS: {missing} is missing (certificate_file needs private_key_file)")
    log.warning(
        "TLS without keystore or certificate_file/private_key_file: serving a self-signed "
        "certificate made at start (as TorchServe does); clients must not verify it"
    )
    return self_signed()


def server_ssl_context(material: KeyMaterial) -> ssl.SSLContext:
    """A server context for uvicorn: TLS 1.2 or newer, the key and chain of `material`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # ssl loads keys from files only: a private temporary file, removed at once.
    with tempfile.TemporaryDirectory(prefix="torchgate-tls-") as folder:
        combined = Path(folder) / "server.pem"
        fd = os.open(combined, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(material.key_pem + material.chain_pem)
        try:
            context.load_cert_chain(combined)
        except ssl.SSLError as exc:
            raise ConfigError(f"TLS: {material.source}: {exc}") from exc
    return context


def grpc_credentials(material: KeyMaterial) -> grpc.ServerCredentials:
    """`grpc.ssl_server_credentials` for `add_secure_port` (no client certificates)."""
    return grpc.ssl_server_credentials([(material.key_pem, material.chain_pem)])


def self_signed(host: str = "localhost") -> KeyMaterial:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyMaterial(
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        chain_pem=cert.public_bytes(serialization.Encoding.PEM),
        source="self-signed certificate",
    )


def _from_pem(cert_path: Path, key_path: Path) -> KeyMaterial:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    chain_pem, key_pem = _read(cert_path, "certificate_file"), _read(key_path, "private_key_file")
    try:
        certificates = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as exc:
        raise ConfigError(
            f"certificate_file {cert_path}: not a PEM certificate chain ({exc})"
        ) from exc
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"private_key_file {key_path}: not an unencrypted PEM private key ({exc})"
        ) from exc
    if certificates[0].public_key() != key.public_key():
        raise ConfigError(
            f"private_key_file {key_path} is not the key of certificate_file {cert_path}"
        )
    return KeyMaterial(key_pem, chain_pem, f"certificate_file {cert_path}")


def _from_keystore(path: Path, password: str, kind: str) -> KeyMaterial:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    data = _read(path, "keystore")
    if kind.strip().upper() in ("JKS", "JCEKS") or data[:4] in (JKS_MAGIC, JCEKS_MAGIC):
        raise ConfigError(
            f"keystore {path} is a Java {'JCEKS' if data[:4] == JCEKS_MAGIC else 'JKS'} "
            "keystore, which torchgate cannot read (it has no Java). Convert it to PKCS12 once:\n"
            f"    keytool -importkeystore -srckeystore {path} -srcstoretype JKS "
            f"-destkeystore {path.with_suffix('.p12')} -deststoretype PKCS12\n"
            f"then set keystore={path.with_suffix('.p12')} and keystore_type=PKCS12 "
            "(or use certificate_file and private_key_file in PEM)"
        )
    if kind.strip().upper() not in ("PKCS12", "P12"):
        raise ConfigError(f"keystore_type={kind!r} is not supported: use PKCS12 (or PEM files)")
    try:
        key, certificate, extra = pkcs12.load_key_and_certificates(data, password.encode())
    except ValueError as exc:
        raise ConfigError(
            f"keystore {path}: cannot open it as PKCS12 with keystore_pass "
            f"(wrong password, or not a PKCS12 file): {exc}"
        ) from exc
    if key is None or certificate is None:
        raise ConfigError(f"keystore {path}: no key entry found in keystore")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    chain = [certificate, *extra]
    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    return KeyMaterial(key_pem, chain_pem, f"keystore {path}")


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from exc


def _path(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path
