"""Okapi BM25 over a small set of documents (the 10 paragraphs of one HotpotQA example).

score(q, d) = sum over query terms t of  idf(t) * tf(t,d) * (k1 + 1) / (tf(t,d) + k1 * (1 - b + b * |d| / avgdl))
with idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5)) (the Lucene form, never negative).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from optimas_fast.examples.embeddings import tokenize

__all__ = ["BM25"]


class BM25:
    """Index once, score many queries. ``k1`` saturates term frequency, ``b`` normalises length."""

    def __init__(self, documents: Sequence[str], k1: float = 1.5, b: float = 0.75):
        if isinstance(documents, str) or not documents:
            raise ValueError("BM25(documents): expected a non-empty list of str")
        if k1 < 0 or not 0 <= b <= 1:
            raise ValueError(f"BM25: need k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        self.k1, self.b = k1, b
        self.docs = [Counter(tokenize(d)) for d in documents]
        self.lengths = [sum(c.values()) for c in self.docs]
        self.avgdl = max(sum(self.lengths) / len(self.docs), 1e-9)
        df = Counter(t for c in self.docs for t in c)
        n = len(self.docs)
        self.idf = {t: math.log(1.0 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}

    def scores(self, query: str) -> list[float]:
        """One score per document, in document order."""
        terms = tokenize(query)
        out = []
        for doc, length in zip(self.docs, self.lengths):
            norm = self.k1 * (1 - self.b + self.b * length / self.avgdl)
            s = 0.0
            for t in terms:
                tf = doc.get(t, 0)
                if tf:
                    s += self.idf[t] * tf * (self.k1 + 1) / (tf + norm)
            out.append(s)
        return out
