"""KServe v2 / Open Inference Protocol: the tensor codec shared by the REST and gRPC endpoints."""

# What server metadata (REST `GET /v2`, gRPC ServerMetadata) reports.
SERVER_NAME = "torchgate"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data"]
