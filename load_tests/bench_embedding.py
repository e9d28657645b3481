"""CPU embedding throughput, side by side in one run, on the same passages:

- plain: one process, ``SentenceTransformer.encode`` with default settings (the baseline);
- ray-data: ragraph's Ray Data actor pool (``map_batches``), length-sorted batches;
- int8: the same encoder with torch dynamic int8 quantisation of its Linear layers;
- bf16: the encoder cast to bfloat16.

Quality is checked against plain: mean cosine of the vectors, and overlap of each query's top 10
over these passages.

    python load_tests/bench_embedding.py [--n 2000] [--out load_tests/results/embedding.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _common  # noqa: F401
import numpy as np
from _common import SHARED_DATA, print_table, write_json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--dataset", type=Path, default=SHARED_DATA / "msmarco-5k")
    ap.add_argument("--out", type=Path, default=Path("load_tests/results/embedding.json"))
    ap.add_argument("--variants", default="plain,ray-data,ray-data-1x2,ray-data-bf16,ray-data-bf16-1x2,int8,bf16")
    args = ap.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    from indexing.embedding import Embedder, embed_with_ray, ensure_ray
    from common.config import load_config

    cfg = load_config()
    model = cfg.models.location("embedder")
    with (args.dataset / "corpus.jsonl").open() as f:
        texts = [(lambda d: (d.get("title", "") + " " + d["text"]).strip())(json.loads(next(f))) for _ in range(args.n)]
    queries = [json.loads(l)["text"] for l in (args.dataset / "queries.jsonl").open()]

    results, vectors = [], {}

    def record(name: str, seconds: float, v: np.ndarray, note: str = "") -> None:
        vectors[name] = v
        results.append({"variant": name, "docs_per_s": len(texts) / seconds, "seconds": seconds, "note": note})

    st = SentenceTransformer(model, device="cpu")
    qv = st.encode(queries, normalize_embeddings=True)
    variants = args.variants.split(",")
    if "plain" in variants or True:  # the baseline always runs
        st.encode(texts[:64])  # warm-up
        t = time.perf_counter()
        v = st.encode(texts, normalize_embeddings=True)
        record("plain", time.perf_counter() - t, v, "SentenceTransformer.encode, defaults")
    for name, dtype, actors, threads in [
        ("ray-data", "float32", 2, 1), ("ray-data-1x2", "float32", 1, 2), ("ray-data-bf16", "bfloat16", 2, 1),
        ("ray-data-bf16-1x2", "bfloat16", 1, 2),
    ]:
        if name not in variants:
            continue
        ensure_ray()
        e = Embedder(model=model, batch_size=cfg.embedder.batch_size, dtype=dtype)
        t = time.perf_counter()
        v = embed_with_ray(texts, e, concurrency=actors, threads_per_actor=threads, log=lambda m: None)
        record(name, time.perf_counter() - t, v, f"{dtype}, {actors} actors x {threads} threads, incl. actor start")
    if "int8" in variants:
        q = SentenceTransformer(model, device="cpu")
        q[0].auto_model = torch.ao.quantization.quantize_dynamic(q[0].auto_model, {torch.nn.Linear}, dtype=torch.qint8)
        q.encode(texts[:64])
        t = time.perf_counter()
        v = q.encode(texts, normalize_embeddings=True)
        record("int8", time.perf_counter() - t, v, "torch dynamic quantisation of Linear layers")
    if "bf16" in variants:
        b = SentenceTransformer(model, device="cpu").to(torch.bfloat16)
        b.encode(texts[:64])
        t = time.perf_counter()
        v = np.asarray(b.encode(texts, normalize_embeddings=True, convert_to_numpy=False, convert_to_tensor=True).float())
        record("bf16", time.perf_counter() - t, v, "weights and activations in bfloat16")

    base = vectors["plain"]
    top_base = np.argsort(-(qv @ base.T), axis=1)[:, :10]
    for r in results:
        v = vectors[r["variant"]]
        r["x_plain"] = r["docs_per_s"] / results[0]["docs_per_s"]
        r["mean_cos_to_plain"] = float(np.mean(np.sum(v * base, axis=1)))
        top = np.argsort(-(qv @ v.T), axis=1)[:, :10]
        r["top10_overlap"] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, top_base, strict=True)]))
    print(f"\n{len(texts)} passages from {args.dataset.name}\n")
    print_table(results, ["variant", "docs_per_s", "x_plain", "mean_cos_to_plain", "top10_overlap", "note"])
    write_json(args.out, {"passages": len(texts), "results": results})


if __name__ == "__main__":
    main()
