"""The cross-encoder reranker: a plain class; its Serve deployment is a thin wrapper
(:class:`deployments.replicas.RerankerDeployment`).

``model`` is a local cross-encoder folder (e.g. the one `ragraph reranker adapt` writes) or a hub
id such as ``cross-encoder/ms-marco-MiniLM-L-6-v2`` (cluster configs).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from deployments.retriever import Passage


class CrossEncoderReranker:
    def __init__(
        self, *, model: str, top_k: int = 10, candidates: int = 30, batch_size: int = 32, device: str = "cpu"
    ) -> None:
        if top_k <= 0:
            raise ValueError(f"top_k must be > 0, got {top_k}")
        if candidates < top_k:
            raise ValueError(f"candidates must be >= top_k={top_k}, got {candidates}")
        self.model, self.top_k, self.candidates, self.batch_size, self.device = model, top_k, candidates, batch_size, device
        self._ce = None

    @classmethod
    def from_config(cls, cfg) -> CrossEncoderReranker:
        r = cfg.reranker
        return cls(model=cfg.reranker_model(), top_k=r.top_k, candidates=r.candidates, batch_size=r.batch_size, device=r.device)

    def warm_up(self) -> None:
        if self._ce is None:
            from sentence_transformers import CrossEncoder

            path = Path(self.model).expanduser()
            looks_local = self.model.startswith(("/", "~", ".")) or path.exists()
            if looks_local and not (path / "config.json").is_file():
                raise FileNotFoundError(
                    f"reranker model folder {path} has no config.json; build it with `ragraph reranker adapt` "
                    "or set reranker.model to a hub id"
                )
            self._ce = CrossEncoder(str(path) if looks_local else self.model, device=self.device)

    def run(self, *, query: str, passages: list[Passage], top_k: int | None = None) -> list[Passage]:
        """Rescore ``passages`` (the first ``candidates``) against ``query``; best first, ``top_k`` kept.
        Inputs are not changed: results are copies carrying the cross-encoder score."""
        k = self.top_k if top_k is None else top_k
        if k <= 0:
            raise ValueError(f"top_k must be > 0, got {k}")
        if not passages:
            return []
        self.warm_up()
        head = passages[: self.candidates]
        pairs = [(query, "\n".join(x for x in (p.title, p.heading_path, p.text) if x)) for p in head]
        scores = self._ce.predict(pairs, batch_size=self.batch_size, show_progress_bar=False)
        ranked = sorted(zip(head, scores, strict=True), key=lambda t: -float(t[1]))
        return [
            replace(p, score=float(s), scores={**p.scores, "rerank": float(s), "retrieval": p.score or 0.0})
            for p, s in ranked[:k]
        ]

    def run_batch(self, requests: list[tuple[str, list[Passage], int | None]]) -> list[list[Passage]]:
        """Several (query, passages, top_k) requests scored in one cross-encoder call."""
        self.warm_up()
        pairs, spans = [], []
        for query, passages, _ in requests:
            head = passages[: self.candidates]
            start = len(pairs)
            pairs += [(query, "\n".join(x for x in (p.title, p.heading_path, p.text) if x)) for p in head]
            spans.append((start, len(pairs), head))
        scores = self._ce.predict(pairs, batch_size=self.batch_size, show_progress_bar=False) if pairs else []
        out = []
        for (start, end, head), (_, _, top_k) in zip(spans, requests, strict=True):
            k = self.top_k if top_k is None else top_k
            ranked = sorted(zip(head, scores[start:end], strict=True), key=lambda t: -float(t[1]))
            out.append([
                replace(p, score=float(s), scores={**p.scores, "rerank": float(s), "retrieval": p.score or 0.0})
                for p, s in ranked[:k]
            ])
        return out
