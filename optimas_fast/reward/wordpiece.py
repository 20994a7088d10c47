"""Native WordPiece for BERT-type tokenizers: the reward engine's host path without the Rust tokenizer's
per-text overhead, on the texts where it provably gives Hugging Face's ids.

``NativeWordPiece.from_tokenizer(tok)`` returns one only when ``tok`` is a fast tokenizer whose pipeline is
exactly BertNormalizer -> BertPreTokenizer -> WordPiece (MiniLM, BERT, and their fine-tunes); otherwise None
and callers keep using Hugging Face. ``encode_many(texts)`` gives each text's ids (no special tokens, as
``tokenizer(texts, add_special_tokens=False)``) or None for a text it leaves to Hugging Face: anything with
a byte outside printable ASCII / tab / newline / CR, or containing an added token such as ``[SEP]``. On the
texts it takes, BERT's normaliser is ASCII lower-casing and its pre-tokeniser is "split on whitespace,
isolate punctuation", which ``csrc/wordpiece.cpp`` implements; tests check equal ids against Hugging Face.

Why: at a million short candidate outputs the Rust tokenizer's batched call costs ~15 us wall per text on
two cores, most of ``RewardModel.score``'s host time (issue 9's target is <= 10 us per row all told).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from optimas_fast._native import native

__all__ = ["NativeWordPiece"]


def _pipeline(tokenizer: Any) -> dict | None:
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return None
    return json.loads(backend.to_str())


class NativeWordPiece:
    """The C++ WordPiece (``optimas_fast._C.WordPiece``) built from a BERT-type tokenizer's own vocab."""

    def __init__(self, spec: dict):
        model = spec["model"]
        vocab = model["vocab"]
        unk = model["unk_token"]
        if unk not in vocab:
            raise ValueError(f"NativeWordPiece: unk_token {unk!r} is not in the vocab")
        self.lowercase = bool(spec["normalizer"].get("lowercase", True))
        self.added = [t["content"] for t in spec.get("added_tokens") or []]
        mod = native()
        if not hasattr(mod, "WordPiece"):
            raise ImportError(
                "optimas_fast._C predates csrc/wordpiece.cpp: rebuild it with "
                "`pip install -c constraints-cpu.txt -e .` from the source tree"
            )
        self._impl = mod.WordPiece(
            list(vocab.items()),
            int(vocab[unk]),
            model.get("continuing_subword_prefix") or "",
            int(model.get("max_input_chars_per_word", 100)),
            self.lowercase,
            self.added,
        )

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> NativeWordPiece | None:
        """One for ``tokenizer`` if its pipeline is exactly BERT's (see the module docstring), else None."""
        spec = _pipeline(tokenizer)
        if spec is None:
            return None
        norm, pre, model = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}, spec.get("model") or {}
        if norm.get("type") != "BertNormalizer" or pre.get("type") != "BertPreTokenizer":
            return None
        if model.get("type") != "WordPiece" or not isinstance(model.get("vocab"), dict):
            return None
        return cls(spec)

    def encode_many(self, texts: Sequence[str]) -> list:
        """Ids (a tuple) of each text, or None for a text left to Hugging Face."""
        if not isinstance(texts, list):
            texts = list(texts)
        return self._impl.encode_many(texts)
