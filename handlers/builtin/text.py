"""TorchServe's text preprocessing for ``text_classifier``, and the vocabulary it looks up.

`tokens(text)` runs TorchServe's TextHandler steps in its order: drop HTML tags and entities,
lowercase, expand contractions ("don't" -> "do not", TorchServe's table) and drop apostrophes,
strip accents (NFKD, ASCII only), drop punctuation, split with torchtext's ``basic_english``
tokenizer (TorchServe's own copy), then add the n-grams (2: every token, then every pair
"a b"). The tables and the tokenizer are TorchServe's (the ``ts`` package), so token for token
the model sees what it saw in TorchServe.

The vocabulary is ``source_vocab.pt`` in the archive (or the manifest's ``sourceVocab``).
TorchServe's archives hold a pickled torchtext ``Vocab``, which only loads with torchtext
installed; torchtext is discontinued and has no build for current torch, and it is not a
dependency here. Accepted instead, loaded with ``torch.load(weights_only=True)``:

- ``{token: index}``, e.g. ``torch.save(vocab.get_stoi(), "source_vocab.pt")``;
- ``[token, ...]`` (index order), e.g. ``torch.save(vocab.get_itos(), "source_vocab.pt")``.

A token outside the vocabulary maps to ``<unk>`` when the vocabulary has it (torchtext's
default index, as TorchServe's AG_NEWS example sets it), and is skipped otherwise. Where
torchtext happens to be installed, a pickled ``Vocab`` is loaded through it, as TorchServe does.
"""

from __future__ import annotations

import importlib.util
import re
import string
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ts.handler_utils.text_utils import get_tokenizer, ngrams_iterator
from ts.torch_handler.contractions import CONTRACTION_MAP
from ts.utils.util import CLEANUP_REGEX

VOCAB_FILE = "source_vocab.pt"
UNKNOWN = "<unk>"

_CONTRACTIONS = re.compile(
    "({})".format("|".join(map(re.escape, CONTRACTION_MAP))), flags=re.IGNORECASE | re.DOTALL
)
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)
_basic_english: Callable[[str], list[str]] = get_tokenizer("basic_english")


def tokens(text: str, ngrams: int) -> list[str]:
    """The tokens and n-grams TorchServe's text_classifier looks up for `text`."""
    text = CLEANUP_REGEX.sub("", text).lower()
    text = _CONTRACTIONS.sub(_expand, text).replace("'", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = text.translate(_NO_PUNCTUATION)
    return list(ngrams_iterator(_basic_english(text), ngrams))


def _expand(match: re.Match[str]) -> str:
    found = match.group(0)
    expanded = CONTRACTION_MAP.get(found) or CONTRACTION_MAP.get(found.lower())
    # TorchServe keeps the first character's case ("Don't" -> "Do not").
    return found[0] + expanded[1:] if expanded else found


class Vocabulary:
    def __init__(self, index: dict[str, int]) -> None:
        self.index = index
        self.unknown = index.get(UNKNOWN)

    def __len__(self) -> int:
        return len(self.index)

    def ids(self, tokens: list[str]) -> list[int]:
        found = (self.index.get(token, self.unknown) for token in tokens)
        return [i for i in found if i is not None]


def vocabulary_path(model_dir: Path, manifest: dict[str, Any]) -> Path:
    declared = manifest.get("model", {}).get("sourceVocab")  # older archives named it there
    path = model_dir / (declared or VOCAB_FILE)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path.name} is missing: text_classifier needs the archive's vocabulary "
            f"(--extra-files source_vocab.pt)"
        )
    return path


def load_vocabulary(path: Path) -> Vocabulary:
    try:
        saved: Any = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses any pickled class, a torchtext Vocab too
        saved = _torchtext_vocab(path, exc)
    if isinstance(saved, dict):
        return Vocabulary({str(token): int(index) for token, index in saved.items()})
    if isinstance(saved, list | tuple):
        return Vocabulary({str(token): index for index, token in enumerate(saved)})
    raise TypeError(f"{path.name} holds a {type(saved).__name__}, not a token -> index dict")


def _torchtext_vocab(path: Path, refused: Exception) -> dict[str, int]:
    if importlib.util.find_spec("torchtext") is None:
        raise RuntimeError(
            f"{path.name} is not a plain token -> index dict or token list (a pickled "
            f"torchtext Vocab needs torchtext, which is not installed); re-save it with "
            f'torch.save(vocab.get_stoi(), "{path.name}"), keeping "{UNKNOWN}" for unknown '
            f"tokens. torch.load said: {refused}"
        ) from refused
    # As TorchServe loads it: a full unpickling, trusting the archive as its handler code is.
    vocab = torch.load(str(path), map_location="cpu", weights_only=False)
    index: dict[str, int] = dict(vocab.get_stoi())
    default = vocab.get_default_index()
    if default is not None:
        index.setdefault(UNKNOWN, int(default))
    return index
