"""Documents in, searchable index versions out: reading and capping uploaded formats, chunking,
embedding (in process or with Ray Data), the FAISS and BM25 indexes, versioned publishing,
fusion calibration, reranker adaptation and retrieval evaluation."""
