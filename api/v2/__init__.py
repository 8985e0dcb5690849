"""KServe v2 / Open Inference Protocol: the tensor codec shared by the REST and gRPC endpoints."""
