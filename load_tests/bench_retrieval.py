"""Every retrieval pipeline on one BEIR dataset, side by side in one run.

    python load_tests/bench_retrieval.py [DATASET] [--out results/retrieval.json] [--reranker DIR]

Prints nDCG@10, Recall@100, MRR@10 and ms/query per pipeline, then the BM25 engine comparison:
bm25s (serving) against rank-bm25, both on the reference's plain tokens and on identical tokens.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _common  # noqa: F401  (sets offline env)
from _common import SHARED_DATA, print_table, write_json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset", type=Path, nargs="?", default=SHARED_DATA / "msmarco-5k")
    ap.add_argument("--out", type=Path, default=Path("load_tests/results/retrieval.json"))
    ap.add_argument("--cache-dir", type=Path, default=Path("~/.cache/ragraph/eval"))
    ap.add_argument("--reranker", type=Path, default=None, help="a cross-encoder folder for the 'full' pipeline")
    args = ap.parse_args()

    from deployments.reranker import CrossEncoderReranker
    from deployments.retriever import HybridRetriever
    from indexing.evaluate import dataset_key, evaluate, load_beir
    from indexing.jobs import index_source, settings_from_config
    from indexing.lexical import BM25Index, RankBM25Reference, Tokenizer
    from indexing.metrics import evaluate_run
    from common.config import load_config

    cfg = load_config()
    queries, qrels = load_beir(args.dataset)
    root = args.cache_dir.expanduser() / dataset_key(args.dataset, settings_from_config(cfg))
    index_source(cfg, args.dataset, root, log=lambda m: None)
    retriever = HybridRetriever.from_config(cfg, index_dir=root)
    retriever.warm_up()
    reranker = None
    if args.reranker:
        reranker = CrossEncoderReranker(model=str(args.reranker), top_k=cfg.reranker.top_k, candidates=cfg.reranker.candidates)
        reranker.warm_up()

    rows = []
    for p in ("bm25-reference", "bm25", "dense", "hybrid", "full"):
        r = evaluate(p, args.dataset, queries, qrels, retriever=retriever, reranker=reranker, log=lambda m: None)
        r["pipeline"] = p + (" (no reranker)" if p == "full" and reranker is None else "")
        rows.append(r)
    print(f"\n{args.dataset.name}: {rows[0]['queries']} judged queries, index {retriever.version}\n")
    print_table(rows, ["pipeline", "ndcg@10", "recall@100", "mrr@10", "ms_per_query"])

    # BM25 engines: search time only (tokenization excluded), one query at a time
    idx = retriever.index
    texts = [idx.chunk(i).embed_text for i in range(len(idx))]
    doc_of = idx.chunks["document_id"]
    qids = sorted(qrels)
    tok = Tokenizer(stemmer=cfg.retriever.stemmer)
    engines = {
        "bm25s, stemmed tokens (serving)": BM25Index.build(texts, k1=cfg.retriever.bm25_k1, b=cfg.retriever.bm25_b, stemmer=cfg.retriever.stemmer),
        "rank-bm25, plain tokens (reference)": RankBM25Reference(texts),
        "rank-bm25, same stemmed tokens": RankBM25Reference(texts, tokenizer=tok),
    }
    eng_rows = []
    for name, eng in engines.items():
        toks = [eng.tokenize([queries[q]])[0] for q in qids]
        t0 = time.perf_counter()
        ranked = [eng.search(t, 300)[0] for t in toks]
        ms = (time.perf_counter() - t0) / len(qids) * 1000
        run = {q: list(dict.fromkeys(doc_of[r] for r in rows_))[:100] for q, rows_ in zip(qids, ranked, strict=True)}
        m = evaluate_run(run, qrels)
        eng_rows.append({"engine": name, "ndcg@10": round(m["ndcg@10"], 4), "recall@100": round(m["recall@100"], 4), "search_ms": ms})
    base = eng_rows[0]["search_ms"]
    for r in eng_rows:
        r["x_slower_than_bm25s"] = round(r["search_ms"] / base, 1)
    print("\nBM25 engines, search only (one query at a time):\n")
    print_table(eng_rows, ["engine", "ndcg@10", "recall@100", "search_ms", "x_slower_than_bm25s"])
    pipeline_ratio = rows[0]["ms_per_query"] / rows[1]["ms_per_query"]
    print(f"\nbm25 pipeline vs bm25-reference pipeline, end to end per query: {pipeline_ratio:.1f}x faster")
    write_json(args.out, {"dataset": str(args.dataset), "pipelines": rows, "bm25_engines": eng_rows,
                          "bm25_pipeline_speedup": round(pipeline_ratio, 1)})


if __name__ == "__main__":
    main()
