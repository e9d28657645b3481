"""Scale benchmark (issue #5, comparison 4): FAISS exact against HNSW on a synthetic 1M-chunk index,
and the BM25 serving engine (bm25s) against rank-bm25 on a synthetic 200k-chunk corpus.

    flock /tmp/ragraph-bench.lock .venv/bin/python load_tests/bench_ann.py      # full size
    .venv/bin/python load_tests/bench_ann.py --n 50000 --bm25-docs 20000        # quick check

Dense: IndexFlatIP (exact) against the project's HNSW (``indexing.dense.build_faiss``, loaded with
``load_faiss``; ``hnsw_m`` / ``hnsw_ef_search`` from configs/gpu.yaml) over ``--n`` unit vectors.
Each query is searched alone (default faiss threads); the table gives p50/p95 ms and recall@100 of
HNSW against the exact top 100, for the configured efSearch and a sweep. The vectors are a
three-level Gaussian mixture (topics > subtopics > points) in a 64-dim subspace plus a shared mean
and isotropic noise, calibrated on msmarco-5k's MiniLM vectors; a realism table sets both side by
side at 5k (neighbour cosines, local intrinsic dimension, HNSW recall) when bench_retrieval.py has
cached that index. Uniform random vectors would be adversarial for any ANN and say little.
The generated vectors and HNSW index are cached under ``--cache-dir`` (n/dim/seed/M), so a re-run
skips the build (10+ min at 1M on two cores).

BM25: ``indexing.lexical.BM25Index`` (bm25s, serving) against ``RankBM25Reference`` (BM25Okapi) on
identical stemmed tokens, over chunks drawn word by word from msmarco-5k's word frequencies with
its passage lengths, searched with msmarco-5k's real queries: p50 ms, speed ratio and top-10 overlap.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import _common  # noqa: F401  (sets offline env)
import faiss
import numpy as np
from _common import REPO, SHARED_DATA, print_table, write_json

from indexing.dense import build_faiss, load_faiss, save_faiss
from common.config import load_config

T = TypeVar("T")

# The synthetic embedding model, calibrated on msmarco-5k's MiniLM vectors (version 1).
GEN_VERSION = 1
LATENT = 64  # dimensions that carry the structure (they hold 69% of the real variance)
SPECTRUM = 0.75  # variance of latent axis i ~ i**-0.75, a power-law fit of the real PCA spectrum
LATENT_VAR, NOISE_VAR = 0.67, 0.15  # latent variance; isotropic noise variance over all dims
MEAN_NORM = 0.16  # the real vectors share a mean direction of this norm
TOPIC, SUBTOPIC = 100, 10  # points per topic and per subtopic
SPLIT = (0.5, 0.3, 0.2)  # latent variance between topics, between subtopics, within a subtopic
DB, QUERIES = 1, 2  # random streams: database and query vectors come from different draws
GENERATOR = {"version": GEN_VERSION, "latent_dims": LATENT, "spectrum_power": SPECTRUM, "latent_var": LATENT_VAR,
             "noise_var": NOISE_VAR, "mean_norm": MEAN_NORM, "topic_size": TOPIC, "subtopic_size": SUBTOPIC,
             "variance_split": SPLIT}


class Mixture:
    """Unit vectors from topics > subtopics > points in a LATENT-dim subspace of R^dim."""

    def __init__(self, *, n: int, dim: int, seed: int) -> None:
        rng = np.random.default_rng([seed, 0])
        self.seed, self.dim = seed, dim
        self.basis = np.linalg.qr(rng.standard_normal((dim, LATENT)))[0].T.astype(np.float32)
        scale = np.arange(1, LATENT + 1) ** (-SPECTRUM / 2)
        self.scale = (scale * np.sqrt(LATENT_VAR / (scale**2).sum())).astype(np.float32)
        mean = rng.standard_normal(dim)
        self.mean = (mean * MEAN_NORM / np.linalg.norm(mean)).astype(np.float32)
        n_topics, n_subs = max(1, n // TOPIC), max(1, n // SUBTOPIC)
        topics = rng.standard_normal((n_topics, LATENT), dtype=np.float32) * self.scale * np.sqrt(SPLIT[0])
        self.subtopics = topics[rng.integers(0, n_topics, n_subs)]
        self.subtopics += rng.standard_normal((n_subs, LATENT), dtype=np.float32) * self.scale * np.sqrt(SPLIT[1])

    def fill(self, out: np.ndarray, *, stream: int, step: int = 100_000) -> np.ndarray:
        """Write ``len(out)`` vectors into ``out`` (an array or a memmap), a block at a time."""
        for start in range(0, len(out), step):
            rng = np.random.default_rng([self.seed, stream, start])
            m = min(step, len(out) - start)
            lat = self.subtopics[rng.integers(0, len(self.subtopics), m)]
            lat += rng.standard_normal((m, LATENT), dtype=np.float32) * self.scale * np.sqrt(SPLIT[2])
            x = lat @ self.basis + self.mean
            x += rng.standard_normal((m, self.dim), dtype=np.float32) * np.sqrt(NOISE_VAR / self.dim)
            out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    def sample(self, n: int, *, stream: int) -> np.ndarray:
        return self.fill(np.empty((n, self.dim), dtype=np.float32), stream=stream)


# ---------------------------------------------------------------------------------------------
# measuring


def per_query(search: Callable[[T], np.ndarray], items: Sequence[T], *, warm: int = 5) -> tuple[list[np.ndarray], np.ndarray]:
    """Each item searched alone: (result ids per item, milliseconds per item)."""
    for it in items[:warm]:
        search(it)
    ids, ms = [], np.empty(len(items))
    for i, it in enumerate(items):
        t0 = time.perf_counter()
        ids.append(search(it))
        ms[i] = (time.perf_counter() - t0) * 1000
    return ids, ms


def overlap(a: Sequence[np.ndarray], b: Sequence[np.ndarray], k: int) -> float:
    """Mean share of b's top k found in a's top k (recall@k of a against b)."""
    return float(np.mean([len(np.intersect1d(x[:k], y[:k])) / k for x, y in zip(a, b, strict=True)]))


def latency(ms: np.ndarray) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3)}


def neighbours(db: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatIP(db.shape[1])
    index.add(db)
    return index.search(queries, k)


def shape_stats(cos: np.ndarray, db: np.ndarray, seed: int) -> dict[str, float]:
    """Cosine of the 1st/10th/100th neighbour, local intrinsic dimension (Levina-Bickel MLE over 20
    and 100 neighbours, median over queries) and the mean cosine of random pairs."""
    dist = np.sqrt(np.clip(2 - 2 * cos, 1e-12, None))
    rng = np.random.default_rng([seed, 9])
    a, b = (db[rng.integers(0, len(db), 2000)] for _ in range(2))
    out = {f"cos@{j}": round(float(np.median(cos[:, j - 1])), 3) for j in (1, 10, 100) if j <= cos.shape[1]}
    for k in (k for k in (20, 100) if k <= cos.shape[1]):
        out[f"lid@{k}"] = round(float(np.median(-1 / np.log(dist[:, : k - 1] / dist[:, k - 1 : k]).mean(axis=1))), 1)
    out["cos_random"] = round(float((a * b).sum(axis=1).mean()), 3)
    return out


# ---------------------------------------------------------------------------------------------
# dense: exact against HNSW


def hnsw_cached(mix: Mixture, *, n: int, m: int, ef: int, cache: Path) -> tuple[np.ndarray, faiss.Index, dict[str, Any]]:
    """The database vectors (memory-mapped) and the HNSW index, built once and cached."""
    folder = cache / f"ann-n{n}-d{mix.dim}-s{mix.seed}-m{m}-g{GEN_VERSION}"
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        print(f"cache: using {folder} (HNSW built in {meta['hnsw_build_s']:.0f} s on {meta['built']})")
        return np.load(folder / "vectors.npy", mmap_mode="r"), load_faiss(folder / "hnsw.faiss", ef_search=ef), meta | {"cache_used": True}

    folder.mkdir(parents=True, exist_ok=True)
    print(f"cache: none in {folder}; generating {n:,} vectors and building HNSW M={m}")
    t0 = time.perf_counter()
    vectors = mix.fill(np.lib.format.open_memmap(folder / "vectors.npy", "w+", np.float32, (n, mix.dim)), stream=DB)
    vectors.flush()
    gen_s = time.perf_counter() - t0

    step = max(10_000, n // 20)
    t0 = time.perf_counter()
    index = build_faiss(vectors[:step], ann_threshold=0, hnsw_m=m)  # 0: HNSW at any size, as above the threshold
    for start in range(step, n, step):
        index.add(vectors[start : start + step])
        el = time.perf_counter() - t0
        print(f"  HNSW {index.ntotal:>10,}/{n:,} ({index.ntotal / n:4.0%}), {el:5.0f} s, ~{el * (n / index.ntotal - 1):.0f} s left", flush=True)
    build_s = time.perf_counter() - t0
    save_faiss(index, folder / "hnsw.faiss")
    del index
    meta = {"built": time.strftime("%Y-%m-%d %H:%M"), "generate_s": round(gen_s, 1), "hnsw_build_s": round(build_s, 1)}
    meta_path.write_text(json.dumps(meta))
    print(f"built HNSW in {build_s:.0f} s (vectors generated in {gen_s:.0f} s)")
    return vectors, load_faiss(folder / "hnsw.faiss", ef_search=ef), meta | {"cache_used": False}


def bench_dense(args: argparse.Namespace, ix_cfg: Any) -> dict[str, Any]:
    m, ef, k = ix_cfg.hnsw_m, ix_cfg.hnsw_ef_search, args.k
    if args.n < ix_cfg.ann_threshold:
        print(f"note: n={args.n:,} is below ann_threshold={ix_cfg.ann_threshold:,}, where the project serves exact search")
    mix = Mixture(n=args.n, dim=args.dim, seed=args.seed)
    queries = mix.sample(args.queries, stream=QUERIES)
    vectors, hnsw, build = hnsw_cached(mix, n=args.n, m=m, ef=ef, cache=args.cache_dir.expanduser())

    t0 = time.perf_counter()
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(vectors)
    build["flat_build_s"] = round(time.perf_counter() - t0, 1)
    print(f"IndexFlatIP built in {build['flat_build_s']} s; faiss threads: {faiss.omp_get_max_threads()}\n")

    def search(index: faiss.Index) -> Callable[[np.ndarray], np.ndarray]:
        return lambda q: index.search(q[None], k)[1][0]

    truth, ms = per_query(search(exact), queries)
    rows = [{"index": "exact (IndexFlatIP)", "efSearch": "", f"recall@{k}": 1.0, **latency(ms)}]
    for e in sorted({*args.ef_sweep, ef}):
        hnsw.hnsw.efSearch = e
        found, ms = per_query(search(hnsw), queries)
        name = f"HNSW M={m}" + (" (configured)" if e == ef else "")
        rows.append({"index": name, "efSearch": e, f"recall@{k}": round(overlap(found, truth, k), 4), **latency(ms)})
    for r in rows:
        r["x_faster_than_exact"] = round(rows[0]["p50_ms"] / r["p50_ms"], 1)

    cos = exact.search(queries, k)[0]
    full = {"data": f"synthetic, n={args.n:,}", **shape_stats(cos, vectors, args.seed), "hnsw_recall": rows_at(rows, ef)[f"recall@{k}"]}
    del exact, hnsw
    realism = [*realism_at_5k(args, m=m, ef=ef), full]
    return {"rows": rows, "build": build, "realism": realism, "hnsw_m": m, "ef_search": ef, "k": k}


def rows_at(rows: list[dict[str, Any]], ef: int) -> dict[str, Any]:
    return next(r for r in rows if r["efSearch"] == ef)


def realism_at_5k(args: argparse.Namespace, *, m: int, ef: int) -> list[dict[str, Any]]:
    """Real msmarco-5k MiniLM vectors beside synthetic ones at the same size (200 held out as queries)."""
    sets = {}
    real = real_vectors(args.dim)
    if real is not None:
        sets["msmarco-5k, MiniLM (real)"] = (real[200:], real[:200])
    else:
        print("realism: no cached msmarco-5k index found; run load_tests/bench_retrieval.py once to compare")
    mix = Mixture(n=5000, dim=args.dim, seed=args.seed)
    sets["synthetic, n=5,000"] = (mix.sample(4800, stream=DB), mix.sample(200, stream=QUERIES))
    out = []
    for name, (db, q) in sets.items():
        cos, truth = neighbours(db, q, args.k)
        hnsw = build_faiss(db, ann_threshold=0, hnsw_m=m)
        hnsw.hnsw.efSearch = ef
        recall = overlap(list(hnsw.search(q, args.k)[1]), list(truth), args.k)
        out.append({"data": name, **shape_stats(cos, db, args.seed), "hnsw_recall": round(recall, 4)})
    return out


def real_vectors(dim: int) -> np.ndarray | None:
    """msmarco-5k's vectors from the newest index that bench_retrieval.py cached, if any."""
    from indexing.store import IndexLoadError, current_path, read_manifest

    roots = sorted(Path("~/.cache/ragraph/eval").expanduser().glob("*/current"), key=lambda p: -p.stat().st_mtime)
    for cur in roots:
        try:
            folder = current_path(cur.parent)
            m = read_manifest(folder)
        except IndexLoadError:
            continue
        if Path(m.get("source", "")).name == "msmarco-5k" and m.get("dim") == dim:
            print(f"realism: real vectors from {folder} ({m['model']['name']}, {m['model'].get('dtype')})")
            return np.load(folder / "vectors.npy").astype(np.float32)
    return None


