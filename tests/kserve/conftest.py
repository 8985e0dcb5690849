"""The `kserve` SDK is imported here first, into a descriptor pool of its own.

Its generated `grpc_predict_v2_pb2` and tritonclient's `grpc_service_pb2` (tests/integration)
both declare the protobuf package `inference` in protobuf's default pool, so whichever is
imported second fails with "duplicate symbol" when one pytest run holds both. The SDK's
messages work the same from a private pool (torchgate's own generated modules use one too,
see api/rpc/generated/__init__.py); test modules then get this already-imported `kserve`.
"""

from __future__ import annotations

from google.protobuf import descriptor_pool


def _import_kserve_in_its_own_pool() -> None:
    shared = descriptor_pool._DEFAULT  # type: ignore[attr-defined]
    descriptor_pool._DEFAULT = descriptor_pool.DescriptorPool()  # type: ignore[attr-defined]
    try:
        import kserve
        import kserve.protocol.grpc.grpc_predict_v2_pb2  # noqa: F401
    finally:
        descriptor_pool._DEFAULT = shared  # type: ignore[attr-defined]


_import_kserve_in_its_own_pool()
