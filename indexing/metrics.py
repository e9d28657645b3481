"""Retrieval metrics over BEIR-style graded judgments.

nDCG uses the standard linear gain (``rel / log2(rank + 1)``), as trec_eval and BEIR do; documents
without a judgment count as 0. Queries without any positive judgment are skipped, as BEIR does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

Qrels = Mapping[str, Mapping[str, int]]  # query id -> doc id -> grade
Run = Mapping[str, Sequence[str]]  # query id -> ranked doc ids


def ndcg_at(ranked: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    dcg = sum(judged.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at(ranked: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    relevant = {d for d, g in judged.items() if g > 0}
    return len(relevant.intersection(ranked[:k])) / len(relevant) if relevant else 0.0


def mrr_at(ranked: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    for i, d in enumerate(ranked[:k]):
        if judged.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def evaluate_run(run: Run, qrels: Qrels) -> dict[str, float]:
    """Mean nDCG@10, Recall@100 and MRR@10 over the judged queries that have a positive judgment."""
    scored = [q for q, j in qrels.items() if any(g > 0 for g in j.values())]
    if not scored:
        raise ValueError("qrels hold no positive judgment; nothing to evaluate")
    n = len(scored)
    return {
        "ndcg@10": sum(ndcg_at(run.get(q, ()), qrels[q], 10) for q in scored) / n,
        "recall@100": sum(recall_at(run.get(q, ()), qrels[q], 100) for q in scored) / n,
        "mrr@10": sum(mrr_at(run.get(q, ()), qrels[q], 10) for q in scored) / n,
        "queries": n,
    }
