"""torchgate's own implementations of TorchServe's built-in handlers.

An archive built with ``torch-model-archiver --handler image_classifier`` (or
``image_segmenter``, ``object_detector``, ``text_classifier``, ``base_handler``, or the
dotted ``ts.torch_handler.<name>``) runs the module of the same name here instead of
TorchServe's, which needs torchvision and captum (see ``api/backends/archive.py`` and
``docs/builtin_handlers.md``). Each follows TorchServe 0.12's input and output contract, with
Pillow, numpy and torch only, and one outcome per request.

    base.py              BuiltinHandler: loads model and labels, batches by input shape,
                         fails a bad request alone
    model.py             the serialized model: TorchScript, eager (--model-file) or ONNX; device
    labels.py            index_to_name.json
    vision.py            image decoding and torchvision's transforms, rebuilt
    text.py              TorchServe's text normalisation, tokenizer, n-grams; the vocabulary
    base_handler.py, image_classifier.py, image_segmenter.py, object_detector.py,
    text_classifier.py   one handler class each, under TorchServe's module names

These modules are imported by package name in the worker process (never copied into an
archive), and import only torch, numpy, Pillow, onnxruntime and TorchServe's ``ts`` package.
"""
