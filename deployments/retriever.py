"""The hybrid retriever: BM25 + dense candidates, weighted score fusion, pseudo-relevance feedback,
metadata filters. A plain class; its Serve deployment is a thin wrapper (serving graph).

Fusion (tuned on the msmarco-5k dev set only; see docs/retrieval.md):

1. take ``candidates`` rows from BM25 and from FAISS; score every candidate with both;
2. divide each retriever's scores by their maximum over the candidates and mix them,
   ``w * dense + (1 - w) * bm25``;
3. feedback: the fused top ``feedback_docs`` rows move the query vector towards their centroid
   (Rocchio) and add their most distinctive terms to the BM25 query (RM3-style); fuse again.

Naive reciprocal-rank fusion scored *below* dense alone on the dev set; this does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from indexing.embedding import Embedder
from indexing.store import IndexVersion, load_current

Strategy = Literal["hybrid", "lexical", "semantic"]
STRATEGIES: tuple[Strategy, ...] = ("hybrid", "lexical", "semantic")


@dataclass(frozen=True, slots=True)
class Passage:
    id: str
    document_id: str
    text: str
    title: str = ""
    heading_path: str = ""
    source: str = ""
    domain: str = ""
    updated_at: str = ""
    score: float | None = None
    scores: dict[str, float] = field(default_factory=dict)  # per-retriever scores, for /v1/search


@dataclass(frozen=True, slots=True)
class Filters:
    """Metadata filters. ``domains``: any of; dates compare ISO 8601 strings (inclusive)."""

    domains: tuple[str, ...] | None = None
    updated_after: str | None = None
    updated_before: str | None = None

    def __post_init__(self) -> None:
        if self.domains is not None and not self.domains:
            raise ValueError("filters.domains must name at least one domain, or be omitted")
        for name in ("updated_after", "updated_before"):
            v = getattr(self, name)
            if v is not None:
                from datetime import datetime

                try:
                    datetime.fromisoformat(v)
                except ValueError:
                    raise ValueError(f"filters.{name} must be an ISO 8601 date, got {v!r}") from None

    @property
    def active(self) -> bool:
        return bool(self.domains or self.updated_after or self.updated_before)


class HybridRetriever:
    def __init__(
        self,
        *,
        index_dir: Path,
        embedder: Embedder,
        top_k: int = 10,
        candidates: int = 100,
        strategy: Strategy = "hybrid",
        dense_weight: float = 0.75,
        feedback_docs: int = 5,
        feedback_dense: float = 0.5,
        feedback_terms: int = 5,
        ef_search: int = 128,
        faiss_device: str = "cpu",
    ) -> None:
        if top_k <= 0:
            raise ValueError(f"top_k must be > 0, got {top_k}")
        if candidates < top_k:
            raise ValueError(f"candidates must be >= top_k={top_k}, got {candidates}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
        if not 0.0 <= dense_weight <= 1.0:
            raise ValueError(f"dense_weight must be in [0, 1], got {dense_weight}")
        self.index_dir, self.embedder = Path(index_dir), embedder
        self.top_k, self.candidates, self.strategy, self.dense_weight = top_k, candidates, strategy, dense_weight
        self.feedback_docs, self.feedback_dense, self.feedback_terms = feedback_docs, feedback_dense, feedback_terms
        self.ef_search, self.faiss_device = ef_search, faiss_device
        self.index: IndexVersion | None = None

    @classmethod
    def from_config(cls, cfg, *, index_dir: Path | None = None) -> HybridRetriever:
        """Build from an :class:`serve.config.AppConfig`."""
        from indexing.jobs import embedder_from_config

        r = cfg.retriever
        return cls(
            index_dir=index_dir or cfg.indexing.dir,
            embedder=embedder_from_config(cfg),
            top_k=r.top_k,
            candidates=r.candidates,
            strategy=r.strategy,
            dense_weight=r.dense_weight,
            feedback_docs=r.feedback_docs,
            feedback_dense=r.feedback_dense,
            feedback_terms=r.feedback_terms,
            ef_search=cfg.indexing.hnsw_ef_search,
            faiss_device=cfg.indexing.faiss_device,
        )

    def warm_up(self) -> None:
        self.embedder.warm_up()
        if self.index is None:
            self.index = load_current(
                self.index_dir, expected_dim=self.embedder.dim, ef_search=self.ef_search, faiss_device=self.faiss_device
            )
            self._domains = np.asarray(self.index.chunks["domain"])
            self._updated = np.asarray(self.index.chunks["updated_at"])

    @property
    def version(self) -> str:
        self.warm_up()
        assert self.index is not None
        return self.index.name

    # -----------------------------------------------------------------------------------------

    def run(
        self,
        *,
        query: str,
        top_k: int | None = None,
        filters: Filters | None = None,
        strategy: Strategy | None = None,
    ) -> list[Passage]:
        k = self.top_k if top_k is None else top_k
        if k <= 0:
            raise ValueError(f"top_k must be > 0, got {k}")
        rows, fused, parts = self.rank(query=query, n=k, filters=filters, strategy=strategy)
        idx = self.index
        assert idx is not None
        out = []
        for r in rows:
            c = idx.chunk(int(r))
            out.append(
                Passage(
                    id=c.id, document_id=c.document_id, text=c.text, title=c.title, heading_path=c.heading_path,
                    source=c.source, domain=c.domain, updated_at=c.updated_at, score=float(fused[r]),
                    scores={name: float(s[r]) for name, s in parts.items()},
                )
            )
        return out

    def rank(
        self, *, query: str, n: int, filters: Filters | None = None, strategy: Strategy | None = None
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """The best ``n`` chunk rows in order, with full-length score arrays (fused and per
        retriever). What ``run`` builds passages from; evaluation uses it directly."""
        strategy = strategy or self.strategy
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
        self.warm_up()
        empty = np.zeros(0, dtype=np.int64)
        if not query.strip():
            return empty, np.zeros(0, dtype=np.float32), {}
        mask = self._mask(filters) if filters is not None and filters.active else None
        if mask is not None and not mask.any():
            return empty, np.zeros(0, dtype=np.float32), {}
        rows, fused, parts = self._rank(query, n, mask, strategy)
        return rows[:n], fused, parts

    def _mask(self, f: Filters) -> np.ndarray:
        m = np.ones(len(self._domains), dtype=bool)
        if f.domains:
            m &= np.isin(self._domains, list(f.domains))
        if f.updated_after:
            m &= self._updated >= f.updated_after
        if f.updated_before:
            m &= self._updated <= f.updated_before
        return m

    def _dense(self, qv: np.ndarray, n: int, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Top-n rows by inner product (only rows in ``mask``)."""
        import faiss

        idx = self.index
        assert idx is not None
        n = min(n, len(idx))
        q = np.ascontiguousarray(qv[None, :], dtype=np.float32)
        if mask is None:
            s, r = idx.dense.search(q, n)
        else:
            allowed = np.flatnonzero(mask).astype(np.int64)
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))
            s, r = idx.dense.search(q, min(n, len(allowed)), params=params)
        keep = r[0] >= 0
        return r[0][keep], s[0][keep]

    def _bm25_all(self, tokens: list[str], mask: np.ndarray | None) -> np.ndarray:
        assert self.index is not None
        s = np.asarray(self.index.bm25.scores(tokens), dtype=np.float32)
        if mask is not None:
            s = np.where(mask, s, 0.0).astype(np.float32)
        return s

    def _rank(
        self, query: str, n: int, mask: np.ndarray | None, strategy: Strategy
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Rows in final order, and full-length score arrays (fused and per retriever)."""
        idx = self.index
        assert idx is not None
        size = len(idx)
        tokens = idx.bm25.tokenize([query])[0]
        if strategy == "lexical":
            b = self._bm25_all(tokens, mask)
            order = _top(b, n)
            return order[b[order] > 0], b, {"bm25": b}
        qv = self.embedder.embed([query])[0]
        if strategy == "semantic":
            rows, s = self._dense(qv, n, mask)
            d = np.full(size, -np.inf, dtype=np.float32)
            d[rows] = s
            return rows, d, {"dense": d}

        def fuse(qv: np.ndarray, toks: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
            b = self._bm25_all(toks, mask)
            d_rows, _ = self._dense(qv, self.candidates, mask)
            b_top = _top(b, self.candidates)
            b_top = b_top[b[b_top] > 0]
            cand = np.union1d(d_rows, b_top)
            d = np.zeros(size, dtype=np.float32)
            d[cand] = np.asarray(idx.vectors[cand], dtype=np.float32) @ qv
            fused = np.full(size, -np.inf, dtype=np.float32)
            fused[cand] = self.dense_weight * _by_max(d[cand]) + (1 - self.dense_weight) * _by_max(b[cand])
            return cand[np.argsort(-fused[cand], kind="stable")], fused, d, b

        order, fused, d, b = fuse(qv, tokens)
        if self.feedback_docs > 0 and len(order):
            top = order[: self.feedback_docs]
            qv2 = qv + self.feedback_dense * np.asarray(idx.vectors[top], dtype=np.float32).mean(axis=0)
            qv2 /= np.linalg.norm(qv2) or 1.0
            extra = idx.bm25.expansion_terms([idx.chunk(int(r)).embed_text for r in top], tokens, self.feedback_terms)
            order, fused, d, b = fuse(qv2, tokens * 2 + extra)
        return order[:n], fused, {"dense": d, "bm25": b}


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` highest scores, best first, without sorting the whole array."""
    n = min(n, len(scores))
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    part = np.argpartition(-scores, n - 1)[:n] if n < len(scores) else np.arange(len(scores))
    return part[np.argsort(-scores[part], kind="stable")]


def _by_max(x: np.ndarray) -> np.ndarray:
    m = float(x.max()) if len(x) else 0.0
    return x / m if m > 0 else x
