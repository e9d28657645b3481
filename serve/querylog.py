"""The query log: one JSON line per request, written by the ingress when the request is over (a
stream at its last byte) to a rotating file of its own process (``observability.query_log``).

A line holds who asked (request id, key id), what was chosen (route, retrieval strategy, index
version), what came back (document ids, status, cached, degraded stages), how long each stage took,
the tokens, the engine's prefill and decode seconds and the cost (``governor.pricing``). The
question (and the router's search query, which is made from it) is left out unless
``include_question`` is on. A request that took ``slow_ms`` or longer also logs its whole trace:
``rag.metadata`` and every source with its scores.

Each ingress process writes ``<stem>.<host>.<pid><suffix>`` beside ``path``: replicas never share a
file (``RotatingFileHandler`` renames files when it rotates, which two processes cannot do safely
on one file). The files are created 0600: with questions on, they hold what users asked.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import UTC, datetime
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any

from deployments.limits import cost_of

_SCRUB = ("query",)  # question-derived text in rag.metadata.route and a search's body


def process_path(path: Path, pid: int | None = None, host: str | None = None) -> Path:
    """``path`` made this process's own: ``logs/queries.jsonl`` -> ``logs/queries.<host>.<pid>.jsonl``."""
    path = Path(path)
    host = (host or socket.gethostname() or "host").replace("/", "_")
    return path.with_name(f"{path.stem}.{host}.{os.getpid() if pid is None else pid}{path.suffix}")


class _PrivateRotatingFileHandler(RotatingFileHandler):
    """A rotating file whose every file (the first and each one after a rollover) is created 0600."""

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


class QueryLog:
    """Writes query-log lines (:meth:`line` builds one, :meth:`write` appends it). ``cfg``:
    :class:`common.config.QueryLogConfig`; ``pricing``: :class:`common.config.PricingConfig` (the
    cost field), or None to leave cost out."""

    def __init__(self, cfg, pricing=None, *, pid: int | None = None) -> None:
        self.cfg = cfg
        self.pricing = pricing
        self.path = process_path(cfg.path, pid)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.handler = _PrivateRotatingFileHandler(self.path, maxBytes=cfg.max_bytes, backupCount=cfg.backups,
                                                   encoding="utf-8", delay=True)
        self.handler.setFormatter(logging.Formatter("%(message)s"))
        self.logger = logging.Logger("ragraph.query_log")  # not registered: nothing else writes to it
        self.logger.propagate = False
        self.logger.addHandler(self.handler)

    @classmethod
    def from_config(cls, cfg) -> QueryLog | None:
        """The app config's query log, or None when it is off."""
        q = cfg.observability.query_log
        return cls(q, cfg.governor.pricing) if q.enabled else None

    def write(self, line: dict[str, Any]) -> None:
        self.logger.info(json.dumps(line, default=str, separators=(",", ":")))

    def close(self) -> None:
        self.logger.removeHandler(self.handler)
        self.handler.close()

    def line(self, *, endpoint: str, method: str, status: int, duration_s: float, request_id: str | None,
             key_id: str | None, fields: dict[str, Any] | None = None, error: str | None = None) -> dict[str, Any]:
        """One request's line. ``fields``: what the route body noted (:func:`note`): ``trace`` (the
        chat's :class:`serve.events.Trace`), ``rag`` (the answer's ``rag`` block), ``usage``,
        ``search`` (a search's response body), ``strategy``, ``question``."""
        f = fields or {}
        trace = f.get("trace")
        rag = f.get("rag") or {}
        search = f.get("search") or {}
        meta: dict[str, Any] = dict(rag.get("metadata") or search.get("metadata") or {})
        sources = rag.get("sources") or search.get("results") or []
        duration_ms = round(duration_s * 1000, 2)
        out: dict[str, Any] = {
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "request_id": request_id, "key_id": key_id, "method": method, "endpoint": endpoint,
            "status": status, "duration_ms": duration_ms,
        }
        if error:
            out["error"] = error
        route = trace.route if trace is not None else None
        route_meta = meta.get("route") or {}
        if route is not None or route_meta:
            out["route"] = route.kind if route is not None else route_meta.get("kind")
        strategy = (trace.strategy if trace is not None else None) or f.get("strategy")
        if strategy:
            out["strategy"] = strategy
        if route is not None or route_meta:
            out["router_strategy"] = route.strategy if route is not None else route_meta.get("strategy")
        version = (trace.version if trace is not None else None) or meta.get("index_version")
        if version:
            out["index_version"] = version
        if sources:
            out["document_ids"] = [s.get("document_id") for s in sources]
        timings = dict(trace.timings_ms) if trace is not None else dict(meta.get("timings_ms") or {})
        if timings:
            out["timings_ms"] = timings
        usage = f.get("usage") or meta.get("tokens")
        if usage:
            p, c = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
            out["tokens"] = {"prompt": p, "completion": c, "total": p + c}
            if self.pricing is not None:
                cached = bool(meta.get("cached"))  # a cache hit generated nothing and is not charged
                out["cost"] = 0.0 if cached else round(cost_of(self.pricing, p, c), 8)
        if trace is not None and trace.engine_s:
            out["engine_s"] = dict(trace.engine_s)
        if meta:
            out["cached"] = bool(meta.get("cached", False))
            out["outcome"] = meta.get("status")
        degraded = list(trace.degraded) if trace is not None else list(meta.get("degraded") or [])
        if degraded:
            out["degraded"] = degraded
        if self.cfg.include_question and f.get("question") is not None:
            out["question"] = f["question"]
        slow = self.cfg.slow_ms is not None and duration_ms >= self.cfg.slow_ms
        if slow:
            out["slow"] = True
            out["trace"] = self._trace(trace, meta, sources)
        return out

    def _trace(self, trace: Any, meta: dict[str, Any], sources: list[dict[str, Any]]) -> dict[str, Any]:
        """The whole trace of a slow request: ``rag.metadata`` (or, when the request ended before
        one was made, the trace's own timings, replicas, retries and reasons) and the sources."""
        full: dict[str, Any] = {**meta}
        if trace is not None:
            full.setdefault("timings_ms", dict(trace.timings_ms))
            full.setdefault("replicas", dict(trace.replicas))
            full.setdefault("retries", dict(trace.retries))
            full.setdefault("degraded_reasons", dict(trace.reasons))
            if trace.route is not None and "route" not in full:
                r = trace.route
                full["route"] = {"kind": r.kind, "query": r.query, "strategy": r.strategy,
                                 "domains": list(r.domains) if r.domains else None, "reasons": list(r.reasons)}
            if trace.engine_s:
                full["engine_s"] = dict(trace.engine_s)
        if not self.cfg.include_question and isinstance(full.get("route"), dict):
            full["route"] = {k: v for k, v in full["route"].items() if k not in _SCRUB}
        full["sources"] = [
            {k: s.get(k) for k in ("document_id", "chunk_id", "title", "source", "domain", "relevance_score",
                                   "scores", "cited", "rank", "index") if k in s}
            for s in sources
        ]
        return full


def note(request: Any, **fields: Any) -> None:
    """Remember facts about this request for its query-log line (route bodies call this)."""
    got = getattr(request.state, "query_fields", None)
    if got is None:
        got = request.state.query_fields = {}
    got.update(fields)


def question_of(body: Any) -> str | None:
    """The last user message of a chat request (what the log calls the question)."""
    for m in reversed(getattr(body, "messages", None) or []):
        if m.role == "user":
            return m.text
    return None
