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
on one file). A file is rotated at ``max_bytes`` or when it is ``max_age_hours`` old, whichever
comes first; rotated files, and the files of processes that are gone, are deleted once not written
for ``retention_days`` (at start and at each rotation). The files are created 0600: with questions
on, they hold what users asked.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _first_line_time(path: Path) -> float | None:
    """When ``path``'s first line was written (its ``ts``), None for an empty or unreadable file."""
    try:
        with open(path, encoding="utf-8") as f:
            return datetime.fromisoformat(json.loads(f.readline())["ts"]).timestamp()
    except (OSError, ValueError, KeyError, TypeError):
        return None


class _PrivateRotatingFileHandler(RotatingFileHandler):
    """A rotating file whose every file (the first and each one after a rollover) is created 0600;
    rotated at ``maxBytes`` or ``max_age_s`` after its first line, and the files of ``base`` (every
    process's) not written for ``retention_s`` deleted at start and at each rollover."""

    def __init__(self, path: Path, *, base: Path, max_bytes: int, backups: int, max_age_s: float | None,
                 retention_s: float | None) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=True)
        self.base, self.max_age_s, self.retention_s = Path(base), max_age_s, retention_s
        self.started: float | None = None  # when the current file's first line was written
        self.prune()

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.started = _first_line_time(Path(self.baseFilename)) or time.time()
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)

    def shouldRollover(self, record) -> bool:
        if super().shouldRollover(record):
            return True
        return (self.max_age_s is not None and self.started is not None and os.path.getsize(self.baseFilename) > 0
                and time.time() - self.started >= self.max_age_s)

    def doRollover(self) -> None:
        super().doRollover()
        self.prune()

    def prune(self, now: float | None = None) -> list[Path]:
        """Delete the log files beside ``base`` not written for ``retention_s``: rotated ones, and
        the current files of processes that are gone (a live process's own file is its to rotate);
        returns those deleted."""
        if self.retention_s is None:
            return []
        cutoff = (time.time() if now is None else now) - self.retention_s
        name = re.compile(rf"{re.escape(self.base.stem)}\.(?P<host>.+)\.(?P<pid>\d+){re.escape(self.base.suffix)}"
                          r"(?P<rotated>\.\d+)?")
        here = (socket.gethostname() or "host").replace("/", "_")
        gone = []
        for f in self.base.parent.glob(f"{self.base.stem}.*"):
            m = name.fullmatch(f.name)
            if m is None or f == Path(self.baseFilename):
                continue
            if not m["rotated"] and m["host"] == here and _pid_alive(int(m["pid"])):
                continue
            try:
                if f.stat().st_mtime < cutoff:
                    f.unlink()
                    gone.append(f)
            except FileNotFoundError:  # another process pruned it first
                continue
        return gone


class QueryLog:
    """Writes query-log lines (:meth:`line` builds one, :meth:`write` appends it). ``cfg``:
    :class:`common.config.QueryLogConfig`; ``pricing``: :class:`common.config.PricingConfig` (the
    cost field), or None to leave cost out."""

    def __init__(self, cfg, pricing=None, *, pid: int | None = None) -> None:
        self.cfg = cfg
        self.pricing = pricing
        self.path = process_path(cfg.path, pid)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.handler = _PrivateRotatingFileHandler(
            self.path, base=cfg.path, max_bytes=cfg.max_bytes, backups=cfg.backups,
            max_age_s=cfg.max_age_hours * 3600 if cfg.max_age_hours else None,
            retention_s=cfg.retention_days * 86400 if cfg.retention_days else None)
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
        chat's :class:`flow.events.Trace`), ``rag`` (the answer's ``rag`` block), ``usage``,
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
