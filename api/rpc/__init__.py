"""gRPC transports: thin servicers that decode, call the dataplane, and encode.

Services (wire-compatible with the clients users already have):

- ``inference.GRPCInferenceService``: KServe v2 / Open Inference Protocol, as called by
  ``tritonclient.grpc`` and KServe clients (tensors via :mod:`api.v2.codec`).
- ``org.pytorch.serve.grpc.inference.InferenceAPIsService`` and
  ``org.pytorch.serve.grpc.management.ManagementAPIsService``: TorchServe 0.12's gRPC APIs.

Their ``.proto`` sources are in ``protos/``; the Python stubs in ``generated/`` are build outputs
of ``scripts/gen_protos.py`` (``make protos``).
"""
