"""Test and benchmark helpers for the reward engine (like ``system.testing`` and ``optimize.testing``)."""

from __future__ import annotations

import string
from collections.abc import Iterable

import tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = ["wordpiece_tokenizer"]


def wordpiece_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer built in code: ``words`` whole, any other lowercase ASCII word spelled out
    in letters and digits. For machines without the model packages (the GPU image: benchmarks/gpu_bundle.py
    leaves them out), where a test or workload needs a tokenizer, not MiniLM's vocabulary."""
    chars = string.ascii_lowercase + string.digits
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *string.punctuation,
        *chars,
        *(f"##{c}" for c in chars),
        *sorted(set(words)),
    ]
    tk = tokenizers.Tokenizer(
        tokenizers.models.WordPiece({t: i for i, t in enumerate(dict.fromkeys(vocab))}, unk_token="[UNK]")
    )
    tk.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    tk.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tk.decoder = tokenizers.decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
