"""text_classifier: text in, TorchServe's {label: probability} for every class out."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from api.errors import HandlerLoadError
from handlers.builtin.text_classifier import MAX_CHARACTERS
from handlers.torchgate_base import truncate_text
from tests.handlers.builtin.conftest import (
    Packed,
    Serve,
    eager,
    items,
    model_class,
    ok,
    onnx,
    torchscript,
)

SOURCE = '''
import torch


class TextClassificationModel(torch.nn.Module):
    """TorchServe's AG_NEWS example model, smaller: an EmbeddingBag called with (ids, offsets)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.EmbeddingBag(16, 8, mode="mean")
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, text: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embedding(text, offsets))
'''
TOKENS = [
    *["<unk>", "do", "not", "stop", "cafe", "do not", "not stop", "stop cafe"],
    *["hello", "world", "hello world", "world hello", "i", "would", "i would", "would stop"],
]
VOCAB = {token: index for index, token in enumerate(TOKENS)}
INDEX_TO_NAME = {"0": "World", "1": "Sports", "2": "Business", "3": "Sci/Tec"}

# Each text with the tokens TorchServe's TextHandler looks up, worked out from its documented
# steps: drop HTML tags, lowercase, expand contractions ("don't" -> "do not", "I'd" -> "I
# would"), drop accents and punctuation, basic_english tokens, then the tokens and bigrams.
TEXTS: list[tuple[Any, list[str]]] = [
    ("<b>Don't</b> STOP, Café!", ["do", "not", "stop", "cafe", "do not", "not stop", "stop cafe"]),
    # xyzzy and the bigram "hello xyzzy" are not in the vocabulary: both are <unk>
    (
        b"Hello   world, hello xyzzy",
        ["hello", "world", "hello", "<unk>", "hello world", "world hello", "<unk>"],
    ),
    ("I'd stop", ["i", "would", "stop", "i would", "would stop"]),
]


def reference(model: torch.nn.Module, tokens: list[str]) -> dict[str, float]:
    """TorchServe's text_classifier for one text: ids, offsets [0], softmax, all labels."""
    ids = torch.tensor([VOCAB[token] for token in tokens])
    with torch.no_grad():
        probabilities = torch.softmax(model(ids, torch.tensor([0])), dim=1)[0]
    return {INDEX_TO_NAME[str(i)]: p for i, p in enumerate(probabilities.tolist())}


def saved(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def classifier(tmp_path: Path, fmt: str) -> tuple[torch.nn.Module, Packed]:
    torch.manual_seed(3)
    model = model_class(SOURCE, tmp_path)().eval()
    if fmt == "torchscript":
        return model, torchscript(model)
    if fmt == "eager":
        return model, eager(model, SOURCE)
    example = {"text": np.array([1, 2, 3, 4]), "offsets": np.array([0, 2])}
    axes = {"text": {0: "tokens"}, "offsets": {0: "n"}, "scores": {0: "n"}}
    return model, onnx(model, example, ["scores"], axes, tmp_path)


@pytest.mark.parametrize(
    ("fmt", "vocab"),
    # {token: id} or [token, ...]
    [("eager", saved(VOCAB)), ("torchscript", saved(TOKENS)), ("onnx", saved(VOCAB))],
    ids=["eager-stoi", "torchscript-itos", "onnx-stoi"],
)
def test_batch_matches_one_text_at_a_time(
    serve: Serve, tmp_path: Path, fmt: str, vocab: bytes
) -> None:
    """TorchServe answers a batch's first text only; here every text of the batch is one bag
    of one EmbeddingBag pass, and each answer equals the model run on that text alone."""
    model, packed = classifier(tmp_path, fmt)
    files: dict[str, str | bytes] = {
        "source_vocab.pt": vocab,
        "index_to_name.json": json.dumps(INDEX_TO_NAME),
    }
    bodies = [text for text, _ in TEXTS]
    [answers] = serve("text_classifier", packed.plus(files), items(*bodies, {"no": "text"}))
    assert answers[-1].status == 400 and "expected a text" in answers[-1].body["message"]
    for answer, (_, tokens) in zip(ok(answers[:-1]), TEXTS, strict=True):
        assert list(answer) == list(INDEX_TO_NAME.values())
        assert answer == pytest.approx(reference(model, tokens), rel=1e-5, abs=1e-7)


def test_invalid_utf8_fails_alone(serve: Serve, tmp_path: Path) -> None:
    _, packed = classifier(tmp_path, "eager")
    [answers] = serve(
        "text_classifier", packed.plus({"source_vocab.pt": saved(VOCAB)}), items(b"\xff\xfe", "do")
    )
    assert answers[0].status == 400 and "UTF-8" in answers[0].body["message"]
    [answer] = ok(answers[1:])
    assert list(answer) == ["0", "1", "2", "3"]  # no index_to_name.json: the class indices


class PickledVocab:
    """Stands for a pickled torchtext Vocab: an object torch.load(weights_only=True) refuses."""

    def __init__(self) -> None:
        self.stoi = dict(VOCAB)


def test_pickled_vocab_object_is_refused_with_a_way_out(serve: Serve, tmp_path: Path) -> None:
    _, packed = classifier(tmp_path, "eager")
    vocab = saved(PickledVocab())
    with pytest.raises(HandlerLoadError, match=r"torch\.save\(vocab\.get_stoi\(\)"):
        serve("text_classifier", packed.plus({"source_vocab.pt": vocab}), items("do"))


def test_a_text_is_read_up_to_max_characters(serve: Serve, tmp_path: Path) -> None:
    """6 MB of text took 25 s to normalise and tokenize in full; it is cut at a word boundary
    before either, so it answers as its first MAX_CHARACTERS characters do, at once."""
    model, packed = classifier(tmp_path, "eager")
    phrase = "hello world would stop "  # 23 characters: the cut falls inside a word
    huge = phrase * (6_000_000 // len(phrase))
    kept = truncate_text(huge, MAX_CHARACTERS)
    assert len(kept) <= MAX_CHARACTERS < len(kept) + len(phrase)
    assert huge[len(kept)] == " " and not huge[MAX_CHARACTERS].isspace()  # a word not cut
    files: dict[str, str | bytes] = {
        "source_vocab.pt": saved(VOCAB),
        "index_to_name.json": json.dumps(INDEX_TO_NAME),
    }
    started = time.perf_counter()
    [answers] = serve("text_classifier", packed.plus(files), items(huge, kept, TEXTS[2][0]))
    assert time.perf_counter() - started < 20  # a worker's start included; the full text: 25 s
    long_answer, kept_answer, short_answer = ok(answers)
    assert long_answer == kept_answer
    assert short_answer == pytest.approx(reference(model, TEXTS[2][1]), rel=1e-5, abs=1e-7)
