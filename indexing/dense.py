"""The FAISS vector index: exact inner product for small corpora, HNSW above a size threshold,
on GPU when configured (faiss-gpu)."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

HAS_GPU = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def build_faiss(vectors: np.ndarray, *, ann_threshold: int, hnsw_m: int) -> faiss.Index:
    """IndexFlatIP below ``ann_threshold`` vectors, IndexHNSWFlat (inner product) from there on."""
    n, d = vectors.shape
    if n >= ann_threshold:
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = max(40, 2 * hnsw_m)
    else:
        index = faiss.IndexFlatIP(d)
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def index_kind(index: faiss.Index) -> str:
    return "hnsw" if isinstance(index, faiss.IndexHNSW) else "flat"


def save_faiss(index: faiss.Index, path: Path) -> None:
    faiss.write_index(index, str(path))


def load_faiss(path: Path, *, ef_search: int, device: str = "cpu") -> faiss.Index:
    index = faiss.read_index(str(path))
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = ef_search
    if device == "cuda":
        if not HAS_GPU:
            raise ImportError(
                "indexing.faiss_device is 'cuda' but this faiss has no GPU support or sees no GPU; "
                "install the gpu extra (pip install -e '.[gpu]') on a GPU node, or set faiss_device: cpu"
            )
        if isinstance(index, faiss.IndexFlat):
            index = faiss.index_cpu_to_all_gpus(index)  # HNSW has no GPU version; it stays on CPU
    return index