# ---------------------------------------------------------------------------------------------
# BM25: bm25s against rank-bm25


def synthetic_passages(n: int, seed: int) -> list[str]:
    """``n`` chunks of words drawn independently from msmarco-5k's word frequencies (Zipfian), each
    as long as a random msmarco-5k passage: real term statistics, no duplicated passages."""
    counts: Counter[str] = Counter()
    lengths = []
    with (SHARED_DATA / "msmarco-5k" / "corpus.jsonl").open() as f:
        for line in f:
            d = json.loads(line)
            words = re.findall(r"\w+", f"{d.get('title', '')} {d['text']}".lower())
            counts.update(words)
            lengths.append(len(words))
    vocab = np.array(list(counts))
    p = np.array(list(counts.values()), dtype=np.float64)
    rng = np.random.default_rng([seed, 3])
    lens = rng.choice(lengths, n)
    words = vocab[rng.choice(len(vocab), int(lens.sum()), p=p / p.sum())].tolist()
    cuts = np.concatenate([[0], np.cumsum(lens)])
    return [" ".join(words[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def bench_bm25(args: argparse.Namespace, r_cfg: Any) -> dict[str, Any]:
    from indexing.lexical import BM25Index, RankBM25Reference

    texts = synthetic_passages(args.bm25_docs, args.seed)
    with (SHARED_DATA / "msmarco-5k" / "queries.jsonl").open() as f:
        queries = [json.loads(line)["text"] for line in f]
    t0 = time.perf_counter()
    bm25 = BM25Index.build(texts, k1=r_cfg.bm25_k1, b=r_cfg.bm25_b, stemmer=r_cfg.stemmer)
    builds = [time.perf_counter() - t0]
    t0 = time.perf_counter()
    ref = RankBM25Reference(texts, tokenizer=bm25.tokenize)  # identical tokens
    builds.append(time.perf_counter() - t0)
    del texts
    tokens = bm25.tokenize(queries)

    rows, tops = [], []
    for name, eng, build_s in (("bm25s (BM25Index, serving)", bm25, builds[0]), ("rank-bm25 (BM25Okapi, reference)", ref, builds[1])):
        top, ms = per_query(lambda t, e=eng: e.search(t, 100)[0], tokens)
        tops.append(top)
        rows.append({"engine": name, "build_s": round(build_s, 1), **latency(ms)})
    for r in rows:
        r["x_slower_than_bm25s"] = round(r["p50_ms"] / rows[0]["p50_ms"], 1)
    return {"rows": rows, "docs": args.bm25_docs, "queries": len(queries), "top10_overlap": round(overlap(tops[1], tops[0], 10), 4)}


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="vectors in the dense index")
    ap.add_argument("--queries", type=int, default=200, help="dense queries, searched one at a time")
    ap.add_argument("--dim", type=int, default=384, help="vector size (all-MiniLM-L6-v2: 384)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=100, help="neighbours per query; recall@k against exact")
    ap.add_argument("--ef-sweep", type=int, nargs="+", default=[100, 128, 256, 384, 512, 1024], help="efSearch values (faiss uses max(efSearch, k))")
    ap.add_argument("--bm25-docs", type=int, default=200_000, help="chunks in the synthetic BM25 corpus")
    ap.add_argument("--only", choices=["dense", "bm25"], default=None)
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "gpu.yaml", help="hnsw_m, hnsw_ef_search, BM25 settings")
    ap.add_argument("--cache-dir", type=Path, default=Path("~/.cache/ragraph/bench"))
    ap.add_argument("--out", type=Path, default=REPO / "load_tests" / "results" / "ann.json")
    args = ap.parse_args()
    cfg = load_config(args.config)
    payload: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "generator": GENERATOR}
    targets = []

    if args.only != "bm25":
        dense = bench_dense(args, cfg.indexing)
        b = dense["build"]
        print(f"\nFAISS, {args.n:,} x {args.dim} synthetic vectors, {args.queries} queries one at a time, k={args.k}\n")
        print_table(dense["rows"], ["index", "efSearch", f"recall@{args.k}", "p50_ms", "p95_ms", "x_faster_than_exact"])
        cached = "cached, " if b["cache_used"] else ""
        print(f"\nbuild: HNSW {b['hnsw_build_s']:.0f} s ({cached}built {b['built']}), IndexFlatIP {b['flat_build_s']} s")
        print("\nRealism: neighbour cosines, local intrinsic dimension (lid) and HNSW recall, real against synthetic\n")
        print_table(dense["realism"], list(dense["realism"][0]))
        at = rows_at(dense["rows"], dense["ef_search"])
        targets += [
            {"target": f"HNSW recall@{args.k} vs exact (efSearch {dense['ef_search']})", "goal": ">= 0.95", "measured": at[f"recall@{args.k}"], "met": at[f"recall@{args.k}"] >= 0.95},
            {"target": f"HNSW p50 latency (efSearch {dense['ef_search']})", "goal": "<= 20 ms", "measured": at["p50_ms"], "met": at["p50_ms"] <= 20},
        ]
        payload["dense"] = dense

    if args.only != "dense":
        bm = bench_bm25(args, cfg.retriever)
        print(f"\nBM25, {bm['docs']:,} synthetic chunks, {bm['queries']} msmarco queries one at a time, identical stemmed tokens\n")
        print_table(bm["rows"], ["engine", "build_s", "p50_ms", "p95_ms", "x_slower_than_bm25s"])
        print(f"\ntop-10 overlap, rank-bm25 against bm25s: {bm['top10_overlap']:.3f}")
        ratio = bm["rows"][1]["x_slower_than_bm25s"]
        targets.append({"target": "bm25s speed-up over rank-bm25 (p50)", "goal": ">= 20x", "measured": ratio, "met": ratio >= 20})
        payload["bm25"] = bm

    print("\nTargets (issue #5)\n")
    for t in targets:
        t["met"] = "yes" if t["met"] else "NO"
    print_table(targets, ["target", "goal", "measured", "met"])
    write_json(args.out, payload | {"targets": targets})


if __name__ == "__main__":
    main()
