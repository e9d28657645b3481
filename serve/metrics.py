"""Prometheus metrics of the pipeline, served at ``GET /metrics`` by the ingress.

The ingress times every stage call and labels it with the replica that served it (each stage
returns its replica id), so one scrape shows per-stage latency, per-replica request counts, errors
and how many calls are waiting on each stage (``rag_stage_inflight``: the ingress's view of the
queue). Each replica's own Ray Serve series (queue length, replica health) are on Ray's metrics
port as usual.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "rag_http_requests_total", "HTTP requests by endpoint and status", ["method", "endpoint", "status"], registry=r
        )
        self.http_duration = Histogram(
            "rag_http_request_duration_seconds", "HTTP request latency (to the last byte)", ["endpoint"],
            buckets=LATENCY, registry=r,
        )
        self.retrieval_duration = Histogram(
            "rag_retrieval_duration_seconds", "Retrieval latency (embed + BM25 + FAISS + fusion)", buckets=LATENCY, registry=r
        )
        self.generation_duration = Histogram(
            "rag_generation_duration_seconds", "Generation latency (first to last token)", buckets=LATENCY, registry=r
        )
        self.ttft = Histogram(
            "rag_time_to_first_token_seconds", "Generator time to first token", buckets=LATENCY, registry=r
        )
        self.generation_tokens = Counter(
            "rag_generation_tokens_total", "Tokens through the generator", ["kind"], registry=r
        )
        self.errors = Counter(
            "rag_pipeline_errors_total", "Stage failures seen by the ingress", ["stage", "kind"], registry=r
        )
        self.degraded = Counter("rag_degraded_responses_total", "Answers served without a stage", ["stage"], registry=r)
        self.stage_duration = Histogram(
            "rag_stage_duration_seconds", "Latency of each stage call", ["stage"], buckets=LATENCY, registry=r
        )
        self.stage_requests = Counter(
            "rag_stage_requests_total", "Stage calls by the replica that served them", ["stage", "replica"], registry=r
        )
        self.stage_inflight = Gauge(
            "rag_stage_inflight", "Calls sent to a stage and not yet answered (queue depth)", ["stage"], registry=r
        )
        self.retries = Counter("rag_stage_retries_total", "Stage calls tried again after a failure", ["stage"], registry=r)
        self.breaker_state = Gauge(
            "rag_generator_breaker_state", "Circuit breaker around the generator: 0 closed, 1 half-open, 2 open", registry=r
        )
        self.cache_requests = Counter(
            "rag_cache_requests_total", "Response cache lookups: hit, miss, skip (not cacheable) or error", ["result"],
            registry=r,
        )
        self.admission = Counter(
            "rag_admission_total", "Requests refused by the governor (code: missing_api_key, invalid_api_key, "
            "insufficient_scope, rate_limit_exceeded, insufficient_quota, request_too_large)", ["code"], registry=r,
        )
        self.usage_lost = Counter("rag_usage_records_lost_total", "Usage records the governor never took", registry=r)
        self.index_version = Gauge("rag_index_version_info", "Index version that answered last", ["version"], registry=r)
        self._version: str | None = None

    def saw_version(self, version: str | None) -> None:
        if version and version != self._version:
            if self._version is not None:
                self.index_version.remove(self._version)
            self.index_version.labels(version).set(1)
            self._version = version

    def render(self) -> bytes:
        return generate_latest(self.registry)


METRICS = Metrics()  # one registry per ingress process
