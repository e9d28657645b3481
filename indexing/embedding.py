"""Embedding chunks: in-process, or in batch with Ray Data (``map_batches`` over an actor pool).

Texts are sorted by length before batching so each batch pads little, then the vectors are put
back in input order. Ray Data shows its own progress bars; the in-process path logs progress.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from common.local_ray import init_ray, running_cluster

Log = Callable[[str], None]


class Embedder:
    """A sentence-transformers bi-encoder. Cheap to construct; ``warm_up()`` loads the model."""

    def __init__(
        self, *, model: str, device: str = "cpu", batch_size: int = 32, normalize: bool = True, dtype: str = "float32"
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float16', got {dtype!r}")
        self.model, self.device, self.batch_size, self.normalize, self.dtype = model, device, batch_size, normalize, dtype
        self._st = None

    def warm_up(self) -> None:
        if self._st is None:
            import torch
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(self.model, device=self.device)
            self._st = st.to(getattr(torch, self.dtype)) if self.dtype != "float32" else st

    @property
    def dim(self) -> int:
        self.warm_up()
        return int(self._st.get_embedding_dimension())

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.warm_up()
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        v = self._st.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=self.normalize, show_progress_bar=False,
            convert_to_tensor=True,
        )
        return v.float().cpu().numpy()


def embed_local(texts: Sequence[str], embedder: Embedder, *, log: Log = print, every: int = 2048) -> np.ndarray:
    """One process; logs progress every ``every`` texts."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), embedder.dim), dtype=np.float32)
    t0 = time.perf_counter()
    for s in range(0, len(texts), every):
        rows = order[s : s + every]
        out[rows] = embedder.embed([texts[i] for i in rows])
        done = min(s + every, len(texts))
        log(f"  embedded {done}/{len(texts)} chunks ({done / (time.perf_counter() - t0):.0f}/s)")
    return out


class _EmbedActor:
    """One Ray Data actor: loads the model once, then embeds batches."""

    def __init__(self, model: str, device: str, batch_size: int, normalize: bool, dtype: str, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self._e = Embedder(model=model, device=device, batch_size=batch_size, normalize=normalize, dtype=dtype)
        self._e.warm_up()

        import ray

        self._node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vectors = self._e.embed([str(t) for t in batch["text"]])
        return {"row": batch["row"], "vector": list(vectors), "node": [self._node] * len(vectors)}


def ensure_ray(address: str | None = None) -> None:
    import ray

    if not ray.is_initialized():
        # RAY_AUTH_MODE as the user set it (a local Ray gets token auth by default; a cluster's
        # token comes from RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH, or RAY_AUTH_MODE is inherited in a job).
        # The cluster this machine runs is joined; without one, a local Ray of its own, on loopback.
        init_ray(address or os.environ.get("RAY_ADDRESS") or running_cluster(), include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True)


def embed_with_ray(
    texts: Sequence[str],
    embedder: Embedder,
    *,
    concurrency: int,
    threads_per_actor: int,
    gpus_per_actor: float = 1,
    nodes: dict[str, int] | None = None,
    log: Log = print,
) -> np.ndarray:
    """Embed with Ray Data: an actor pool of ``concurrency`` embedders; the batches (``row``,
    ``vector``, ``node``) stream back to the driver through Ray's object store, which works across
    nodes (a folder of shards would be each node's own local disk), and are put back in input order.

    Ray Data places the actors with its default SPREAD strategy, so on a cluster they land on
    several nodes; ``nodes`` (when given) is filled with the chunks each node embedded, by node id,
    and the log names them. With ``embedder.device == 'cuda'`` each actor takes ``gpus_per_actor``
    of a GPU (fractions share one)."""
    import ray

    ensure_ray()
    order = np.argsort([len(t) for t in texts], kind="stable")
    items = [{"row": int(i), "text": texts[i]} for i in order]
    n_blocks = max(concurrency * 4, len(items) // (embedder.batch_size * 8) or 1)
    ds = ray.data.from_items(items, override_num_blocks=min(n_blocks, len(items)))
    ds = ds.map_batches(
        _EmbedActor,
        fn_constructor_kwargs={
            "model": embedder.model,
            "device": embedder.device,
            "batch_size": embedder.batch_size,
            "normalize": embedder.normalize,
            "dtype": embedder.dtype,
            "threads": threads_per_actor,
        },
        batch_size=embedder.batch_size * 4,
        batch_format="numpy",
        concurrency=concurrency,
        num_cpus=threads_per_actor,
        num_gpus=gpus_per_actor if embedder.device == "cuda" else 0,
    )
    log(f"  embedding {len(texts)} chunks with Ray Data ({concurrency} actors x {threads_per_actor} threads)")
    out: np.ndarray | None = None
    seen = np.zeros(len(texts), dtype=bool)
    per_node: dict[str, int] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        rows, vecs = batch["row"].astype(np.int64), np.stack(batch["vector"]).astype(np.float32)
        if out is None:
            out = np.zeros((len(texts), vecs.shape[1]), dtype=np.float32)
        out[rows] = vecs
        seen[rows] = True
        for node, count in zip(*np.unique(batch["node"], return_counts=True)):
            per_node[str(node)] = per_node.get(str(node), 0) + int(count)
    if out is None or not seen.all() or sum(per_node.values()) != len(texts):
        raise RuntimeError(
            f"Ray Data returned {sum(per_node.values())} vectors for {len(texts)} chunks ({int((~seen).sum())} missing)"
        )
    log(f"  embedded on {len(per_node)} node(s): " + ", ".join(f"{n[:8]}: {c} chunks" for n, c in sorted(per_node.items())))
    if nodes is not None:  # added to: a caller may embed in several calls
        for node, count in per_node.items():
            nodes[node] = nodes.get(node, 0) + count
    return out
