"""Token authorization lives in `api.auth` (REST and gRPC both use it); kept for old imports."""

from __future__ import annotations

from api.auth import API, INFERENCE, MANAGEMENT, TokenAuth

__all__ = ["API", "INFERENCE", "MANAGEMENT", "TokenAuth"]
