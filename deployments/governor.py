"""The governor: who may ask (API keys), how much (token usage, quotas, budgets) and answers
already given (the response cache), as a plain class over the state stores. No Serve deployment
holds any of it: every ingress replica builds its own :class:`Governor` over the shared state
database (``state.url``: a SQLite file on the embedded default, PostgreSQL on a cluster) and the
shared cache (``governor.cache.storage``: this process's memory, or Redis for many replicas).

* :meth:`Governor.verify`: what the ingress's admission (:class:`deployments.admission.Admission`)
  caches about a token for ``governor.auth.key_cache_s``: the key's id, scope, rate overrides,
  quota limits and usage so far, or why it is refused.
* :meth:`Governor.record`: one generation's tokens and cost, charged exactly once per request id.
* :attr:`Governor.conversations` (the chat page's conversations and feedback) and the answer cache.

Its methods block (a database round trip): the ingress runs them off its event loop, each within
``state.call_timeout_s`` (:meth:`flow.calls.StageCalls.state`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deployments.cache import AnswerCache, open_cache
from deployments.limits import cost_of
from state.conversations import ANONYMOUS, SqlConversations
from state.db import Database, open_database
from state.keys import ApiKey, Keys, SqlKeys
from state.usage import SqlUsage, Usage, periods

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
    """What :meth:`Governor.verify` says about one token, which the ingress caches.

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


class Governor:
    """Keys, usage, conversations and the answer cache of one process, over the shared stores.
    ``cfg``: the :class:`common.config.AppConfig`; ``db``: the state database (default: the
    process's one for ``cfg``, schema upgraded as ``state.migrate`` says)."""

    def __init__(self, cfg, *, db: Database | None = None, cache: AnswerCache | None = None) -> None:
        g = cfg.governor
        self.cfg = g
        self.db = db if db is not None else open_database(cfg)
        self.keys: Keys = SqlKeys(self.db)
        self.ledger: Usage = SqlUsage(self.db)
        c = g.conversations
        self.conversations = SqlConversations(self.db, retention_days=c.retention_days, max_turns=c.max_turns,
                                              max_conversations=c.max_conversations,
                                              feedback_retention_days=c.feedback_retention_days)
        self.cache: AnswerCache | None = cache if cache is not None else (
            open_cache(g.cache.storage, max_entries=g.cache.max_entries, ttl_s=g.cache.ttl_s) if g.cache.enabled else None)

    @classmethod
    def from_config(cls, cfg) -> Governor:
        return cls(cfg)

    # -- keys -------------------------------------------------------------------------------------

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

    def daily_budget(self, key: ApiKey) -> float | None:
        """The key's daily budget: its own where set, else the config's (``governor.quotas.daily_budget``)."""
        return key.daily_budget if key.daily_budget is not None else self.cfg.quotas.daily_budget

    def quota_limits(self, key: ApiKey) -> tuple[int | None, int | None]:
        """The key's (daily, monthly) token quotas: its own where set, else the config's."""
        q = self.cfg.quotas
        return (key.daily_tokens if key.daily_tokens is not None else q.daily_tokens,
                key.monthly_tokens if key.monthly_tokens is not None else q.monthly_tokens)

    # -- usage ------------------------------------------------------------------------------------

    def record(self, key_id: str | None, prompt_tokens: int, completion_tokens: int, prefill_s: float = 0.0,
               decode_s: float = 0.0, *, request_id: str | None = None, now: float | None = None) -> bool:
        """One generation's tokens and engine seconds, and its cost at ``governor.pricing``; charged
        once per ``request_id`` (a retried write after a lost reply changes nothing: False)."""
        return self.ledger.record(key_id or ANONYMOUS, prompt_tokens=prompt_tokens,
                                  completion_tokens=completion_tokens, prefill_s=prefill_s, decode_s=decode_s,
                                  cost=cost_of(self.cfg.pricing, prompt_tokens, completion_tokens),
                                  request_id=request_id, now=now)

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

    # -- the answer cache -------------------------------------------------------------------------

    def cache_get(self, key: str) -> Any | None:
        return self.cache.get(key) if self.cache is not None else None

    def cache_put(self, key: str, value: Any) -> None:
        if self.cache is not None:
            self.cache.put(key, value)

    def cache_stats(self) -> dict[str, Any]:
        if self.cache is None:
            return {"enabled": False}
        return {"enabled": True, "storage": self.cfg.cache.storage.split("://", 1)[0], **self.cache.stats()}

    def cache_clear(self) -> int:
        return self.cache.clear() if self.cache is not None else 0

    def check(self) -> None:
        """Raises when the state database does not answer (the readiness probe)."""
        self.keys.count_active()
