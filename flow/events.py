"""The flow's types: the trace of one request, what ``prepare`` produced, the typed events the
chat flow yields (:class:`Delta` text, then one :class:`Done`) that :mod:`flow.openai` shapes as
OpenAI's objects, and what a response says of its trace (:func:`metadata`, :func:`public_source`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import PureWindowsPath
from typing import Any

from deployments.retriever import Passage
from deployments.router import Route
from flow.errors import redact
from flow.prompt import Prompt


@dataclass(frozen=True, slots=True)
class Delta:
    """Answer text to send on (and, when the request asked for them, its tokens' log probabilities
    in OpenAI's ``logprobs.content`` shape)."""

    text: str
    logprobs: list[dict[str, Any]] | None = None


@dataclass(frozen=True, slots=True)
class Done:
    """The answer is over: why, its token usage, and the ``rag`` block (sources, metadata)."""

    finish_reason: str
    usage: dict[str, int]
    rag: dict[str, Any]


ChatEvent = Delta | Done


@dataclass
class Trace:
    request_id: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    degraded: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    replicas: dict[str, str] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)
    version: str | None = None
    route: Route | None = None
    strategy: str | None = None  # the retrieval strategy used (the request's, the router's or the config's)
    engine_s: dict[str, float] | None = None  # the generator's prefill and decode seconds, when it ran to the end
    t0: float = field(default_factory=time.perf_counter)

    def degrade(self, stage: str, why: str) -> None:
        if stage not in self.degraded:
            self.degraded.append(stage)
        self.reasons[stage] = redact(why)  # shown to the client in rag.metadata: no server paths


@dataclass
class Reservation:
    """Tokens a chat's admission held against its key's quota (``deployments.admission``); released
    exactly once, by the usage that settles it, or with nothing used when the request ends early."""

    key_id: str | None
    tokens: int
    settled: bool = False


@dataclass
class Prepared:
    trace: Trace
    prompt: Prompt
    rag: bool
    sources: list[Passage]
    key_id: str | None = None  # the API key that asked (None: auth off), for the usage ledger
    cache_key: str | None = None  # None: this answer is neither looked up nor stored
    reservation: Reservation | None = None  # quota held at admission, released once


def excerpt(text: str, n: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1].rsplit(" ", 1)[0] + "…"


def public_source(source: str) -> str:
    """A passage's ``source`` as clients see it. Indexes hold it relative to the indexed folder
    (indexing/documents.py); one built before that holds the file's absolute path on the server,
    of which only the file's name is shown."""
    path = PureWindowsPath(source)  # reads both separators, and a drive
    if source.startswith(("/", "\\", "~")) or path.drive:
        return path.name
    return source


def metadata(trace: Trace, *, model: str, status: str, usage: dict | None = None, prep: Prepared | None = None,
             cached: bool = False) -> dict[str, Any]:
    """``metadata`` of a search or ``rag.metadata`` of an answer: what the request's trace shows."""
    meta: dict[str, Any] = {
        "request_id": trace.request_id,
        "model": model,
        "index_version": trace.version,
        "cached": cached,
        "status": status,
        "degraded": list(trace.degraded),
        "degraded_reasons": dict(trace.reasons),
        "timings_ms": dict(trace.timings_ms),
        "replicas": dict(trace.replicas),
        "retries": dict(trace.retries),
    }
    if trace.route is not None:
        r = trace.route
        meta["route"] = {"kind": r.kind, "query": r.query, "strategy": r.strategy,
                         "domains": list(r.domains) if r.domains else None, "reasons": list(r.reasons)}
    if prep is not None:
        meta["rag"] = prep.rag
        meta["context_tokens"] = prep.prompt.context_tokens
        meta["dropped_turns"] = prep.prompt.dropped_turns
    if usage is not None:
        meta["tokens"] = dict(usage)
    return meta
