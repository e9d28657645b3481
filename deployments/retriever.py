"""The hybrid retriever: BM25 + dense candidates, weighted score fusion calibrated per corpus,
pseudo-relevance feedback, metadata filters. A plain class; its Serve deployment is a thin wrapper
(:class:`deployments.replicas.RetrieverDeployment`).

Fusion (see docs/retrieval.md; chosen with leave-one-dataset-out runs, load_tests/README.md):

1. take ``candidates`` rows from BM25 and from FAISS; score every candidate with both;
2. put each retriever's candidate scores on a common scale (``normalization``: z-scores by
   default) and mix them, ``w * dense + (1 - w) * bm25``. ``w`` is ``dense_weight``, or with
   ``"auto"`` the weight the index's label-free calibration chose for this corpus
   (:mod:`indexing.calibrate`: an inverse-cloze test on the corpus itself, stored in the manifest);
3. feedback, only on a corpus where both retrievers carry signal (calibration balance at least
   ``feedback_min_balance``): the fused top ``feedback_docs`` rows move the query vector towards
   their centroid (Rocchio) and add their most distinctive terms to the BM25 query; fuse again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from indexing.calibrate import NORMALIZATIONS, choose, normalize
from indexing.calibrate import top as _top
from indexing.embedding import Embedder
from indexing.store import IndexLoadError, IndexVersion, current_name, current_path

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


FALLBACK_DENSE_WEIGHT = 0.5  # "auto" on an index too small or too sentence-poor to calibrate


@dataclass(frozen=True, slots=True)
class _Loaded:
    """One index version with its filter columns and its fusion settings. Swapped as a whole: a
    request holds the one it started with, so a live swap never mixes two versions in one answer."""

    index: IndexVersion
    domains: np.ndarray
    updated: np.ndarray
    dense_weight: float = FALLBACK_DENSE_WEIGHT
    feedback: bool = True

    @classmethod
    def of(cls, index: IndexVersion, dense_weight: float = FALLBACK_DENSE_WEIGHT, feedback: bool = True) -> _Loaded:
        return cls(index, np.asarray(index.chunks["domain"]), np.asarray(index.chunks["updated_at"]),
                   dense_weight, feedback)


@dataclass(frozen=True, slots=True)
class Retrieval:
    passages: list[Passage]
    version: str


class HybridRetriever:
    def __init__(
        self,
        *,
        index_dir: Path,
        embedder: Embedder,
        top_k: int = 10,
        candidates: int = 100,
        strategy: Strategy = "hybrid",
        dense_weight: float | Literal["auto"] = "auto",
        normalization: Literal["max", "z"] = "z",
        feedback_docs: int = 5,
        feedback_min_balance: float = 0.5,
        feedback_dense: float = 0.5,
        feedback_terms: int = 5,
        ef_search: int = 128,
        faiss_device: str = "cpu",
        model_checksum: str = "",
    ) -> None:
        if top_k <= 0:
            raise ValueError(f"top_k must be > 0, got {top_k}")
        if candidates < top_k:
            raise ValueError(f"candidates must be >= top_k={top_k}, got {candidates}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
        if dense_weight != "auto" and not (isinstance(dense_weight, int | float) and 0.0 <= dense_weight <= 1.0):
            raise ValueError(f"dense_weight must be in [0, 1] or 'auto', got {dense_weight}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {list(NORMALIZATIONS)}, got {normalization!r}")
        self.index_dir, self.embedder = Path(index_dir), embedder
        self.top_k, self.candidates, self.strategy, self.dense_weight = top_k, candidates, strategy, dense_weight
        self.normalization, self.feedback_min_balance = normalization, feedback_min_balance
        self.feedback_docs, self.feedback_dense, self.feedback_terms = feedback_docs, feedback_dense, feedback_terms
        self.ef_search, self.faiss_device, self.model_checksum = ef_search, faiss_device, model_checksum
        self._state: _Loaded | None = None
        self._refused: str | None = None

    @classmethod
    def from_config(cls, cfg, *, index_dir: Path | None = None) -> HybridRetriever:
        """Build from an :class:`common.config.AppConfig`."""
        from indexing.jobs import embedder_from_config, model_checksum

        r = cfg.retriever
        return cls(
            index_dir=index_dir or cfg.indexing.dir,
            embedder=embedder_from_config(cfg),
            top_k=r.top_k,
            candidates=r.candidates,
            strategy=r.strategy,
            dense_weight=r.dense_weight,
            normalization=r.normalization,
            feedback_docs=r.feedback_docs,
            feedback_min_balance=r.feedback_min_balance,
            feedback_dense=r.feedback_dense,
            feedback_terms=r.feedback_terms,
            ef_search=cfg.indexing.hnsw_ef_search,
            faiss_device=cfg.indexing.faiss_device,
            model_checksum=model_checksum(cfg.models.location("embedder")),
        )

    def _load(self, name: str | None = None) -> _Loaded:
        from indexing.store import load_version

        folder = current_path(self.index_dir) if name is None else self.index_dir / "versions" / name
        idx = load_version(
            folder, expected_dim=self.embedder.dim, ef_search=self.ef_search, faiss_device=self.faiss_device
        )
        built_with = idx.manifest["model"].get("checksum") or ""
        if self.model_checksum and built_with and built_with != self.model_checksum:
            raise IndexLoadError(
                f"{folder / 'manifest.json'}: built with embedder checksum {built_with[:12]}..., but the serving "
                f"embedder {self.embedder.model} has {self.model_checksum[:12]}...; its vectors would not match "
                "the queries. Re-index with `ragraph index --full`"
            )
        return self._calibrated(idx)

    def _calibrated(self, idx: IndexVersion) -> _Loaded:
        """The index with its fusion weight and feedback decision (from the manifest's calibration;
        an index built before calibration existed is calibrated now, in memory)."""
        cal = idx.manifest.get("calibration")
        if cal is None and self.dense_weight == "auto" and "settings" in idx.manifest:
            from indexing.store import calibrate_chunks, settings_of

            chunks = [idx.chunk(i) for i in range(len(idx))]
            cal = calibrate_chunks(chunks, idx.vectors, self.embedder.embed, settings_of(idx.manifest))
        chosen = choose(cal, self.normalization)
        weight, balance = chosen if chosen else (FALLBACK_DENSE_WEIGHT, 1.0)
        if self.dense_weight != "auto":
            weight = float(self.dense_weight)
        return _Loaded.of(idx, weight, balance >= self.feedback_min_balance)

    @property
    def fusion(self) -> dict[str, float | bool | str]:
        """The fusion settings of the loaded version: dense weight, normalisation, feedback on/off."""
        self.warm_up()
        assert self._state is not None
        return {"dense_weight": self._state.dense_weight, "normalization": self.normalization,
                "feedback": self._state.feedback and self.feedback_docs > 0}

    def warm_up(self) -> None:
        self.embedder.warm_up()
        if self._state is None:
            self._state = self._load()

    @property
    def loaded(self) -> bool:
        return self._state is not None

    def refresh(self) -> str | None:
        """Switch to the published version if it changed. Returns the new version's name, or None
        when nothing changed. A version that fails to load raises :class:`IndexLoadError` once and
        is not retried until ``current`` moves again; the old version keeps serving."""
        name = current_name(self.index_dir)
        if name is None or (self._state is not None and name == self._state.index.name) or name == self._refused:
            return None
        self.embedder.warm_up()
        try:
            state = self._load(name)
        except IndexLoadError:
            self._refused = name
            raise
        self._state, self._refused = state, None  # one attribute write: requests see old or new
        return name

    @property
    def index(self) -> IndexVersion:
        self.warm_up()
        assert self._state is not None
        return self._state.index

    @property
    def version(self) -> str:
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
        return self.search(query=query, top_k=top_k, filters=filters, strategy=strategy).passages

    def search(
        self,
        *,
        query: str,
        top_k: int | None = None,
        filters: Filters | None = None,
        strategy: Strategy | None = None,
        query_vector: np.ndarray | None = None,
    ) -> Retrieval:
        """Like :meth:`run`, and says which index version answered. ``query_vector``: the query's
        embedding when the caller batched it (the Serve deployment does)."""
        k = self.top_k if top_k is None else top_k
        if k <= 0:
            raise ValueError(f"top_k must be > 0, got {k}")
        self.warm_up()
        st = self._state
        assert st is not None
        rows, fused, parts = self._rank_in(st, query, k, filters, strategy, query_vector)
        idx = st.index
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
        return Retrieval(out, idx.name)

    def rank(
        self, *, query: str, n: int, filters: Filters | None = None, strategy: Strategy | None = None
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """The best ``n`` chunk rows in order, with full-length score arrays (fused and per
        retriever). What ``run`` builds passages from; evaluation uses it directly."""
        self.warm_up()
        assert self._state is not None
        return self._rank_in(self._state, query, n, filters, strategy, None)

    def _rank_in(
        self,
        st: _Loaded,
        query: str,
        n: int,
        filters: Filters | None,
        strategy: Strategy | None,
        qv: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        strategy = strategy or self.strategy
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
        empty = np.zeros(0, dtype=np.int64)
        if not query.strip():
            return empty, np.zeros(0, dtype=np.float32), {}
        mask = _mask(st, filters) if filters is not None and filters.active else None
        if mask is not None and not mask.any():
            return empty, np.zeros(0, dtype=np.float32), {}
        rows, fused, parts = self._rank(st, query, n, mask, strategy, qv)
        return rows[:n], fused, parts

    def _dense(self, idx: IndexVersion, qv: np.ndarray, n: int, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Top-n rows by inner product (only rows in ``mask``)."""
        import faiss

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

    @staticmethod
    def _bm25_all(idx: IndexVersion, tokens: list[str], mask: np.ndarray | None) -> np.ndarray:
        s = np.asarray(idx.bm25.scores(tokens), dtype=np.float32)
        if mask is not None:
            s = np.where(mask, s, 0.0).astype(np.float32)
        return s

    def _rank(
        self, st: _Loaded, query: str, n: int, mask: np.ndarray | None, strategy: Strategy,
        qv: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Rows in final order, and full-length score arrays (fused and per retriever)."""
        idx, w, how = st.index, st.dense_weight, self.normalization
        size = len(idx)
        tokens = idx.bm25.tokenize([query])[0]
        if strategy == "lexical":
            b = self._bm25_all(idx, tokens, mask)
            order = _top(b, n)
            return order[b[order] > 0], b, {"bm25": b}
        if qv is None:
            qv = self.embedder.embed([query])[0]
        if strategy == "semantic":
            rows, s = self._dense(idx, qv, n, mask)
            d = np.full(size, -np.inf, dtype=np.float32)
            d[rows] = s
            return rows, d, {"dense": d}

        def fuse(qv: np.ndarray, toks: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
            b = self._bm25_all(idx, toks, mask)
            d_rows, _ = self._dense(idx, qv, self.candidates, mask)
            b_top = _top(b, self.candidates)
            b_top = b_top[b[b_top] > 0]
            cand = np.union1d(d_rows, b_top)
            d = np.zeros(size, dtype=np.float32)
            d[cand] = np.asarray(idx.vectors[cand], dtype=np.float32) @ qv
            fused = np.full(size, -np.inf, dtype=np.float32)
            fused[cand] = w * normalize(d[cand], how) + (1 - w) * normalize(b[cand], how)
            return cand[np.argsort(-fused[cand], kind="stable")], fused, d, b

        order, fused, d, b = fuse(qv, tokens)
        if st.feedback and self.feedback_docs > 0 and len(order):
            top = order[: self.feedback_docs]
            qv2 = qv + self.feedback_dense * np.asarray(idx.vectors[top], dtype=np.float32).mean(axis=0)
            qv2 /= np.linalg.norm(qv2) or 1.0
            extra = idx.bm25.expansion_terms([idx.chunk(int(r)).embed_text for r in top], tokens, self.feedback_terms)
            order, fused, d, b = fuse(qv2, tokens * 2 + extra)
        return order[:n], fused, {"dense": d, "bm25": b}


def _mask(st: _Loaded, f: Filters) -> np.ndarray:
    m = np.ones(len(st.domains), dtype=bool)
    if f.domains:
        m &= np.isin(st.domains, list(f.domains))
    if f.updated_after:
        m &= st.updated >= f.updated_after
    if f.updated_before:
        m &= st.updated <= f.updated_before
    return m


# ---------------------------------------------------------------------------------------------
# a search with its query embedded by the caller (a replica batches it: deployments/replicas.py)

async def timed_search(
    r: HybridRetriever, embed, *, query: str, top_k: int, filters: Filters | None, strategy: str | None
) -> tuple[list[Passage], dict]:
    """Embed the query with ``embed`` (an async callable: batched in a replica, a thread in one
    process), search in a worker thread, and time both: (passages, {version, embed_ms, search_ms})."""
    import asyncio
    import time

    t = time.perf_counter()
    qv = None
    if (strategy or r.strategy) != "lexical" and query.strip():
        qv = await embed(query)
    t_embed = time.perf_counter() - t
    res = await asyncio.to_thread(r.search, query=query, top_k=top_k, filters=filters, strategy=strategy, query_vector=qv)
    info = {"version": res.version, "embed_ms": round(t_embed * 1000, 2),
            "search_ms": round((time.perf_counter() - t - t_embed) * 1000, 2)}
    return res.passages, info
