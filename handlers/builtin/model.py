"""Load an archive's serialized model the way TorchServe's BaseHandler does, and pick its device.

What the manifest names decides the format, in BaseHandler's order:

- ``modelFile`` (``--model-file``): an eager model. The file must define exactly one class; it is
  instantiated without arguments and, when there is a ``serializedFile``, given that file's
  ``state_dict`` (``torch.load``, tensors only).
- a ``serializedFile`` ending in ``.onnx``: an ONNX Runtime session.
- any other ``serializedFile``: TorchScript (``torch.jit.load``). TorchServe accepts only
  ``.pt`` here; ``.pth``, ``.ts`` and ``.torchscript`` files are TorchScript too in practice.

Every model is called the same way, ``model(*tensors)``, under ``torch.inference_mode``, with
the inputs moved to the model's device. TorchServe's built-in ``inference`` calls an ONNX
session like a module, which fails; here an ONNX model answers a tensor for a graph with one
output and ``{output name: tensor}`` for several.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import sys
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

logger = logging.getLogger(__name__)

# ONNX element types as onnxruntime names them -> numpy, for casting inputs to what the graph
# declares (a JSON list of integers becomes int64, and a float graph would refuse it).
_ONNX_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


class Model(Protocol):
    """A loaded model: tensors in (on any device), the model's own output structure out."""

    device: torch.device

    def __call__(self, *inputs: torch.Tensor) -> Any: ...


def select_device(properties: dict[str, Any]) -> torch.device:
    """BaseHandler's rule: CUDA device `gpu_id` when CUDA is there and the worker was given a
    GPU; no gpu_id means the operator chose CPU."""
    gpu_id = properties.get("gpu_id")
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device("cuda", int(gpu_id))
    return torch.device("cpu")


def load_model(model_dir: Path, manifest: dict[str, Any], device: torch.device) -> Model:
    """The model the manifest describes (see the module docstring). Raises on anything else."""
    entry = manifest.get("model", {})
    serialized = entry.get("serializedFile")
    weights = model_dir / serialized if serialized else None
    model_file = entry.get("modelFile")
    if model_file:
        return TorchModel(_eager_module(model_dir / model_file, weights, device), device)
    if weights is None:
        raise RuntimeError("the archive has neither a serialized file nor a model file")
    if weights.suffix.lower() == ".onnx":
        return OnnxModel(weights, device)
    if weights.suffix.lower() == ".so":
        raise RuntimeError(f"{weights.name}: AOT-compiled models (torch._export) are not supported")
    try:
        module = torch.jit.load(str(weights), map_location=device)
    except RuntimeError as exc:
        raise RuntimeError(
            f"{weights.name} is not a TorchScript file ({exc}); a state_dict needs its model "
            f"class, packed with --model-file"
        ) from exc
    return TorchModel(module, device)


class TorchModel:
    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.module = module.to(device).eval()
        self.device = device
        # A scripted torchvision detector's forward takes `images: List[Tensor]`, not a batch
        # tensor (eager modules iterate a batch tensor as well as a list).
        self.takes_tensor_list = _first_argument_type(self.module) == "List[Tensor]"

    def __call__(self, *inputs: torch.Tensor) -> Any:
        with torch.inference_mode():
            return self.module(*(tensor.to(self.device) for tensor in inputs))

    def call_with_list(self, tensors: list[torch.Tensor]) -> Any:
        """forward(images) with one tensor per image, each of its own size."""
        with torch.inference_mode():
            return self.module([tensor.to(self.device) for tensor in tensors])


def _first_argument_type(module: torch.nn.Module) -> str | None:
    """The TorchScript type of forward's first argument after self; None for an eager module."""
    if not isinstance(module, torch.jit.ScriptModule):
        return None
    arguments = module.forward.schema.arguments  # type: ignore[attr-defined]
    return str(arguments[1].type) if len(arguments) > 1 else None


class OnnxModel:
    def __init__(self, path: Path, device: torch.device) -> None:
        import onnxruntime

        providers: list[Any] = ["CPUExecutionProvider"]
        if device.type == "cuda":
            # Only with a GPU: onnxruntime-gpu falls back to CPU, noisily, without one.
            if hasattr(onnxruntime, "preload_dlls"):
                onnxruntime.preload_dlls()
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        options = onnxruntime.SessionOptions()
        # One pool sized like torch's for this worker, not spinning: a spinning pool thread
        # takes the core the frontend's event loop needs between batches.
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(
            str(path), sess_options=options, providers=providers
        )
        if device.type == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            # A CPU build of onnxruntime (not onnxruntime-gpu) has no CUDA provider.
            logger.warning("%s runs on CPU: this onnxruntime has no CUDA provider", path.name)
        self.device = device
        self.inputs = [
            (node.name, _ONNX_TYPES.get(node.type)) for node in self.session.get_inputs()
        ]
        self.input_ranks = [len(node.shape) for node in self.session.get_inputs()]
        self.output_names = [node.name for node in self.session.get_outputs()]

    def __call__(self, *inputs: torch.Tensor) -> Any:
        if len(inputs) != len(self.inputs):
            raise ValueError(f"the ONNX model takes {len(self.inputs)} inputs, got {len(inputs)}")
        feed = {
            name: np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=dtype)
            for (name, dtype), tensor in zip(self.inputs, inputs, strict=True)
        }
        outputs = [torch.from_numpy(np.asarray(out)) for out in self.session.run(None, feed)]
        if len(outputs) == 1:
            return outputs[0]
        return dict(zip(self.output_names, outputs, strict=True))


def _eager_module(source: Path, weights: Path | None, device: torch.device) -> torch.nn.Module:
    """BaseHandler's eager path: the model file's single class, with the state_dict loaded."""
    if not source.is_file():
        raise RuntimeError(f"model file {source.name} is missing")
    # Imported under its plain name, as TorchServe imports it, so a model file that imports
    # its siblings (the worker puts the model directory on sys.path) works the same.
    spec = importlib.util.spec_from_file_location(source.stem, source)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"model file {source.name} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[source.stem] = module
    spec.loader.exec_module(module)
    classes = [
        member
        for _, member in inspect.getmembers(module, inspect.isclass)
        if member.__module__ == module.__name__
    ]
    if len(classes) != 1:
        raise ValueError(
            f"model file {source.name} must define exactly one class, found "
            f"{[cls.__name__ for cls in classes]}"
        )
    model = classes[0]()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{source.name}: {classes[0].__name__} is not a torch.nn.Module")
    if weights is not None:
        model.load_state_dict(torch.load(str(weights), map_location=device, weights_only=True))
    return model
