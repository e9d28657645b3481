"""The governor stage: who may ask (API keys), how much (token usage and quotas), and answers
already given (the response cache).

* :class:`Governor` (plain class): the decisions, over a SQLite file (keys hashed, usage written
  after every request) and an in-memory cache.
* :class:`GovernorDeployment`: its Serve wrapper, one replica. A restarted governor starts with an
  empty cache; the usage ledger and the keys are on disk and survive it. It also keeps the chat
  page's conversations and feedback (:mod:`deployments.conversations`, :meth:`Governor.history`)
  and starts their purge timer.

The ingress does not call the governor per request: it admits requests itself
(:class:`deployments.admission.Admission`), asking :meth:`Governor.verify` about a key once per
``governor.auth.key_cache_s`` (the key's id, scope, rate overrides, quota limits and usage so
far, or why it is refused), with rate-limit counters in ``governor.rate_limits.storage``. It
calls :meth:`Governor.record` after a generation and the cache methods around the generator.

:meth:`Governor.admit` (key, token buckets and quota in one call, per request) is the earlier
path; it still works and is what ``load_tests/bench_governor.py`` compares the ingress's against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deployments.auth import ApiKey, KeyStore, UsageLedger, periods
from deployments.cache import ResponseCache
from deployments.conversations import ANONYMOUS, ConversationLimitError, ConversationStore
from deployments.errors import StageError
from deployments.limits import KINDS, RateLimiter, check_budget, check_quota, cost_of, kind_of

INGEST_CALLS = frozenset({"submit", "job", "jobs", "pending_document_ids"})  # GovernorDeployment.ingest
# Governor.history: conversations, answered request ids and feedback (deployments/conversations.py)
HISTORY_CALLS = frozenset({"create", "list", "get", "delete", "exists", "chat_done", "put_feedback", "feedback"})
MISSING_KEY = (("no API key was sent; send the header `Authorization: Bearer <key>` "
                "(`ragraph keys create` makes one)"), "missing_api_key")
INVALID_KEY = ("the API key is not valid: unknown, revoked or mistyped", "invalid_api_key")


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer to one request. ``status`` is 200 when allowed, else the HTTP status the ingress
    returns (401 no or bad key, 403 scope, 429 rate or quota) with ``message``."""

    allowed: bool
    status: int = 200
    message: str = ""
    code: str = ""
    retry_after: float = 0.0
    key_id: str | None = None
    scope: str | None = None
    reserved: int = 0  # tokens reserved for this request (Admission.admit's reserve_tokens): settle them after
    headers: dict[str, str] | None = None  # OpenAI's x-ratelimit-* headers for the key's limits, when it has any


@dataclass(frozen=True, slots=True)
class KeyVerdict:
    """The governor's answer about one token (:meth:`Governor.verify`), which the ingress caches.

    ``status`` 200: the key is active, with its ``scope``, per-kind rate overrides (None: the
    config's), its (daily, monthly) token quotas already resolved against the config, and its
    usage so far in the UTC ``day`` and ``month`` named. Else 401 with ``message`` and ``code``."""

    status: int
    message: str = ""
    code: str = ""
    key_id: str | None = None
    scope: str | None = None
    rate_overrides: dict[str, float | None] = field(default_factory=dict)
    daily_tokens: int | None = None
    monthly_tokens: int | None = None
    day: str = ""
    month: str = ""
    day_used: int = 0
    month_used: int = 0
    daily_budget: float | None = None  # resolved against governor.quotas.daily_budget; None: no budget
    day_cost: float = 0.0  # spent in ``day`` (governor.pricing)

    @property
    def ok(self) -> bool:
        return self.status == 200


Admission = Verdict  # its earlier name (deployments.admission.Admission is the ingress's admission)


def _limits(rate) -> dict[str, float]:
    return {k: float(getattr(rate, k)) for k in KINDS}


