"""The rule for model names and versions, whatever they come from.

A name reaches the registry from a url's file name, the `model_name` parameter of a
registration, an archive's manifest, config.properties or the snapshot; the registry checks it
once, so no source can skip the rule. Names end up in URL paths (`/predictions/NAME`), in
directory names and in log lines: a `/`, `..` or a newline in one could make a model impossible
to delete over REST or forge a log line.
"""

from __future__ import annotations

import re

from api.errors import BadRequest

# TorchServe's rule (torch-model-archiver's `--model-name`): a letter or digit, then letters,
# digits, '_', '-' and '.'.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-.]*")
# TorchServe leaves versions free; here they are one URL path segment with no control
# characters, spaces or slashes, since they land in the same places as names.
MODEL_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-.+]*")
MAX_LENGTH = 255  # a file name's length on common file systems
# Versions the management API could not reach: `/models/{m}/traffic` is the traffic policy's
# API (api.rest.traffic), mounted before TorchServe's `/models/{m}/{version}` routes.
RESERVED_VERSIONS = frozenset({"traffic"})


def check_model_name(name: str) -> None:
    """Raise BadRequest unless `name` follows TorchServe's model name rule."""
    if not isinstance(name, str) or len(name) > MAX_LENGTH or not MODEL_NAME.fullmatch(name):
        raise BadRequest(
            f"Invalid model name {name!r}: letters, digits, '_', '-' and '.', starting with a "
            f"letter or digit, at most {MAX_LENGTH} characters"
        )


def check_model_version(version: str) -> None:
    """Raise BadRequest unless `version` is a plain version string (`1.0`, `2`, `v3-rc1`)."""
    if (
        not isinstance(version, str)
        or len(version) > MAX_LENGTH
        or not MODEL_VERSION.fullmatch(version)
    ):
        raise BadRequest(
            f"Invalid model version {version!r}: letters, digits, '_', '-', '.' and '+', "
            f"starting with a letter or digit, at most {MAX_LENGTH} characters"
        )
    if version in RESERVED_VERSIONS:
        raise BadRequest(
            f"Invalid model version {version!r}: reserved, /models/<model>/{version} is the "
            f"traffic policy API; choose another version name"
        )
