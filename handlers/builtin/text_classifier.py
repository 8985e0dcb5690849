"""TorchServe's built-in ``text_classifier``: a text in, the probability of every class out.

Contract (TorchServe 0.12): a text per request (a text body, raw UTF-8 bytes or a JSON
string), TorchServe's normalisation, tokenizer and bigrams (`text.py`), token ids from the
archive's vocabulary (`text.py` says which files are taken), a model called as
``model(token_ids, offsets)`` (an ``nn.EmbeddingBag`` text model, as in TorchServe's AG_NEWS
example), softmax, and per request ``{label: probability}`` for every class, labelled through
``index_to_name.json``. A text is read up to its first 16,384 characters (``MAX_CHARACTERS``).

TorchServe's text_classifier does not batch: it answers the first request of a batch only.
Here a batch is one forward pass, the way EmbeddingBag models take one: every request's ids
concatenated, ``offsets`` giving where each one starts. The model must answer one row per
offset; one that does not fails the batch's text requests, each with its own 500.

This module defines exactly one class (TorchServe's loader takes a module's single class).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch

from ..torchgate_base import CHARACTERS_PER_TOKEN, BadRequest, Context, truncate_text
from .base import BuiltinHandler, Prepared
from .labels import label
from .text import Vocabulary, load_vocabulary, tokens, vocabulary_path

# An EmbeddingBag model takes any number of tokens, so there is no maximum sequence length to
# derive a bound from: 256 tokens' worth (16,384 characters, a long article) is read, the rest
# cut before normalising and tokenizing, which cost 25 s for 6 MB of text.
MAX_CHARACTERS = 256 * CHARACTERS_PER_TOKEN


class TextClassifier(BuiltinHandler):
    ngrams = 2

    def setup(self, context: Context) -> None:
        self.vocabulary: Vocabulary = load_vocabulary(
            vocabulary_path(self.model_dir, self.manifest)
        )

    def prepare(self, payload: Any) -> Prepared:
        if isinstance(payload, bytes | bytearray):
            try:
                payload = bytes(payload).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadRequest(f"text is not valid UTF-8: {exc.reason}") from exc
        if not isinstance(payload, str):
            raise BadRequest(f"expected a text, got JSON {type(payload).__name__}")
        ids = self.vocabulary.ids(tokens(truncate_text(payload, MAX_CHARACTERS), self.ngrams))
        return Prepared(torch.tensor(ids, dtype=torch.int64))

    def group_key(self, prepared: Prepared) -> Hashable:
        return "texts"  # texts of any length share one pass, told apart by their offsets

    def run(self, items: list[Prepared]) -> list[Any]:
        assert self.model is not None, "handler used before initialize()"
        lengths = torch.tensor([len(item.tensor) for item in items], dtype=torch.int64)
        offsets = torch.cumsum(lengths, 0) - lengths
        ids = torch.cat([item.tensor for item in items])
        return self.postprocess(self.model(ids, offsets), len(items))

    def postprocess(self, output: Any, count: int) -> list[Any]:
        if not isinstance(output, torch.Tensor) or output.dim() != 2:
            raise TypeError(
                f"expected class scores [N, classes] from the model, got {output!r:.80}"
            )
        probabilities = torch.softmax(output.float(), dim=1).tolist()
        return [
            {label(self.labels, index): p for index, p in enumerate(row)} for row in probabilities
        ]