class Governor:
    def __init__(self, cfg) -> None:
        """``cfg``: the :class:`common.config.GovernorConfig` section."""
        self.cfg = cfg
        self.auth_enabled = cfg.auth.enabled
        self.keys = KeyStore(cfg.db)
        self.ledger = UsageLedger(cfg.db)
        rl = cfg.rate_limits
        self.limiter = (
            RateLimiter(per_key=_limits(rl.per_key), per_ip=_limits(rl.per_ip), exempt_ips=rl.exempt_ips,
                        ipv6_prefix=rl.ipv6_prefix)
            if rl.enabled else None
        )
        self.cache = ResponseCache(max_entries=cfg.cache.max_entries, ttl_s=cfg.cache.ttl_s) if cfg.cache.enabled else None
        conv = cfg.conversations
        self.conversations = ConversationStore(cfg.db, retention_days=conv.retention_days, max_turns=conv.max_turns,
                                               max_conversations=conv.max_conversations,
                                               feedback_retention_days=conv.feedback_retention_days)

    @classmethod
    def from_config(cls, cfg) -> Governor:
        return cls(cfg.governor)

    def run(self, *, token: str | None, ip: str, path: str, need_admin: bool = False) -> Verdict:
        """Admit one request to ``path`` from ``ip`` with the bearer ``token`` (None: none sent)."""
        key = None
        if self.auth_enabled:
            if not token:
                return Verdict(False, 401, *MISSING_KEY)
            key = self.keys.verify(token)
            if key is None:
                return Verdict(False, 401, *INVALID_KEY)
            if need_admin and key.scope != "admin":
                return Verdict(False, 403, f"this endpoint needs an admin key; key {key.id} has scope {key.scope!r}",
                                 "insufficient_scope", key_id=key.id, scope=key.scope)
        kind = kind_of(path)
        if self.limiter is not None:
            d = self.limiter.check(kind=kind, ip=ip, key_id=key.id if key else None,
                                   key_overrides=key.rate_overrides() if key else None)
            if not d.allowed:
                return Verdict(False, 429, d.message(), "rate_limit_exceeded", d.retry_after,
                                 key.id if key else None, key.scope if key else None)
        if key is not None and kind == "chat":
            day, month, day_cost = self.ledger.standing(key.id)
            daily, monthly = self.quota_limits(key)
            qd = check_quota(day_used=day, month_used=month, daily_limit=daily, monthly_limit=monthly)
            if not qd.allowed:
                return Verdict(False, 429, qd.message(), "insufficient_quota", qd.retry_after, key.id, key.scope)
            bd = check_budget(spent=day_cost, budget=self.daily_budget(key),
                              currency=self.cfg.pricing.currency)
            if not bd.allowed:
                return Verdict(False, 429, bd.message(), "insufficient_quota", bd.retry_after, key.id, key.scope)
        if key is None and not self.auth_enabled:
            return Verdict(True, key_id=None, scope="admin")  # auth off: the local operator may do anything
        return Verdict(True, key_id=key.id, scope=key.scope)

    def admit(self, token: str | None, ip: str, path: str, need_admin: bool = False) -> Verdict:
        return self.run(token=token, ip=ip, path=path, need_admin=need_admin)

    def verify(self, token: str | None, *, now: float | None = None) -> KeyVerdict:
        """What the ingress caches about ``token``: the key's id, scope, rate overrides, quota
        limits and usage so far (one indexed lookup plus the usage query), or the 401."""
        if not token:
            return KeyVerdict(401, *MISSING_KEY)
        key = self.keys.verify(token)
        if key is None:
            return KeyVerdict(401, *INVALID_KEY)
        daily, monthly = self.quota_limits(key)
        day, month = periods(now)
        day_used, month_used, day_cost = self.ledger.standing(key.id, now=now)
        return KeyVerdict(200, key_id=key.id, scope=key.scope, rate_overrides=key.rate_overrides(),
                          daily_tokens=daily, monthly_tokens=monthly, day=day, month=month,
                          day_used=day_used, month_used=month_used, daily_budget=self.daily_budget(key),
                          day_cost=day_cost)

    # -----------------------------------------------------------------------------------------
    # usage

    def record(self, key_id: str | None, prompt_tokens: int, completion_tokens: int, prefill_s: float = 0.0,
               decode_s: float = 0.0, *, now: float | None = None) -> None:
        """One generation's tokens and engine seconds, and its cost at ``governor.pricing``."""
        self.ledger.record(key_id or ANONYMOUS, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           prefill_s=prefill_s, decode_s=decode_s,
                           cost=cost_of(self.cfg.pricing, prompt_tokens, completion_tokens), now=now)

    def daily_budget(self, key: ApiKey) -> float | None:
        """The key's daily budget: its own where set, else the config's (``governor.quotas.daily_budget``)."""
        return key.daily_budget if key.daily_budget is not None else self.cfg.quotas.daily_budget

    def quota_limits(self, key: ApiKey) -> tuple[int | None, int | None]:
        """The key's (daily, monthly) token quotas: its own where set, else the config's."""
        q = self.cfg.quotas
        return (key.daily_tokens if key.daily_tokens is not None else q.daily_tokens,
                key.monthly_tokens if key.monthly_tokens is not None else q.monthly_tokens)

    def usage(self, key_id: str | None) -> dict[str, Any] | None:
        """Usage of ``key_id`` (None: the anonymous account of auth-off requests); None for no such key."""
        key = self.keys.get(key_id) if key_id else None
        if key_id and key is None:
            return None
        daily, monthly = self.quota_limits(key) if key else (None, None)
        budget = self.daily_budget(key) if key else None
        used = self.ledger.usage(key_id or ANONYMOUS)
        spent = used["day"]["cost"]
        return {**used, "currency": self.cfg.pricing.currency,
                "limits": {"daily_tokens": daily, "monthly_tokens": monthly, "daily_budget": budget},
                "budget": {"daily": budget, "spent_today": spent,
                           "left": None if budget is None else round(max(0.0, budget - spent), 8)}}

    def all_usage(self) -> dict[str, Any]:
        names = {k.id: k.name for k in self.keys.list(include_revoked=True)}
        rows = self.ledger.all_usage()
        for r in rows:
            r["name"] = names.get(r["key_id"], ANONYMOUS if r["key_id"] == ANONYMOUS else None)
        return {"object": "list", "currency": self.cfg.pricing.currency, "data": rows}

    # -----------------------------------------------------------------------------------------
    # cache

    def cache_get(self, key: str) -> Any | None:
        return self.cache.get(key) if self.cache is not None else None

    def cache_put(self, key: str, value: Any) -> None:
        if self.cache is not None:
            self.cache.put(key, value)

    def cache_stats(self) -> dict[str, Any]:
        if self.cache is None:
            return {"enabled": False}
        return {"enabled": True, **self.cache.stats()}

    def cache_clear(self) -> int:
        return self.cache.clear() if self.cache is not None else 0

    # -----------------------------------------------------------------------------------------
    # conversations and feedback

    def history(self, method: str, *args: Any) -> Any:
        """A call on :class:`deployments.conversations.ConversationStore` (its first argument is the
        owner: a key id, or None for the anonymous caller of an auth-off service, but for ``feedback``).
        A refusal of the caller's request (the conversation limit) is a :class:`StageError` of kind
        ``invalid``: never retried, answered 409 by the ingress."""
        if method not in HISTORY_CALLS:
            raise ValueError(f"unknown history call {method!r}; known: {sorted(HISTORY_CALLS)}")
        if method != "feedback":
            args = (args[0] or ANONYMOUS, *args[1:])
        try:
            return getattr(self.conversations, method)(*args)
        except ConversationLimitError as e:
            raise StageError("governor", "invalid", f"{e.code}: {e}") from None


