"""Index jobs driven by the config: what `ragraph index` and `ragraph eval` run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from indexing.embedding import Embedder, embed_local, embed_with_ray
from indexing.store import BuildReport, BuildSettings, build_index
from common.manifest import read_manifest

Log = Callable[[str], None]


def embedder_from_config(cfg) -> Embedder:
    e = cfg.embedder
    return Embedder(
        model=cfg.models.location("embedder"), device=e.device, batch_size=e.batch_size, normalize=e.normalize, dtype=e.dtype
    )


def model_checksum(model: str) -> str:
    """The checksum `ragraph models` recorded for a local model folder ('' for a hub id)."""
    manifest = read_manifest(Path(model))
    return manifest["checksum"] if manifest else ""


def settings_from_config(cfg) -> BuildSettings:
    model = cfg.models.location("embedder")
    ix, r = cfg.indexing, cfg.retriever
    return BuildSettings(
        model=model,
        model_checksum=model_checksum(model),
        embedder_dtype=cfg.embedder.dtype,
        chunk_size=ix.chunk_size,
        chunk_overlap=ix.chunk_overlap,
        bm25_k1=r.bm25_k1,
        bm25_b=r.bm25_b,
        stemmer=r.stemmer,
        ann_threshold=ix.ann_threshold,
        hnsw_m=ix.hnsw_m,
    )


def embed_fn(
    cfg, embedder: Embedder, *, log: Log = print, nodes: dict[str, int] | None = None
) -> Callable[[list[str]], tuple[np.ndarray, str]]:
    """``embed(texts) -> (vectors, engine)`` as the config says; with Ray, ``nodes`` gets the
    chunks each node embedded."""
    ix = cfg.indexing

    def embed(texts: list[str]) -> tuple[np.ndarray, str]:
        use_ray = ix.engine == "ray" or (ix.engine == "auto" and len(texts) >= ix.ray_min_chunks)
        if use_ray:
            v = embed_with_ray(
                texts, embedder, concurrency=ix.concurrency, threads_per_actor=ix.threads_per_actor,
                gpus_per_actor=ix.gpus_per_actor, nodes=nodes, log=log,
            )
            return v, "ray"
        return embed_local(texts, embedder, log=log), "local"

    return embed


def index_source(cfg, source: Path, root: Path, *, full: bool = False, log: Log = print) -> BuildReport:
    embedder = embedder_from_config(cfg)
    nodes: dict[str, int] = {}
    report = build_index(
        source, root, settings_from_config(cfg), embed=embed_fn(cfg, embedder, log=log, nodes=nodes),
        calibration_embed=embed_fn(cfg, embedder, log=log), full=full,  # embed_nodes counts chunks only
        keep_versions=cfg.indexing.keep_versions, log=log,
    )
    report.embed_nodes = nodes
    return report
