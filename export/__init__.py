"""Model -> TorchScript/ONNX -> parity with eager -> signature.json -> .mar (`torchgate export`).

Nothing imports this package at serving time; it only builds archives into the model store.
"""
