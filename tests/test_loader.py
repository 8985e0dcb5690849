"""api.loader helpers that need no server."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from api.loader import archive_signature


def test_a_proxied_versions_signature_comes_from_the_archive_in_the_store(
    tmp_path: Path,
) -> None:
    signature = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]}
    with zipfile.ZipFile(tmp_path / "m.mar", "w") as archive:
        archive.writestr("signature.json", json.dumps(signature))
    with zipfile.ZipFile(tmp_path / "plain.mar", "w") as archive:
        archive.writestr("MAR-INF/MANIFEST.json", "{}")
    (tmp_path / "broken.mar").write_bytes(b"not a zip")
    assert archive_signature(tmp_path, "m.mar") == signature
    assert archive_signature(tmp_path, "plain.mar") is None
    assert archive_signature(tmp_path, "broken.mar") is None
    assert archive_signature(tmp_path, "missing.mar") is None
    assert archive_signature(tmp_path, "../m.mar") is None
    assert archive_signature(tmp_path, "torchserve://127.0.0.1:8080") is None
