"""TorchServe-contract handlers for the example archives.

They run inside TorchServe workers and inside torchgate's local backend, loaded flat from an
extracted archive, so they import only the standard library, numpy, torch, onnxruntime,
Pillow and tokenizers: never `api` or `export`.
"""
