"""The decisions of admission, without their counters: request kinds (:func:`kind_of`), a rate
limit's refusal (:class:`Decision`, its message and ``Retry-After``), token quotas
(:func:`check_quota`) and daily budgets (:func:`check_budget`), and what a generation costs
(:func:`cost_of`). The counters are elsewhere: requests in the ``limits`` library's storage
(:mod:`deployments.admission`), tokens and cost in the usage ledger (:mod:`state.usage`).
Everything here is pure and clock-injected.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime


KINDS = ("chat", "search", "other")
_PATH_KINDS = {"/v1/chat/completions": "chat", "/v1/search": "search"}
_SCOPE_WORDS = {"key": "this API key", "ip": "this IP address"}


def _duration(seconds: float) -> str:
    """'45 s', '12 min', '3 h 12 min', '9 d 4 h': rounded up, so a client that waits that long is let in."""
    s = max(1, math.ceil(seconds))
    if s < 60:
        return f"{s} s"
    m = math.ceil(s / 60)
    if m < 60:
        return f"{m} min"
    if m < 24 * 60:
        return f"{m // 60} h {m % 60} min"
    h = math.ceil(s / 3600)
    return f"{h // 24} d {h % 24} h"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: float = 0.0  # seconds, > 0 when refused
    scope: str = ""  # "key" or "ip": which bucket refused
    kind: str = ""
    limit_per_min: float = 0.0

    def message(self) -> str:
        if self.allowed:
            return "allowed"
        who = _SCOPE_WORDS.get(self.scope, self.scope)
        return (
            f"rate limit exceeded for {who}: {self.limit_per_min:g} {self.kind} requests per minute; "
            f"retry in {_duration(self.retry_after)}"
        )


def check_rates(name: str, rates: dict[str, float]) -> dict[str, float]:
    """``rates`` per kind, checked (known kinds, >= 0) and completed with 0 (no limit) for the missing ones."""
    errors = [f"unknown kind {k!r}" for k in rates if k not in KINDS]
    errors += [f"{k}={v!r} must be >= 0 (0 = no limit)" for k, v in rates.items() if not (v >= 0)]
    if errors:
        raise ValueError(f"{name}: {'; '.join(errors)}; kinds are {list(KINDS)}")
    return {k: float(rates.get(k, 0.0)) for k in KINDS}


def kind_of(path: str) -> str:
    """The rate-limit kind of a request path: 'chat', 'search', or 'other'."""
    return _PATH_KINDS.get(path.rstrip("/") or "/", "other")


RESERVED_RETRY_S = 10.0  # Retry-After when only requests in progress stand in the way: they finish soon


@dataclass(frozen=True)
class QuotaDecision:
    allowed: bool
    period: str = ""  # "day" | "month" when refused
    used: int = 0
    limit: int = 0
    retry_after: float = 0.0  # seconds until the period resets (or RESERVED_RETRY_S, see check_quota)
    reserved: int = 0  # tokens held by the key's requests in progress
    request: int = 0  # tokens this request asked to reserve

    def message(self) -> str:
        if self.allowed:
            return "allowed"
        adjective, span = ("daily", "today") if self.period == "day" else ("monthly", "this month")
        if self.used >= self.limit:
            return (
                f"{adjective} token quota exhausted: {self.used} of {self.limit} tokens used {span} (UTC); "
                f"resets in {_duration(self.retry_after)}"
            )
        left = self.limit - self.used
        if self.request > left:
            return (
                f"{adjective} token quota too small for this request: it may use up to {self.request} tokens "
                f"(its prompt with the retrieved passages, and max_tokens) but {left} of {self.limit} are left "
                f"{span} (UTC); a shorter conversation, a smaller rag.top_k or max_tokens asks for fewer, or "
                f"retry after the reset in {_duration(self.retry_after)}"
            )
        return (
            f"{adjective} token quota held by requests in progress: {self.used} of {self.limit} tokens used "
            f"{span} (UTC) and {self.reserved} reserved by this key's requests in progress, so this request's "
            f"{self.request} do not fit; retry in {_duration(self.retry_after)}, when some have finished"
        )


def _next_reset(period: str, now: float) -> float:
    t = datetime.fromtimestamp(now, tz=UTC)
    if period == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.timestamp() + 86_400
    year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
    return datetime(year, month, 1, tzinfo=UTC).timestamp()


def check_quota(
    *, day_used: int, month_used: int, daily_limit: int | None, monthly_limit: int | None, now: float | None = None,
    reserved: int = 0, request: int = 0,
) -> QuotaDecision:
    """Refuse when ``used + reserved + max(request, 1) > limit`` (None = unlimited): with nothing
    reserved or requested, when used >= limit. ``reserved``: tokens held by the key's requests in
    progress; ``request``: the tokens this request would reserve.

    The month is checked first: when both are spent, the month's reset is the honest ``retry_after``
    (retrying at midnight would be refused again). When the request would fit once the requests in
    progress finish, ``retry_after`` is :data:`RESERVED_RETRY_S` (or the reset, if sooner).
    """
    now = time.time() if now is None else now
    need = max(request, 1)
    for period, used, limit in (("month", month_used, monthly_limit), ("day", day_used, daily_limit)):
        if limit is not None and used + reserved + need > limit:
            retry = max(_next_reset(period, now) - now, 1e-3)
            if used + need <= limit:  # only the reservations stand in the way
                retry = min(retry, RESERVED_RETRY_S)
            return QuotaDecision(False, period=period, used=used, limit=limit, retry_after=retry,
                                 reserved=reserved, request=request)
    return QuotaDecision(True)


# ---------------------------------------------------------------------------------------------
# cost and the daily budget


def cost_of(pricing, prompt_tokens: int, completion_tokens: int) -> float:
    """What a generation costs at ``pricing`` (:class:`common.config.PricingConfig`: a price per
    1000 prompt and per 1000 completion tokens)."""
    return prompt_tokens / 1000 * pricing.input_per_1k + completion_tokens / 1000 * pricing.output_per_1k


@dataclass(frozen=True)
class BudgetDecision:
    allowed: bool
    spent: float = 0.0
    budget: float = 0.0
    currency: str = ""
    retry_after: float = 0.0  # seconds until midnight UTC, when refused

    def message(self) -> str:
        if self.allowed:
            return "allowed"
        return (f"daily budget spent: {self.spent:.4f} of {self.budget:g} {self.currency} used today (UTC); "
                f"resets in {_duration(self.retry_after)}")


def check_budget(*, spent: float, budget: float | None, currency: str = "", now: float | None = None) -> BudgetDecision:
    """Refuse when ``spent >= budget`` (None: no budget). A request's cost is known only once it has
    run, so the request that crosses the budget is answered and the next one refused."""
    if budget is None or spent < budget:
        return BudgetDecision(True, spent=spent, budget=budget or 0.0, currency=currency)
    now = time.time() if now is None else now
    return BudgetDecision(False, spent=spent, budget=budget, currency=currency,
                          retry_after=max(_next_reset("day", now) - now, 1e-3))
