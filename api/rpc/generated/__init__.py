"""Python code generated from ``api/rpc/protos`` by ``scripts/gen_protos.py`` (``make protos``).

The ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` modules here are build outputs, not
sources: they are made by the grpcio-tools installed next to the protobuf runtime that will load
them (protobuf refuses gencode newer than its runtime), and are not committed. If an import of
``api.rpc.generated.<name>_pb2`` fails, run ``make protos``.

Why a private descriptor pool: protoc's Python code registers every ``.proto`` file in protobuf's
process-wide default pool, and a second file that defines a symbol already there fails to import
("duplicate symbol 'inference.ServerLiveRequest'"). ``tritonclient.grpc``, KServe and MLServer
each register their own copy of the ``inference`` package, so with the default pool torchgate
could not share a process with any of them (kserve/kserve#3099, SeldonIO/MLServer#1730). The
generator therefore rewrites our modules to load into :data:`POOL` instead. Nothing on the wire
changes; what changes:

- Message classes of well-known types used *inside* our messages (``google.protobuf.Any`` in
  ``google.rpc.Status.details``) are POOL's own classes: fill such fields in place, or via
  ``MergeFromString``, rather than ``CopyFrom`` of a default-pool message.
- Tools that look symbols up in the default pool need POOL passed explicitly, e.g.
  ``grpc_reflection.v1alpha.reflection.enable_server_reflection(names, server, pool=POOL)``.
"""

from __future__ import annotations

from importlib.util import find_spec

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor

__all__ = ["POOL", "adopt"]

POOL = descriptor_pool.DescriptorPool()


def adopt(file: FileDescriptor) -> None:
    """Load ``file`` (a well-known type from the default pool) and its imports into POOL.

    Generated modules call this for each ``google/protobuf/*.proto`` they import, before adding
    their own file, because a pool only accepts a file whose imports it already holds.
    """
    try:
        POOL.FindFileByName(file.name)
    except KeyError:
        for dependency in file.dependencies:
            adopt(dependency)
        POOL.AddSerializedFile(file.serialized_pb)


def __getattr__(name: str) -> object:
    # `from api.rpc.generated import x_pb2` asks here first (hasattr), then imports x_pb2. Only
    # when x_pb2 was never generated, replace Python's "cannot import name" with the fix.
    if name.endswith(("_pb2", "_pb2_grpc")) and find_spec(f"{__name__}.{name}") is None:
        raise ImportError(f"{__name__}.{name} is not generated yet: run `make protos`")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