class GovernorDeployment:
    """Serve wrapper: one replica (the config refuses more). SQLite calls take microseconds to a
    millisecond (a usage write is one fsync'd transaction), so they run on the replica's loop."""

    def __init__(self, cfg) -> None:
        from ray import serve

        self._gov = Governor.from_config(cfg)
        self._replica = serve.get_replica_context().replica_id.unique_id
        # Expired conversations, request ids and feedback go on a timer, off the replica's loop.
        self._gov.conversations.start_purging(cfg.governor.conversations.purge_interval_s)
        from deployments.ingest import IngestService

        # The documents API's jobs (deployments/ingest.py): kept here, beside the database, in the one
        # replica; started at once so that a job a restart interrupted is run again (or failed) now.
        self._ingest = IngestService(cfg)
        self._ingest.start()

    async def admit(self, token: str | None, ip: str, path: str, need_admin: bool = False) -> Verdict:
        return self._gov.admit(token, ip, path, need_admin)

    async def verify(self, token: str | None) -> KeyVerdict:
        return self._gov.verify(token)

    async def record(self, key_id: str | None, prompt_tokens: int, completion_tokens: int, prefill_s: float = 0.0,
                     decode_s: float = 0.0) -> None:
        self._gov.record(key_id, prompt_tokens, completion_tokens, prefill_s, decode_s)

    async def usage(self, key_id: str | None) -> dict[str, Any] | None:
        return self._gov.usage(key_id)

    async def all_usage(self) -> dict[str, Any]:
        return self._gov.all_usage()

    async def cache_get(self, key: str) -> Any | None:
        return self._gov.cache_get(key)

    async def cache_put(self, key: str, value: Any) -> None:
        self._gov.cache_put(key, value)

    async def cache_stats(self) -> dict[str, Any]:
        return {**self._gov.cache_stats(), "replica": self._replica}

    async def cache_clear(self) -> int:
        return self._gov.cache_clear()

    async def history(self, method: str, *args: Any) -> Any:
        return self._gov.history(method, *args)

    async def ingest(self, method: str, *args: Any) -> Any:
        """A call of the documents API on :class:`deployments.ingest.IngestService` (in a thread: a
        submit writes and fsyncs the uploaded files)."""
        import asyncio

        if method not in INGEST_CALLS:
            raise ValueError(f"unknown ingest call {method!r}; known: {sorted(INGEST_CALLS)}")
        return await asyncio.to_thread(getattr(self._ingest, method), *args)

    async def check_health(self) -> None:
        self._gov.keys.count_active()  # the database answers
