"""The stages of the serving graph, each a plain class that works without Ray (router, hybrid
retriever, reranker, the generator seam and its vLLM engine, the governor with API keys,
admission, usage, the response cache, conversations and ingest jobs), the guard that makes an
engine's processes die with their replica, and the one adapter to ``ray.serve.llm``'s internals."""
