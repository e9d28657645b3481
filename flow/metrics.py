"""Prometheus metrics of the pipeline, served at ``GET /metrics`` by the ingress.

The ingress times every stage call and labels it with the replica that served it (each stage
returns its replica id), so one scrape shows per-stage latency, per-replica request counts, errors
and how many calls are waiting on each stage (``rag_stage_inflight``: the ingress's view of the
queue).

Several ingress replicas: each writes its series the moment it counts them to files in a folder
shared by the replicas on its node (prometheus_client's multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``,
which :func:`serve.graph.build_app` gives the ingress deployment), and ``GET /metrics`` sums every
replica's files, whichever replica answers the scrape: exact, current, and never going down (a
replica that died keeps its counts). On the embedded default, one node, that is the whole service.
Every series is also sent to Ray's metrics agent (``ray.util.metrics``), which each node exports
beside Serve's and vLLM's series as ``ray_rag_*``, one series per replica (``WorkerId``): what
Prometheus scrapes on a cluster (docs/operations.md).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger("ray.serve")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
if os.environ.get(MULTIPROC_ENV):  # prometheus_client writes there from the first metric on
    os.makedirs(os.environ[MULTIPROC_ENV], exist_ok=True)

MAX_GAUGES = {"rag_generator_breaker_state", "rag_index_version_info", "rag_index_published_info",
              "rag_key_quota_used_ratio"}  # states: the worst replica, not a sum


class Family:
    """One metric: a prometheus_client metric in this process, mirrored to a Ray application metric
    once :meth:`Metrics.export_to_ray` is called (in a Serve replica). Same calls as
    prometheus_client: ``labels(...).inc()``, ``.observe()``, ``.set()``, ``.dec()``, ``.remove()``."""

    def __init__(self, metric: Any, kind: str, name: str, doc: str, labels: tuple[str, ...] = (),
                 buckets: tuple[float, ...] = ()) -> None:
        self.metric, self.kind, self.name, self.doc = metric, kind, name, doc
        self.labelnames, self.buckets = labels, buckets
        self.ray: Any = None
        self._gauges: dict[tuple[str, ...], float] = defaultdict(float)

    def to_ray(self) -> None:
        from ray.util import metrics as rm

        if self.kind == "counter":
            self.ray = rm.Counter(self.name, self.doc, tag_keys=self.labelnames)
        elif self.kind == "gauge":
            self.ray = rm.Gauge(self.name, self.doc, tag_keys=self.labelnames)
            # a gauge set before the export began (the breaker's 0 at start-up) reaches Ray's agent too
            for family in self.metric.collect():
                for sample in family.samples:
                    self._gauges[tuple(sample.labels.get(k, "") for k in self.labelnames)] = sample.value
            self.push_gauges()
        else:
            self.ray = rm.Histogram(self.name, self.doc, boundaries=list(self.buckets), tag_keys=self.labelnames)

    def labels(self, *values: Any) -> _Child:
        return _Child(self, tuple(str(v) for v in values))

    def inc(self, n: float = 1) -> None:
        _Child(self, ()).inc(n)

    def dec(self, n: float = 1) -> None:
        _Child(self, ()).dec(n)

    def set(self, v: float) -> None:
        _Child(self, ()).set(v)

    def observe(self, v: float) -> None:
        _Child(self, ()).observe(v)

    def __getattr__(self, name: str) -> Any:  # the rest of prometheus_client's API (collect, _value, ...)
        return getattr(self.metric, name)

    def remove(self, *values: Any) -> None:
        key = tuple(str(v) for v in values)
        self.metric.remove(*key)
        if self.ray is not None and self.kind == "gauge":
            self._gauges.pop(key, None)  # no longer set again by the refresh
            self.ray.set(0, tags=dict(zip(self.labelnames, key, strict=True)))

    def push_gauges(self) -> int:
        """Set this gauge's last values in Ray's agent again; returns how many series were set."""
        series = list(self._gauges.items())
        for key, value in series:
            self.ray.set(value, tags=dict(zip(self.labelnames, key, strict=True)) or None)
        return len(series)


class _Child:
    __slots__ = ("fam", "key", "prom")

    def __init__(self, fam: Family, key: tuple[str, ...]) -> None:
        self.fam, self.key = fam, key
        self.prom = fam.metric.labels(*key) if key else fam.metric

    def __getattr__(self, name: str) -> Any:  # the rest of prometheus_client's API (_value, ...)
        return getattr(self.prom, name)

    def _tags(self) -> dict[str, str] | None:
        return dict(zip(self.fam.labelnames, self.key, strict=True)) if self.key else None

    def inc(self, n: float = 1) -> None:
        self.prom.inc(n)
        if self.fam.ray is not None:
            if self.fam.kind == "counter":
                self.fam.ray.inc(n, tags=self._tags())
            else:
                self._gauge(self.fam._gauges[self.key] + n)

    def dec(self, n: float = 1) -> None:
        self.prom.dec(n)
        if self.fam.ray is not None:
            self._gauge(self.fam._gauges[self.key] - n)

    def set(self, v: float) -> None:
        self.prom.set(v)
        if self.fam.ray is not None:
            self._gauge(v)

    def _gauge(self, v: float) -> None:
        self.fam._gauges[self.key] = v
        self.fam.ray.set(v, tags=self._tags())

    def observe(self, v: float) -> None:
        self.prom.observe(v)
        if self.fam.ray is not None:
            self.fam.ray.observe(v, tags=self._tags())

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


QUOTA_KEYS_KEPT = 10_000  # keys whose quota share rag_key_quota_used_ratio remembers


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.families: dict[str, Family] = {}
        self._ray = False
        self.http_requests = self._make(Counter, 
            "rag_http_requests_total", "HTTP requests by endpoint and status", ["method", "endpoint", "status"], registry=r
        )
        self.http_duration = self._make(Histogram, 
            "rag_http_request_duration_seconds", "HTTP request latency (to the last byte)", ["endpoint"],
            buckets=LATENCY, registry=r,
        )
        self.retrieval_duration = self._make(Histogram, 
            "rag_retrieval_duration_seconds", "Retrieval latency (embed + BM25 + FAISS + fusion)", buckets=LATENCY, registry=r
        )
        self.generation_duration = self._make(Histogram, 
            "rag_generation_duration_seconds", "Generation latency (first to last token)", buckets=LATENCY, registry=r
        )
        self.ttft = self._make(Histogram, 
            "rag_time_to_first_token_seconds", "Generator time to first token", buckets=LATENCY, registry=r
        )
        self.generation_tokens = self._make(Counter, 
            "rag_generation_tokens_total", "Tokens through the generator", ["kind"], registry=r
        )
        self.errors = self._make(Counter, 
            "rag_pipeline_errors_total", "Stage failures seen by the ingress", ["stage", "kind"], registry=r
        )
        self.degraded = self._make(Counter, "rag_degraded_responses_total", "Answers served without a stage", ["stage"], registry=r)
        self.stage_duration = self._make(Histogram, 
            "rag_stage_duration_seconds", "Latency of each stage call", ["stage"], buckets=LATENCY, registry=r
        )
        self.stage_requests = self._make(Counter, 
            "rag_stage_requests_total", "Stage calls by the replica that served them", ["stage", "replica"], registry=r
        )
        self.stage_inflight = self._make(Gauge, 
            "rag_stage_inflight", "Calls sent to a stage and not yet answered (queue depth)", ["stage"], registry=r
        )
        self.retries = self._make(Counter, "rag_stage_retries_total", "Stage calls tried again after a failure", ["stage"], registry=r)
        self.breaker_state = self._make(Gauge, 
            "rag_generator_breaker_state", "Circuit breaker around the generator: 0 closed, 1 half-open, 2 open", registry=r
        )
        self.cache_requests = self._make(Counter, 
            "rag_cache_requests_total", "Response cache lookups: hit, miss, skip (not cacheable) or error", ["result"],
            registry=r,
        )
        self.admission = self._make(Counter, 
            "rag_admission_total", "Requests refused by the governor (code: missing_api_key, invalid_api_key, "
            "insufficient_scope, rate_limit_exceeded, insufficient_quota, request_too_large)", ["code"], registry=r,
        )
        self.usage_lost = self._make(Counter, "rag_usage_records_lost_total", "Usage records the state database never took", registry=r)
        self.feedback = self._make(Counter, "rag_feedback_total", "Feedback given on answers (POST /v1/feedback)",
                                   ["score"], registry=r)  # score: up or down
        self.index_version = self._make(Gauge, "rag_index_version_info", "Index version that answered last", ["version"], registry=r)
        self._version: str | None = None
        self.index_published = self._make(Gauge,
            "rag_index_published_info", "Index version published in indexing.dir (its `current` pointer), read at each scrape",
            ["version"], registry=r,
        )
        self._published: str | None = None
        self.key_quota_used = self._make(Gauge,
            "rag_key_quota_used_ratio", "Highest share of its daily token quota that any key has used or held today "
            "(UTC), as of each key's last chat admission (keys with a daily quota only). No key id is a label: "
            "GET /v1/usage?all=true (admin) says which key", registry=r,
        )
        self._quota_seen: dict[str, tuple[int, float]] = {}  # key id -> (UTC day, share), the most recent keys

    def saw_version(self, version: str | None) -> None:
        if version and version != self._version:
            if self._version is not None:  # 0 first: a multiprocess file keeps a removed child's last value
                self.index_version.labels(self._version).set(0)
                self.index_version.remove(self._version)
            self.index_version.labels(version).set(1)
            self._version = version

    def saw_published(self, root: Any) -> None:
        """The version published in ``root`` (``indexing.dir``), for the alert on an index that is
        published but not yet answering (configs/monitoring/rules.yml)."""
        from pathlib import Path

        from indexing.store import current_name

        try:
            name = current_name(Path(root))
        except OSError:
            name = None
        if name != self._published:
            if self._published is not None:
                self.index_published.labels(self._published).set(0)
                self.index_published.remove(self._published)
            if name is not None:
                self.index_published.labels(name).set(1)
            self._published = name

    def saw_quota(self, key_id: str | None, headers: dict[str, str] | None, *, spent: bool = False) -> None:
        """A key's daily token quota as its admission left it: from the ``x-ratelimit-*-tokens``
        headers of an admitted chat, or 1.0 when the quota refused it (``spent``)."""
        if not key_id:
            return
        if spent:
            share = 1.0
        else:
            try:
                limit = int((headers or {})["x-ratelimit-limit-tokens"])
                left = int((headers or {})["x-ratelimit-remaining-tokens"])
            except (KeyError, ValueError):
                return
            if limit <= 0:
                return
            share = min(1.0, max(0.0, 1 - left / limit))
        day = int(time.time() // 86_400)
        seen = self._quota_seen
        seen.pop(key_id, None)
        seen[key_id] = (day, share)
        while len(seen) > QUOTA_KEYS_KEPT:  # the oldest first (insertion order)
            seen.pop(next(iter(seen)))
        self.key_quota_used.set(max((v for d, v in seen.values() if d == day), default=0.0))

    def _make(self, cls: type, name: str, doc: str, labels: list[str] | tuple[str, ...] = (), *,
              buckets: tuple[float, ...] = (), registry: CollectorRegistry) -> Family:
        kw: dict[str, Any] = {"buckets": buckets} if cls is Histogram else {}
        if cls is Gauge:  # how replicas' values add up in multiprocess mode
            kw["multiprocess_mode"] = "livemax" if name in MAX_GAUGES else "livesum"
        kind = {Counter: "counter", Gauge: "gauge", Histogram: "histogram"}[cls]
        fam = Family(cls(name, doc, list(labels), registry=registry, **kw), kind, name, doc, tuple(labels), buckets)
        self.families[name] = fam
        return fam

    def export_to_ray(self, *, refresh_s: float = 1.0) -> None:
        """Mirror every series to Ray's metrics agent from now on (call once, inside a Ray worker).

        Ray's agent exports a gauge only while it keeps being set (seen on Ray 2.60: the breaker's
        state and the index version, set once, never reached Prometheus, while the queue depth,
        set all the time, did), so a daemon thread sets every gauge's last values again every
        ``refresh_s`` seconds."""
        if self._ray:
            return
        for fam in self.families.values():
            fam.to_ray()
        self._ray = True
        if refresh_s > 0:
            threading.Thread(target=self._refresh_loop, args=(refresh_s,), name="ray-gauge-refresh", daemon=True).start()

    def refresh_ray_gauges(self) -> int:
        """Set every mirrored gauge's last values again; returns how many series were set."""
        return sum(fam.push_gauges() for fam in self.families.values() if fam.kind == "gauge" and fam.ray is not None)

    def _refresh_loop(self, every_s: float) -> None:
        while True:
            time.sleep(every_s)
            try:
                self.refresh_ray_gauges()
            except Exception as e:  # noqa: BLE001 - metrics must never take the replica down
                log.debug(f"gauge refresh failed: {e}")

    def render(self) -> bytes:
        """This process's series; with ``PROMETHEUS_MULTIPROC_DIR`` set, every ingress replica's on
        this node, summed."""
        folder = os.environ.get(MULTIPROC_ENV)
        if not folder:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=folder)
        text = generate_latest(registry).decode()
        # a family nobody has counted yet has no file: still name it, as a single process does
        missing = [f for f in self.families.values() if f"# TYPE {f.name} " not in text]
        text += "".join(f"# HELP {f.name} {f.doc}\n# TYPE {f.name} {f.kind}\n" for f in missing)
        return text.encode()


METRICS = Metrics()  # one registry per ingress process
