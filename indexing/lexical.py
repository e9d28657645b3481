"""BM25: bm25s for serving (sparse, vectorised) and rank-bm25 as the reference it is measured against.

Both use the same tokenizer (lowercase words, English stopwords, Snowball stemming), so a
comparison measures the engines, not the tokenization.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import bm25s
import numpy as np
from bm25s.stopwords import STOPWORDS_EN


class Tokenizer:
    """bm25s's default tokenization (lowercase ``\\w\\w+`` words, English stopwords), plus Snowball
    stemming, without bm25s.tokenize's per-call set-up cost (which dominates a one-query call)."""

    _WORD = re.compile(r"(?u)\b\w\w+\b")

    def __init__(self, *, stemmer: str = "english") -> None:
        if stemmer not in ("english", "none"):
            raise ValueError(f"stemmer must be 'english' or 'none', got {stemmer!r}")
        self.stemmer_name = stemmer
        self._stem = None
        if stemmer == "english":
            try:
                import Stemmer
            except ImportError:
                raise ImportError("BM25 stemming needs PyStemmer: run 'pip install PyStemmer'") from None
            self._stem = Stemmer.Stemmer("english").stemWords

        self._stop = frozenset(STOPWORDS_EN)

    def __call__(self, texts: Sequence[str]) -> list[list[str]]:
        out = []
        for text in texts:
            words = [w for w in self._WORD.findall(text.lower()) if w not in self._stop]
            out.append(self._stem(words) if self._stem else words)
        return out


class BM25Index:
    """A bm25s index over a fixed list of chunks, addressed by row number."""

    def __init__(self, retriever: bm25s.BM25, doc_freq: np.ndarray, tokenizer: Tokenizer) -> None:
        self._bm25 = retriever
        self._df = doc_freq
        self.tokenize = tokenizer
        self.size = int(retriever.scores["num_docs"])

    @classmethod
    def build(cls, texts: Sequence[str], *, k1: float, b: float, stemmer: str) -> BM25Index:
        tok = Tokenizer(stemmer=stemmer)
        tokens = tok(texts)
        r = bm25s.BM25(k1=k1, b=b)
        r.index(tokens, show_progress=False)
        df = np.zeros(len(r.vocab_dict), dtype=np.int32)
        for doc in tokens:
            for t in set(doc):
                df[r.vocab_dict[t]] += 1
        return cls(r, df, tok)

    def save(self, folder: Path) -> None:
        self._bm25.save(str(folder))
        np.save(folder / "doc_freq.npy", self._df)
        (folder / "tokenizer.json").write_text(json.dumps({"stemmer": self.tokenize.stemmer_name}))

    @classmethod
    def load(cls, folder: Path, *, mmap: bool = True) -> BM25Index:
        cfg = json.loads((folder / "tokenizer.json").read_text())
        r = bm25s.BM25.load(str(folder), mmap=mmap)
        return cls(r, np.load(folder / "doc_freq.npy"), Tokenizer(stemmer=cfg["stemmer"]))

    def scores(self, tokens: Sequence[str]) -> np.ndarray:
        """BM25 score of every chunk for one tokenized query (unknown tokens are ignored)."""
        known = [t for t in tokens if t in self._bm25.vocab_dict]
        if not known:
            return np.zeros(self.size, dtype=np.float32)
        return self._bm25.get_scores(known)

    def search(self, tokens: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.scores(tokens)
        k = min(k, self.size)
        top = np.argpartition(-s, k - 1)[:k]
        top = top[np.argsort(-s[top], kind="stable")]
        return top, s[top]

    def expansion_terms(self, rows: Sequence[str], query_tokens: Sequence[str], n: int) -> list[str]:
        """The ``n`` most distinctive terms of some feedback texts (tf * idf), skipping query terms and
        terms found in over 20% of the corpus: an RM3-style BM25 query expansion."""
        if n <= 0 or not rows:
            return []
        tf = Counter(t for doc in self.tokenize(rows) for t in doc)
        vocab, N, seen = self._bm25.vocab_dict, self.size, set(query_tokens)
        scored = []
        for t, c in tf.items():
            if t in seen or t not in vocab:
                continue
            df = int(self._df[vocab[t]])
            if df < 0.2 * N:
                scored.append((c * np.log(N / max(df, 1)), t))
        return [t for _, t in sorted(scored, reverse=True)[:n]]


def plain_words(texts: Sequence[str]) -> list[list[str]]:
    """rank-bm25 as commonly used: lowercase ``\\w+`` words, no stopwords, no stemming."""
    return [re.findall(r"\w+", t.lower()) for t in texts]


class RankBM25Reference:
    """rank-bm25's BM25Okapi (pure Python/numpy), kept as the reference for quality and speed.

    ``tokenizer`` defaults to :func:`plain_words` (the reference setup of ``../shared/data``);
    pass a :class:`Tokenizer` to compare the engines on identical tokens.
    """

    def __init__(
        self, texts: Sequence[str], *, tokenizer: Callable[[Sequence[str]], list[list[str]]] = plain_words
    ) -> None:
        from rank_bm25 import BM25Okapi

        self.tokenize = tokenizer
        self._bm25 = BM25Okapi(self.tokenize(texts))

    def search(self, tokens: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        s = self._bm25.get_scores(list(tokens))
        top = np.argsort(-s, kind="stable")[:k]
        return top, s[top]
