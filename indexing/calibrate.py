"""Label-free, per-corpus calibration of the hybrid retriever's fusion.

How much to trust the dense side depends on the corpus: an English embedder carries real signal on
English passages and almost none on Arabic ones, where BM25 still works. No judged query is needed
to tell these apart. An inverse-cloze test asks both retrievers, and their fusion at each weight,
the same questions on the corpus itself: a sentence taken out of a sampled chunk is the query, and
the rest of that chunk (the sentence removed, so that BM25 cannot win on the copied words alone) is
the one right answer among all chunks. The mean reciprocal rank of the right chunk says how well
each side, and each mix, links a statement to its context in this corpus, with this embedder and
this tokenizer.

:func:`calibrate` returns those accuracies (stored in the index manifest as ``calibration``);
:func:`choose` turns them into a fusion weight and a feedback decision. The fusion primitive
:func:`normalize` lives here so that the calibration and the retriever mix scores the same way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

VERSION = 1
WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))
NORMALIZATIONS = ("max", "z")
_SENTENCE = re.compile(r"(?<=[.!?؟。])\s+|\n+")
_WORD = re.compile(r"(?u)\w\w+")


def normalize(x: np.ndarray, how: str) -> np.ndarray:
    """One retriever's candidate scores on a common scale: ``max`` divides by the largest, ``z``
    subtracts the mean and divides by the standard deviation (over the candidates)."""
    if not len(x):
        return x
    if how == "max":
        m = float(x.max())
        return x / m if m > 0 else x
    if how == "z":
        sd = float(x.std())
        return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)
    raise ValueError(f"normalization must be one of {list(NORMALIZATIONS)}, got {how!r}")


def top(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` highest scores, best first, without sorting the whole array."""
    n = min(n, len(scores))
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    part = np.argpartition(-scores, n - 1)[:n] if n < len(scores) else np.arange(len(scores))
    return part[np.argsort(-scores[part], kind="stable")]


def pseudo_queries(
    texts: Sequence[str], heads: Sequence[str], *, samples: int, seed: int = 0, min_words: int = 4
) -> list[tuple[int, str, str]]:
    """Up to ``samples`` (row, query sentence, context) triples: the sentence is taken out of
    ``texts[row]``; the context is ``heads[row]`` (title and heading path) plus the rest of the text.
    Rows with a single sentence, or sentences under ``min_words`` words, are skipped."""
    rng = np.random.default_rng(seed)
    out: list[tuple[int, str, str]] = []
    for row in rng.permutation(len(texts)):
        sents = [s.strip() for s in _SENTENCE.split(texts[row]) if s.strip()]
        if len(sents) < 2:
            continue
        words = [len(_WORD.findall(s)) for s in sents]
        ok = [i for i, n in enumerate(words) if n >= min_words and sum(words) - n >= min_words]
        if not ok:
            continue
        i = ok[int(rng.integers(len(ok)))]
        context = " ".join(s for j, s in enumerate(sents) if j != i)
        out.append((int(row), sents[i], "\n".join(p for p in (heads[row], context) if p)))
        if len(out) == samples:
            break
    return out


def calibrate(
    *,
    texts: Sequence[str],
    heads: Sequence[str],
    embed_texts: Sequence[str],
    vectors: np.ndarray,
    embed: Callable[[list[str]], np.ndarray],
    build_bm25: Callable[[list[str]], object],
    samples: int = 200,
    candidates: int = 100,
    seed: int = 0,
) -> dict:
    """Inverse-cloze MRR of BM25, dense, and their fusion at each weight in :data:`WEIGHTS` under
    each normalisation.

    ``texts``/``heads``/``embed_texts``: per chunk, its body, its title + heading path, and what was
    indexed; ``vectors``: the chunk embeddings; ``embed``: texts -> normalised vectors;
    ``build_bm25``: texts -> an object with ``tokenize`` and ``scores`` (:class:`indexing.lexical.BM25Index`).
    """
    triples = pseudo_queries(texts, heads, samples=samples, seed=seed)
    out: dict = {"version": VERSION, "queries": len(triples), "candidates": candidates, "weights": list(WEIGHTS)}
    if len(triples) < 10:
        return out
    rows = [r for r, _, _ in triples]
    q_vec = np.asarray(embed([q for _, q, _ in triples]), dtype=np.float32)
    c_vec = np.asarray(embed([c for _, _, c in triples]), dtype=np.float32)
    vecs = np.asarray(vectors, dtype=np.float32).copy()
    vecs[rows] = c_vec
    corpus = list(embed_texts)
    for r, _, c in triples:
        corpus[r] = c
    bm25 = build_bm25(corpus)
    rr = {how: np.zeros((len(triples), len(WEIGHTS))) for how in NORMALIZATIONS}
    for k, ((r, q, _), qv) in enumerate(zip(triples, q_vec, strict=True)):
        d = vecs @ qv
        b = np.asarray(bm25.scores(bm25.tokenize([q])[0]), dtype=np.float32)  # type: ignore[attr-defined]
        b_top = top(b, candidates)
        cand = np.union1d(top(d, candidates), b_top[b[b_top] > 0])
        if r not in cand:
            continue
        at = int(np.flatnonzero(cand == r)[0])
        for how in NORMALIZATIONS:
            nd, nb = normalize(d[cand], how), normalize(b[cand], how)
            for j, w in enumerate(WEIGHTS):
                f = w * nd + (1 - w) * nb
                rr[how][k, j] = 1.0 / (1 + int((f > f[at]).sum()))
    out["fused_mrr"] = {how: [round(float(x), 4) for x in rr[how].mean(axis=0)] for how in NORMALIZATIONS}
    out["bm25_mrr"] = out["fused_mrr"]["max"][0]
    out["dense_mrr"] = out["fused_mrr"]["max"][-1]
    return out


def choose(calibration: dict | None, normalization: str) -> tuple[float, float] | None:
    """(dense weight, balance) from a calibration, or None when there is none to go by.

    The weight maximises the inverse-cloze MRR of the fusion, smoothed over neighbouring weights
    (100-200 pseudo-queries are noisy); ties go to the middle. The balance, weaker side's MRR over
    the stronger's, in [0, 1], says whether both retrievers carry signal on this corpus."""
    if not calibration or "fused_mrr" not in calibration or calibration.get("version") != VERSION:
        return None
    weights = calibration["weights"]
    curve = np.asarray(calibration["fused_mrr"][normalization], dtype=float)
    smooth = np.convolve(np.pad(curve, 1, mode="edge"), np.ones(3) / 3, mode="valid")
    best = np.flatnonzero(smooth >= smooth.max() - 1e-9)
    w = float(weights[int(best[len(best) // 2])])
    lo, hi = sorted((calibration["bm25_mrr"], calibration["dense_mrr"]))
    return w, (lo / hi if hi > 0 else 0.0)
