"""``ragraph eval``: score a retrieval pipeline on any BEIR-format folder.

The dataset is indexed with the project's own indexer into a cache folder keyed by the checksum
of its ``corpus.jsonl`` and the build settings, so a second run embeds nothing. Ranking is at
document level: a document ranks by its best chunk.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from indexing.metrics import Qrels, evaluate_run

Pipeline = Literal["bm25", "bm25-reference", "dense", "hybrid", "full"]
PIPELINES: tuple[Pipeline, ...] = ("bm25", "bm25-reference", "dense", "hybrid", "full")
DEPTH = 100


class DatasetError(ValueError):
    pass


def load_beir(folder: Path, split: str = "test") -> tuple[dict[str, str], Qrels]:
    """Queries (id -> text) and qrels of a BEIR folder; checks that the files are there and sane."""
    folder = Path(folder)
    for rel in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv"):
        if not (folder / rel).is_file():
            raise DatasetError(f"{folder / rel}: missing; a BEIR folder has corpus.jsonl, queries.jsonl, qrels/{split}.tsv")
    queries: dict[str, str] = {}
    with (folder / "queries.jsonl").open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                queries[str(row["_id"])] = str(row["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DatasetError(f"{folder / 'queries.jsonl'}:{n}: expected an object with _id and text ({e})") from None
    qrels: dict[str, dict[str, int]] = {}
    with (folder / f"qrels/{split}.tsv").open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if n == 1 and parts[0] in ("query-id", "query_id", "qid"):
                continue
            if len(parts) != 3:
                raise DatasetError(f"{folder / 'qrels' / (split + '.tsv')}:{n}: expected 3 tab-separated fields")
            try:
                qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
            except ValueError:
                raise DatasetError(f"{folder / 'qrels' / (split + '.tsv')}:{n}: grade {parts[2]!r} is not an integer") from None
    qrels = {q: j for q, j in qrels.items() if q in queries}
    if not qrels:
        raise DatasetError(f"{folder}: no judged query matches queries.jsonl")
    return queries, qrels


def dataset_key(folder: Path, settings: object) -> str:
    h = hashlib.sha256()
    with (Path(folder) / "corpus.jsonl").open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    h.update(json.dumps(asdict(settings), sort_keys=True).encode())  # type: ignore[call-overload]
    return h.hexdigest()[:16]


def _dedupe_docs(chunk_doc_ids: list[str], k: int) -> list[str]:
    seen: dict[str, None] = {}
    for d in chunk_doc_ids:
        seen.setdefault(d, None)
        if len(seen) == k:
            break
    return list(seen)


def run_pipeline(
    pipeline: Pipeline,
    queries: dict[str, str],
    qids: list[str],
    *,
    retriever,  # deployments.retriever.HybridRetriever, warmed up
    reranker=None,  # deployments.reranker.CrossEncoderReranker or None
    log: Callable[[str], None] = print,
) -> tuple[dict[str, list[str]], float]:
    """Rank documents for each query; returns the run and the mean milliseconds per query
    (one query at a time, as a serving replica sees them)."""
    from indexing.lexical import RankBM25Reference

    idx = retriever.index
    doc_of = idx.chunks["document_id"]
    run: dict[str, list[str]] = {}
    if pipeline == "bm25-reference":
        texts = [idx.chunk(i).embed_text for i in range(len(idx))]
        ref = RankBM25Reference(texts)
    t0 = time.perf_counter()
    for n, q in enumerate(qids, 1):
        text = queries[q]
        if pipeline == "bm25-reference":
            rows, _ = ref.search(ref.tokenize([text])[0], DEPTH * 3)
            run[q] = _dedupe_docs([doc_of[r] for r in rows], DEPTH)
            continue
        strategy = {"bm25": "lexical", "dense": "semantic"}.get(pipeline, "hybrid")
        if pipeline == "full" and reranker is not None:
            passages = retriever.run(query=text, top_k=DEPTH * 3, strategy=strategy)
            head = reranker.run(query=text, passages=passages[: reranker.candidates], top_k=reranker.candidates)
            run[q] = _dedupe_docs([p.document_id for p in head + passages[reranker.candidates :]], DEPTH)
        else:
            rows, _, _ = retriever.rank(query=text, n=DEPTH * 3, strategy=strategy)
            run[q] = _dedupe_docs([doc_of[r] for r in rows], DEPTH)
        if n % 10 == 0:
            log(f"  {pipeline}: {n}/{len(qids)} queries")
    ms = (time.perf_counter() - t0) / len(qids) * 1000
    return run, ms


def evaluate(
    pipeline: Pipeline, dataset: Path, queries: dict[str, str], qrels: Qrels, *, retriever, reranker=None, log=print
) -> dict[str, float | int | str]:
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {list(PIPELINES)}, got {pipeline!r}")
    qids = sorted(qrels)
    run, ms = run_pipeline(pipeline, queries, qids, retriever=retriever, reranker=reranker, log=log)
    m = evaluate_run(run, qrels)
    return {
        "dataset": str(dataset),
        "pipeline": pipeline,
        "ndcg@10": round(m["ndcg@10"], 4),
        "recall@100": round(m["recall@100"], 4),
        "mrr@10": round(m["mrr@10"], 4),
        "queries": int(m["queries"]),
        "ms_per_query": round(ms, 3),
        "index_version": retriever.version,
        "reranked": pipeline == "full" and reranker is not None,
    }
