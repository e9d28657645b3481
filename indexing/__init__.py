"""Chunking, Ray Data embedding, FAISS/BM25 index build, index versions, evaluation (issue #3)."""
