"""TorchServe-contract handlers for the example archives, and TorchServe's built-in handlers.

The example handlers run inside TorchServe workers and inside torchgate's worker processes,
loaded flat from an extracted archive. `builtin/` holds torchgate's versions of TorchServe's
built-in handlers (``--handler image_classifier`` ...); they are imported by package name,
never copied into an archive. All of them import only the standard library, numpy, torch,
onnxruntime, Pillow, tokenizers and TorchServe's ``ts``: never `api` or `export`.
"""
