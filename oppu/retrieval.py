"""BM25 retrieval over one user's history (most or least relevant), deterministic, with a
no-future variant."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_TOKEN = re.compile(r"[^\W_]+", re.UNICODE)
# "least" is the paper's behaviour-shift setting: the k items retrieval ranks lowest, as if the
# user's relevant past could not be found.
RETRIEVAL_MODES = ("most", "least")


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens; punctuation and underscores separate words and are dropped."""
    return _TOKEN.findall(text.lower())


class BM25:
    """Okapi BM25 (k1=1.5, b=0.75) with the non-negative Lucene idf, so that a term found in
    every document of a tiny history still counts a little instead of going negative."""

    def __init__(self, documents: Sequence[str], k1: float = 1.5, b: float = 0.75) -> None:
        self.docs = [Counter(tokenize(d)) for d in documents]
        self.lengths = [sum(d.values()) for d in self.docs]
        self.avg_len = (sum(self.lengths) / len(self.docs)) if self.docs else 0.0
        df = Counter(t for d in self.docs for t in d)
        n = len(self.docs)
        self.idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}
        self.k1, self.b = k1, b

    def scores(self, query: str) -> list[float]:
        terms = tokenize(query)
        out = []
        for doc, length in zip(self.docs, self.lengths):
            norm = self.k1 * (1 - self.b + self.b * length / self.avg_len) if self.avg_len else self.k1
            out.append(sum(self.idf[t] * doc[t] * (self.k1 + 1) / (doc[t] + norm) for t in terms if t in doc))
        return out

    def top_k(self, query: str, k: int) -> list[int]:
        """Indices of the ``k`` best documents, best first; ties go to the later document
        (the more recent history item), so the order never depends on hashing."""
        scores = self.scores(query)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], -i))
        return order[: max(k, 0)]

    def bottom_k(self, query: str, k: int) -> list[int]:
        """Indices of the ``k`` worst documents, worst first; ties go to the earlier document
        (the older history item), the mirror image of ``top_k``."""
        scores = self.scores(query)
        order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
        return order[: max(k, 0)]


def retrieve(query: str, documents: Sequence[str], k: int, mode: str = "most") -> list[int]:
    """The ``k`` most (or, with mode "least", least) relevant document indices for ``query``,
    fewer when there are fewer documents."""
    if mode not in RETRIEVAL_MODES:
        raise ValueError(f"retrieval mode {mode!r} is not one of {RETRIEVAL_MODES}")
    if k <= 0 or not documents:
        return []
    bm25 = BM25(documents)
    return bm25.top_k(query, k) if mode == "most" else bm25.bottom_k(query, k)


def retrieve_before(
    documents: Sequence[str], j: int, k: int, query: str | None = None, mode: str = "most"
) -> list[int]:
    """For history item ``j``, the ``k`` most (or least) relevant among items ``0..j-1`` only
    (no look into the future). The query is item j's own text unless given."""
    return retrieve(documents[j] if query is None else query, documents[:j], k, mode)
