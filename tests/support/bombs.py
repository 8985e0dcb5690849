"""Archives that unpack to far more than they weigh, for the registration limits' tests."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

MEMBER_BYTES = 1_000_000  # under extract's 1 MiB per-member ratio floor, so each one passes


def many_small_members_bomb(path: Path, *, members: int = 401, name: str = "bomb") -> Path:
    """The issue's archive: ~430 KB on disk, `members` MB unpacked, every member harmless alone.

    A valid manifest and handler, so only the whole archive's size gives it away.
    """
    manifest = {"model": {"modelName": name, "modelVersion": "1.0", "handler": "handler.py"}}
    zeros = bytes(MEMBER_BYTES)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest))
        archive.writestr("handler.py", "def handle(data, context):\n    return data\n")
        for index in range(members):
            archive.writestr(f"weights/{index}.bin", zeros)
    return path
