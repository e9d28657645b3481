"""BM25, dense and the hybrid on every BEIR set in ../shared/data, with leave-one-dataset-out
selection of the hybrid's free settings.

    python load_tests/bench_retrieval.py [DATASET ...] [--out results/retrieval.json] [--engines]

Each set is indexed with the project's indexer (in-process embedding, one torch thread) into
``--cache-dir`` (default /tmp/ragraph-bench, outside the repo), keyed by the corpus checksum and the
build settings, so a rerun embeds nothing; query vectors are cached beside it. The index build
includes the label-free fusion calibration (indexing/calibrate.py), stored in the manifest.

The free settings of the hybrid are ``normalization`` (max or z) and ``feedback_min_balance``.
For each left-out set, the setting with the best mean nDCG@10 over the *other* sets is chosen and
scored on the left-out one; ties go to the middle of the tied settings in the order listed.
"old hybrid" is the previous default (max-normalised, dense_weight 0.75, feedback always).
``--engines`` adds the BM25 engine comparison (bm25s vs rank-bm25) on the first set.
JSON is written only with ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["RAGRAPH__INDEXING__ENGINE"] = "local"  # no Ray for a benchmark on a shared machine

import numpy as np

import _common  # noqa: F401  (sets offline env)
from _common import SHARED_DATA, print_table, write_json

NORMS = ("max", "z")
BALANCES = (0.0, 0.25, 0.5, 0.75, 1.01)  # 1.01: feedback never
CANDIDATES = [{"normalization": n, "feedback_min_balance": b} for n in NORMS for b in BALANCES]
OLD = {"dense_weight": 0.75, "normalization": "max", "feedback_min_balance": 0.0}


def label(c: dict) -> str:
    return f"{c['normalization']}/fb>={c['feedback_min_balance']}"


class CachedEmbedder:
    """The real embedder, with every query vector of a set computed once and kept in a file."""

    def __init__(self, inner, texts: list[str], cache: Path) -> None:
        self._inner, self.model = inner, inner.model
        key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]
        path = cache / f"queries-{key}.npy"
        if path.exists():
            vecs = np.load(path)
        else:
            vecs = inner.embed(texts)
            np.save(path, vecs)
        self._known = dict(zip(texts, vecs, strict=True))

    @property
    def dim(self) -> int:
        return self._inner.dim

    def warm_up(self) -> None:
        pass

    def embed(self, texts):
        if all(t in self._known for t in texts):
            return np.stack([self._known[t] for t in texts])
        return self._inner.embed(texts)


def pick(scores: dict[str, dict[str, float]], sets: list[str]) -> dict:
    """The candidate setting with the best mean nDCG@10 over ``sets``; ties: the middle one."""
    means = [np.mean([scores[s][label(c)] for s in sets]) for c in CANDIDATES]
    best = [c for c, m in zip(CANDIDATES, means, strict=True) if m >= max(means) - 1e-9]
    return best[len(best) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("datasets", type=Path, nargs="*", help="BEIR folders (default: every set in ../shared/data)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/ragraph-bench"))
    ap.add_argument("--engines", action="store_true", help="also compare the BM25 engines on the first set")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)

    from common.config import load_config
    from deployments.retriever import HybridRetriever
    from indexing.evaluate import dataset_key, evaluate, load_beir
    from indexing.jobs import embedder_from_config, index_source, settings_from_config

    cfg = load_config()
    sets = args.datasets or sorted(p for p in SHARED_DATA.iterdir() if (p / "corpus.jsonl").is_file())
    embedder = embedder_from_config(cfg)
    r = cfg.retriever
    common = {"top_k": r.top_k, "candidates": r.candidates, "feedback_docs": r.feedback_docs,
              "feedback_dense": r.feedback_dense, "feedback_terms": r.feedback_terms}
    scores: dict[str, dict[str, float]] = {}
    info: dict[str, dict] = {}
    for ds in sets:
        t0 = time.perf_counter()
        queries, qrels = load_beir(ds)
        root = args.cache_dir / f"{ds.name}-{dataset_key(ds, settings_from_config(cfg))}"
        index_source(cfg, ds, root, log=lambda m: None)
        qids = sorted(qrels)
        emb = CachedEmbedder(embedder, [queries[q] for q in qids], root)

        def ndcg(pipeline: str, **kw) -> float:
            ret = HybridRetriever(index_dir=root, embedder=emb, **{**common, **kw})  # noqa: B023
            ret.warm_up()
            return float(evaluate(pipeline, ds, queries, qrels, retriever=ret, log=lambda m: None)["ndcg@10"])  # noqa: B023

        s = {"bm25": ndcg("bm25"), "dense": ndcg("dense"), "old hybrid": ndcg("hybrid", **OLD)}
        for c in CANDIDATES:
            s[label(c)] = ndcg("hybrid", **c)
        probe = HybridRetriever(index_dir=root, embedder=emb, **common)
        probe.warm_up()
        cal = probe.index.manifest.get("calibration", {})
        info[ds.name] = {"queries": len(qids), "chunks": len(probe.index), "dense_weight": probe.fusion["dense_weight"],
                         "calibration": {k: cal.get(k) for k in ("queries", "bm25_mrr", "dense_mrr")},
                         "seconds": round(time.perf_counter() - t0, 1)}
        scores[ds.name] = s
        print(f"{ds.name}: {len(qids)} queries, calibrated dense_weight {probe.fusion['dense_weight']}, "
              f"inverse-cloze MRR bm25 {cal.get('bm25_mrr')} dense {cal.get('dense_mrr')} ({info[ds.name]['seconds']} s)",
              flush=True)

    names = [ds.name for ds in sets]
    print("\nEvery setting on every set (nDCG@10):\n")
    print_table([{"setting": k, **{n: scores[n][k] for n in names}} for k in scores[names[0]]], ["setting", *names])

    frozen = pick(scores, names)
    rows = []
    for n in names:
        others = [m for m in names if m != n] or [n]
        c = pick(scores, others)
        best_single = max(scores[n]["bm25"], scores[n]["dense"])
        rows.append({"set": n, "bm25": scores[n]["bm25"], "dense": scores[n]["dense"],
                     "old hybrid": scores[n]["old hybrid"], "new hybrid (LODO)": scores[n][label(c)],
                     "vs best single": round(scores[n][label(c)] - best_single, 4),
                     "chosen on the others": label(c), "dense_weight": info[n]["dense_weight"],
                     "frozen default": scores[n][label(frozen)]})
    print("\nLeave-one-dataset-out (setting chosen on the other sets, scored on this one):\n")
    print_table(rows, list(rows[0]))
    print(f"\nchosen on all sets (the default): {label(frozen)}")

    engines = bm25_engines(sets[0], cfg, args.cache_dir) if args.engines else None
    if args.out:
        write_json(args.out, {"datasets": [str(d) for d in sets], "scores": scores, "info": info,
                              "lodo": rows, "default": frozen, "bm25_engines": engines})


def bm25_engines(ds: Path, cfg, cache: Path) -> list[dict]:
    """bm25s (serving) against rank-bm25, search time only, one query at a time."""
    from indexing.evaluate import dataset_key, load_beir
    from indexing.jobs import settings_from_config
    from indexing.lexical import BM25Index, RankBM25Reference, Tokenizer
    from indexing.metrics import evaluate_run
    from indexing.store import load_current

    queries, qrels = load_beir(ds)
    idx = load_current(cache / f"{ds.name}-{dataset_key(ds, settings_from_config(cfg))}")
    texts = [idx.chunk(i).embed_text for i in range(len(idx))]
    doc_of, qids, r = idx.chunks["document_id"], sorted(qrels), cfg.retriever
    engines = {
        "bm25s, stemmed tokens (serving)": BM25Index.build(texts, k1=r.bm25_k1, b=r.bm25_b, stemmer=r.stemmer),
        "rank-bm25, plain tokens (reference)": RankBM25Reference(texts),
        "rank-bm25, same stemmed tokens": RankBM25Reference(texts, tokenizer=Tokenizer(stemmer=r.stemmer)),
    }
    rows = []
    for name, eng in engines.items():
        toks = [eng.tokenize([queries[q]])[0] for q in qids]
        t0 = time.perf_counter()
        ranked = [eng.search(t, 300)[0] for t in toks]
        ms = (time.perf_counter() - t0) / len(qids) * 1000
        run = {q: list(dict.fromkeys(doc_of[x] for x in rr))[:100] for q, rr in zip(qids, ranked, strict=True)}
        m = evaluate_run(run, qrels)
        rows.append({"engine": name, "ndcg@10": round(m["ndcg@10"], 4), "recall@100": round(m["recall@100"], 4),
                     "search_ms": round(ms, 3)})
    print(f"\nBM25 engines on {ds.name}, search only (one query at a time):\n")
    print_table(rows, ["engine", "ndcg@10", "recall@100", "search_ms"])
    return rows


if __name__ == "__main__":
    main()
