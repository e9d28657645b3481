"""Admission in the ingress: keys verified once and cached, rate limits in a shared counter store,
quotas checked against a cached usage snapshot.

:class:`Admission` is a plain class (no Ray): every ingress replica holds one
(``Pipeline.admission``) and calls :meth:`Admission.admit` before any work. Per request:

1. **Per-address limit** (before any key check, also for requests without a key): refused at once
   when the address has no allowance left (429, ``scope`` ip). An IPv4 client is counted by its
   address, an IPv6 client by its ``/governor.rate_limits.ipv6_prefix`` network (/64): one client
   usually holds a whole /64 and could otherwise rotate addresses to escape its limit.
2. **The key** (auth on): a missing or malformed token is refused here (401). Otherwise the
   verdict cached under ``sha256(token)`` is used; on a miss the state database is asked once
   (``verify``, :meth:`deployments.governor.Governor.verify`) and its answer, good or bad, is kept
   for ``governor.auth.key_cache_s`` seconds. Concurrent misses for one token share one call. So a
   revoked key is refused within ``key_cache_s``, and a flood of one bad key costs one database
   call per ``key_cache_s``. Refused requests (401/403) still count against their address, so a
   flood of bad keys meets the per-address limit. A request whose key is not cached spends its
   address's allowance *before* the database is asked, so an address can cause at most its limit
   of database calls per window, also when its requests arrive all at once.
3. **Per-key limit**, then the per-address allowance is taken (a key refusal does not spend the
   address's allowance). Counters live in ``governor.rate_limits.storage`` through the ``limits``
   library, moving window of one minute (at most N requests in any 60 s; ``Retry-After`` is when
   the oldest of them leaves the window): ``memory://`` in this process (exact with one ingress
   replica), ``redis://host:port`` shared by every replica.
4. **Token quota** (chats): the key's day and month usage from the verification, plus the
   tokens this replica has recorded since (:meth:`Admission.note_usage`, :meth:`Admission.settle`),
   plus the tokens reserved by the key's requests in progress here (``reserve_tokens``): a request
   is admitted only if its own reservation fits too, and holds it until :meth:`Admission.settle`.
   The ingress admits a chat before reading its body, then reserves (:meth:`Admission.reserve`)
   once the body tells its size; a chat larger than its key's whole quota is refused with 400.
   Other replicas' usage is seen at the next verification, so N replicas can overshoot a quota by
   at most what the others admit within ``key_cache_s``.
5. **Daily budget** (chats): the key's cost today (``governor.pricing``) from the same snapshot,
   plus the cost of what this replica has recorded since; refused (429 ``insufficient_quota``)
   once it reaches the key's ``daily_budget``. A cost is known only after the answer, so the
   request that crosses the budget is answered and the next one refused.

Failures: the state database unreachable on a cache miss raises :class:`StageError` (stage
``state``), the counter store unreachable raises one with stage ``rate_limits``; the ingress
turns them into 503 with auth on and admits without limits with auth off.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from cachetools import TTLCache
from limits import RateLimitItem, RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string

from common.networks import address_group, in_networks, parse_networks
from common.redisurl import with_password, without_password
from deployments.errors import StageError
from deployments.governor import INVALID_KEY, MISSING_KEY, KeyVerdict, Verdict
from deployments.limits import KINDS, Decision, check_budget, check_quota, check_rates, cost_of, kind_of
from state.keys import token_hash, well_formed
from state.usage import periods

log = logging.getLogger("ray.serve")

Verify = Callable[[str], Awaitable[KeyVerdict]]
NAMESPACE = "ragraph"  # first part of every counter's name in the store


def rate_item(per_min: float) -> RateLimitItem:
    """``per_min`` requests per minute as a ``limits`` item (a whole number per a whole number of
    minutes or seconds): 30 -> 30 per minute, 1.5 -> 3 per 2 minutes, 0.25 -> 1 per 240 seconds."""
    if not per_min > 0:
        raise ValueError(f"per_min must be > 0, got {per_min!r}")
    if per_min < 1:
        return RateLimitItemPerSecond(1, max(1, round(60 / per_min)), namespace=NAMESPACE)
    for minutes in range(1, 11):
        n = per_min * minutes
        if abs(n - round(n)) < 1e-9:
            return RateLimitItemPerMinute(round(n), minutes, namespace=NAMESPACE)
    return RateLimitItemPerMinute(round(per_min), namespace=NAMESPACE)


class SweptMemoryStorage(MemoryStorage):
    """``limits``' async memory storage, swept of expired entries at most every :attr:`SWEEP_S`.

    The library's own storage starts a sweep after every hit once the previous one has ended, and
    that sweep visits every key through ``asyncio.to_thread`` (limits 5.8): a thread hop per key,
    per request, which cost 0.35 to 1.1 ms of CPU per admission here as counters grew. Sweeping is
    only housekeeping (a moving window counts the entries still inside it whether or not the expired
    ones are gone), so this sweep runs at most once a second, in the event loop, yielding every
    :attr:`BATCH` keys. It replaces the library's through the name it calls
    (``_MemoryStorage__schedule_expiry``); tests/test_admission.py fails if a new ``limits`` renames it."""

    SWEEP_S = 1.0
    BATCH = 1000

    def __init__(self, uri: str | None = None, **options: Any) -> None:
        super().__init__(uri, **options)
        self._swept_at = 0.0
        self.sweeps = 0

    async def _MemoryStorage__schedule_expiry(self) -> None:  # the hook the library's hits call
        now = time.time()
        if abs(now - self._swept_at) < self.SWEEP_S or (self.timer is not None and not self.timer.done()):
            return
        self._swept_at = now
        self.timer = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        now = time.time()
        for i, key in enumerate(list(self.events)):
            if i and i % self.BATCH == 0:
                await asyncio.sleep(0)
            events = self.events.get(key)
            if events:  # newest first: the expired ones are the tail
                del events[bisect.bisect_left(events, -now, key=lambda e: -e.expiry):]
            if not events and not (key in self.locks and self.locks[key].locked()):
                self.events.pop(key, None)
                self.locks.pop(key, None)
        for i, key in enumerate(list(self.expirations)):
            if i and i % self.BATCH == 0:
                await asyncio.sleep(0)
            if self.expirations.get(key, now + 1) <= now:
                self.storage.pop(key, None)
                self.expirations.pop(key, None)
                if not (key in self.locks and self.locks[key].locked()):
                    self.locks.pop(key, None)
        self.sweeps += 1


def open_storage(url: str) -> Any:
    """The async ``limits`` storage for a ``governor.rate_limits.storage`` URL (a Redis URL without a
    password takes the one of ``RAGRAPH_REDIS_PASSWORD``, :mod:`common.redisurl`)."""
    if url.startswith("memory://"):
        return SweptMemoryStorage()
    # redis.asyncio (the `limits[redis]` extra's client); short timeouts: a lost store must not hang admission
    return storage_from_string(f"async+{with_password(url)}", implementation="redispy", wrap_exceptions=True,
                               socket_timeout=1.0, socket_connect_timeout=1.0)


class WindowLimiter:
    """Per-key and per-address request limits for the three kinds, over a ``limits`` storage
    (moving window of the item's period); a limit of 0 means none. An IPv6 client is counted by
    its ``/ipv6_prefix`` network (:meth:`who`), an IPv4 client by its address."""

    def __init__(self, *, per_key: dict[str, float], per_ip: dict[str, float], exempt_ips: Iterable[str] = (),
                 storage: Any, where: str = "memory://", ipv6_prefix: int = 64) -> None:
        self.per_key = check_rates("per_key", per_key)
        self.per_ip = check_rates("per_ip", per_ip)
        self.exempt = parse_networks("exempt_ips", exempt_ips)
        address_group("::1", ipv6_prefix)  # a bad prefix fails here, not per request
        self.ipv6_prefix = ipv6_prefix
        self.storage = storage
        self.where = without_password(where)  # named in errors and stats: never a password
        self.strategy = MovingWindowRateLimiter(storage)
        self._items: dict[float, RateLimitItem] = {}

    def item(self, per_min: float) -> RateLimitItem:
        it = self._items.get(per_min)
        if it is None:
            it = self._items[per_min] = rate_item(per_min)
        return it

    def ip_limit(self, kind: str, ip: str, *, exempt: bool = True) -> float:
        limit = self.per_ip[kind]
        return limit if limit > 0 and not (exempt and in_networks(ip, self.exempt)) else 0.0

    def who(self, ip: str) -> str:
        """The counter name of client address ``ip``: itself (IPv4) or its IPv6 network."""
        return address_group(ip, self.ipv6_prefix)

    def key_limit(self, kind: str, overrides: dict[str, float | None] | None) -> float:
        override = (overrides or {}).get(kind)
        return self.per_key[kind] if override is None else float(override)

    async def test(self, scope: str, kind: str, who: str, limit: float) -> Decision:
        """Whether one more request fits (taking nothing)."""
        item = self.item(limit)
        ok = await self._call(self.strategy.test(item, scope, kind, who))
        return Decision(True, kind=kind) if ok else await self._refusal(item, scope, kind, who, limit)

    async def hit(self, scope: str, kind: str, who: str, limit: float) -> Decision:
        """Take one request's allowance, or refuse (taking nothing)."""
        item = self.item(limit)
        ok = await self._call(self.strategy.hit(item, scope, kind, who))
        return Decision(True, kind=kind) if ok else await self._refusal(item, scope, kind, who, limit)

    async def headers(self, kind: str, who: str, limit: float) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*-requests`` headers for the ``who`` key's ``kind`` bucket."""
        item = self.item(limit)
        stats = await self._call(self.strategy.get_window_stats(item, "key", kind, who))
        reset = max(0.0, stats.reset_time - time.time())
        return {"x-ratelimit-limit-requests": str(item.amount), "x-ratelimit-remaining-requests": str(stats.remaining),
                "x-ratelimit-reset-requests": openai_duration(reset)}

    async def _refusal(self, item: RateLimitItem, scope: str, kind: str, who: str, limit: float) -> Decision:
        stats = await self._call(self.strategy.get_window_stats(item, scope, kind, who))
        wait = max(stats.reset_time - time.time(), 1e-3)  # when the oldest request leaves the window
        return Decision(False, retry_after=wait, scope=scope, kind=kind, limit_per_min=limit)

    async def _call(self, op: Awaitable[Any]) -> Any:
        try:
            return await op
        except Exception as e:  # noqa: BLE001 - the store is down or refused: the caller decides (fail closed with auth on)
            raise StageError("rate_limits", "unavailable",
                             f"{self.where}: {type(e).__name__}: {e}".splitlines()[0][:300]) from None


class _Entry:
    """A cached key verdict and, for a valid key, its usage as this replica knows it."""

    __slots__ = ("day", "day_cost", "day_used", "month", "month_used", "verdict")

    def __init__(self, verdict: KeyVerdict) -> None:
        self.verdict = verdict
        self.day, self.month = verdict.day, verdict.month
        self.day_used, self.month_used = verdict.day_used, verdict.month_used
        self.day_cost = verdict.day_cost

    def _roll(self, now: float) -> None:
        day, month = periods(now)
        if day != self.day:
            self.day, self.day_used, self.day_cost = day, 0, 0.0
        if month != self.month:
            self.month, self.month_used = month, 0

    def used(self, now: float) -> tuple[int, int]:
        self._roll(now)
        return self.day_used, self.month_used

    def add(self, tokens: int, now: float, cost: float = 0.0) -> None:
        self._roll(now)
        self.day_used += tokens
        self.month_used += tokens
        self.day_cost += cost

    def spent(self, now: float) -> float:
        self._roll(now)
        return self.day_cost


class Admission:
    """The ingress's admission (see the module docstring). ``cfg``: :class:`common.config.GovernorConfig`.

    ``storage``: a ``limits`` async storage to use instead of opening ``cfg.rate_limits.storage``
    (tests share one between two objects to stand for two replicas on one redis). ``clock`` times
    the key cache, ``wall`` the quota periods."""

    def __init__(self, cfg, *, storage: Any = None, ingress_replicas: int = 1, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.auth_enabled = cfg.auth.enabled
        self.key_cache_s = float(cfg.auth.key_cache_s)
        self._wall = wall
        cached = self.key_cache_s > 0
        self._keys: TTLCache | None = TTLCache(max_keys, self.key_cache_s, timer=clock) if cached else None
        self._by_id: TTLCache | None = TTLCache(max_keys, self.key_cache_s, timer=clock) if cached else None
        self._pending: dict[str, asyncio.Future] = {}
        self._reserved: dict[str, int] = {}  # key id -> tokens reserved by its requests in progress here
        self.counts = {"key_cache_hits": 0, "verify_calls": 0}
        rl = cfg.rate_limits
        self.limiter: WindowLimiter | None = None
        if rl.enabled:
            self.limiter = WindowLimiter(
                per_key={k: float(getattr(rl.per_key, k)) for k in KINDS},
                per_ip={k: float(getattr(rl.per_ip, k)) for k in KINDS},
                exempt_ips=rl.exempt_ips,
                storage=storage if storage is not None else open_storage(rl.storage),
                where=rl.storage,
                ipv6_prefix=rl.ipv6_prefix,
            )
            if storage is None and rl.storage.startswith("memory://") and ingress_replicas > 1:
                log.warning(f"governor.rate_limits.storage is memory:// with up to {ingress_replicas} ingress replicas: "
                            "each replica counts on its own, so a client may get up to that many times each limit; "
                            "set it to redis://host:port to share the counters")

    # -----------------------------------------------------------------------------------------

    async def admit(self, token: str | None, ip: str, endpoint: str, admin_route: bool = False, *,
                    verify: Verify, reserve_tokens: int = 0, exempt: bool = True) -> Verdict:
        """Admit one request to ``endpoint`` from ``ip`` with the bearer ``token`` (None: none sent).
        ``verify(token)`` asks the state database (only on a key-cache miss). Raises :class:`StageError`
        when the database (on a miss) or the counter store cannot be reached.

        ``reserve_tokens`` (chats with a key): the most tokens this request may spend (prompt plus
        ``max_tokens``). The quota check counts the key's usage, plus the tokens reserved by its
        requests still in progress on this replica, plus these; when admitted they are reserved
        (``Verdict.reserved``) until :meth:`settle` releases them, so a burst cannot overshoot the
        quota. 0 reserves nothing (the request is admitted while the quota is not spent).

        ``exempt``: whether ``ip`` may be exempt from the per-address limit (``exempt_ips``); false
        for a request relayed by a proxy the ingress does not trust, whose peer address (loopback,
        say) stands for every client behind it."""
        if not (isinstance(reserve_tokens, int) and reserve_tokens >= 0):
            raise ValueError(f"reserve_tokens must be an integer >= 0, got {reserve_tokens!r}")
        kind = kind_of(endpoint)
        lim = self.limiter
        ip_limit = lim.ip_limit(kind, ip, exempt=exempt) if lim is not None else 0.0
        who = lim.who(ip) if ip_limit else ip  # an IPv6 client counts by its network
        ip_taken = False  # the address's allowance already spent by this request
        if ip_limit and self.auth_enabled:  # the address first, before any key is looked at
            d = await lim.test("ip", kind, who, ip_limit)
            if not d.allowed:
                return _too_many(d)
        kv: KeyVerdict | None = None
        entry: _Entry | None = None
        if self.auth_enabled:
            refusal = None
            if not token:
                refusal = Verdict(False, 401, *MISSING_KEY)
            elif not well_formed(token):
                refusal = Verdict(False, 401, *INVALID_KEY)
            else:
                if ip_limit and not self._cached(token):
                    # a database call may follow: spend the address's allowance first, so that requests
                    # from one address, however many at once, start at most its limit of calls
                    d = await lim.hit("ip", kind, who, ip_limit)
                    if not d.allowed:
                        return _too_many(d)
                    ip_taken = True
                entry = await self._entry(token, verify)
                kv = entry.verdict
                if not kv.ok:
                    refusal = Verdict(False, kv.status, kv.message, kv.code)
                elif admin_route and kv.scope != "admin":
                    refusal = Verdict(False, 403, f"this endpoint needs an admin key; key {kv.key_id} has scope "
                                      f"{kv.scope!r}", "insufficient_scope", key_id=kv.key_id, scope=kv.scope)
            if refusal is not None:
                if ip_limit and not ip_taken:  # a refused request still came from this address
                    await lim.hit("ip", kind, who, ip_limit)
                return refusal
        headers: dict[str, str] = {}
        if lim is not None:
            if kv is not None and (key_limit := lim.key_limit(kind, kv.rate_overrides)) > 0:
                d = await lim.hit("key", kind, kv.key_id, key_limit)
                if not d.allowed:
                    return _too_many(d, kv)
                headers = await lim.headers(kind, kv.key_id, key_limit)
            if ip_limit and not ip_taken:
                d = await lim.hit("ip", kind, who, ip_limit)
                if not d.allowed:
                    return _too_many(d, kv)
        if kv is None:
            return Verdict(True, key_id=None, scope="admin")  # auth off: the local operator may do anything
        if kind == "chat" and entry is not None:
            return self._hold(kv, entry, reserve_tokens, headers)
        return Verdict(True, key_id=kv.key_id, scope=kv.scope, headers=headers or None)

    async def reserve(self, token: str, tokens: int, *, verify: Verify) -> Verdict:
        """Hold ``tokens`` against the quota of the key ``token``, already admitted by :meth:`admit`
        (whose quota check had only its spent tokens to go on: the request's size is known once its
        body is read, after admission). Refused like :meth:`admit`'s quota check (429), or 400 when
        the request alone is larger than the key's daily or monthly quota, so it could never be
        admitted. Release the hold with :meth:`settle`."""
        if not (isinstance(tokens, int) and tokens >= 0):
            raise ValueError(f"tokens must be an integer >= 0, got {tokens!r}")
        entry = await self._entry(token, verify)  # the cached verdict: no database call
        kv = entry.verdict
        if not kv.ok:
            return Verdict(False, kv.status, kv.message, kv.code)
        return self._hold(kv, entry, tokens, {})

    def _hold(self, kv: KeyVerdict, entry: _Entry, tokens: int, headers: dict[str, str]) -> Verdict:
        """The quota and budget check of a chat that would hold ``tokens``; reserves them if allowed.
        No await from the check to the reservation: concurrent admissions see each other's."""
        for period, limit in (("daily", kv.daily_tokens), ("monthly", kv.monthly_tokens)):
            if limit is not None and tokens > limit:
                return Verdict(False, 400, f"this chat may use up to {tokens} tokens (its prompt with the retrieved "
                               f"passages, and its answer's max_tokens), more than key {kv.key_id}'s whole {period} "
                               f"quota of {limit} tokens: it could never be admitted; ask for a smaller max_tokens "
                               "or have the key's quota raised", "request_exceeds_quota", key_id=kv.key_id,
                               scope=kv.scope)
        now = self._wall()
        day_used, month_used = entry.used(now)
        reserved = self._reserved.get(kv.key_id, 0)
        qd = check_quota(day_used=day_used, month_used=month_used, daily_limit=kv.daily_tokens,
                         monthly_limit=kv.monthly_tokens, now=now, reserved=reserved, request=tokens)
        if not qd.allowed:
            return Verdict(False, 429, qd.message(), "insufficient_quota", qd.retry_after, kv.key_id, kv.scope)
        bd = check_budget(spent=entry.spent(now), budget=kv.daily_budget, currency=self.cfg.pricing.currency, now=now)
        if not bd.allowed:
            return Verdict(False, 429, bd.message(), "insufficient_quota", bd.retry_after, kv.key_id, kv.scope)
        if tokens:
            self._reserved[kv.key_id] = reserved + tokens
        if kv.daily_tokens:
            left = kv.daily_tokens - day_used - reserved - tokens
            headers = {**headers, "x-ratelimit-limit-tokens": str(kv.daily_tokens),
                       "x-ratelimit-remaining-tokens": str(max(0, left)),
                       "x-ratelimit-reset-tokens": openai_duration(next_utc_midnight(now) - now)}
        return Verdict(True, key_id=kv.key_id, scope=kv.scope, reserved=tokens, headers=headers or None)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """What a generation costs at ``governor.pricing``."""
        return cost_of(self.cfg.pricing, prompt_tokens, completion_tokens)

    def settle(self, key_id: str | None, reserved: int, used: int, cost: float = 0.0) -> None:
        """A request admitted with ``reserved`` tokens (its ``Verdict.reserved``) is over, having
        spent ``used``: release the reservation and count the usage (what :meth:`note_usage` does,
        so do not also call that for this request). Call it exactly once per admitted request,
        also when it failed or was cancelled (``used`` = what was generated so far, 0 if nothing;
        ``cost``: what they cost, :meth:`cost`)."""
        errors = [f"{name} must be an integer >= 0, got {v!r}" for name, v in (("reserved", reserved), ("used", used))
                  if not (isinstance(v, int) and v >= 0)]
        if errors:
            raise ValueError("; ".join(errors))
        if key_id is None:
            return
        left = self._reserved.get(key_id, 0) - reserved
        if left > 0:
            self._reserved[key_id] = left
        else:
            self._reserved.pop(key_id, None)
        if used or cost:
            self.note_usage(key_id, used, cost)

    def reserved(self, key_id: str) -> int:
        """Tokens reserved by ``key_id``'s requests in progress on this replica."""
        return self._reserved.get(key_id, 0)

    def note_usage(self, key_id: str | None, tokens: int, cost: float = 0.0) -> None:
        """Add tokens (and their cost) this replica recorded for ``key_id`` to its cached usage (the
        quota and budget checks see them before the next verification brings everyone's)."""
        if key_id is None or self._by_id is None:
            return
        entry = self._by_id.get(key_id)
        if entry is not None:
            entry.add(int(tokens), self._wall(), float(cost))

    def forget(self, token: str | None = None) -> None:
        """Drop the cached verdict of ``token`` (None: all of them)."""
        if self._keys is None:
            return
        if token is None:
            self._keys.clear()
            self._by_id.clear()
        else:
            entry = self._keys.pop(token_hash(token), None)
            if entry is not None and entry.verdict.key_id:
                self._by_id.pop(entry.verdict.key_id, None)

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "cached_keys": len(self._keys) if self._keys is not None else 0,
                "key_cache_s": self.key_cache_s,
                "storage": self.limiter.where if self.limiter is not None else None}

    # -----------------------------------------------------------------------------------------

    def _cached(self, token: str) -> bool:
        """Whether ``token``'s verdict is in the key cache (and fresh): no database call needed."""
        return self._keys is not None and token_hash(token) in self._keys

    async def _entry(self, token: str, verify: Verify) -> _Entry:
        """The cached verdict of ``token``, asking ``verify`` once on a miss (concurrent misses share it)."""
        h = token_hash(token)
        while True:
            if self._keys is not None and (entry := self._keys.get(h)) is not None:
                self.counts["key_cache_hits"] += 1
                return entry
            pending = self._pending.get(h)
            if pending is None:
                break
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if pending.cancelled() and not (task is not None and task.cancelling()):
                    continue  # the request that was asking went away, not this one: ask again
                raise
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[h] = fut
        try:
            self.counts["verify_calls"] += 1
            entry = _Entry(await verify(token))
        except Exception as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        except BaseException:
            fut.cancel()
            raise
        finally:
            if self._pending.get(h) is fut:
                del self._pending[h]
        if self._keys is not None:
            self._keys[h] = entry
            if entry.verdict.ok:
                self._by_id[entry.verdict.key_id] = entry
        fut.set_result(entry)
        return entry


def openai_duration(seconds: float) -> str:
    """A reset time as OpenAI writes it: ``"1s"``, ``"6m0s"``, ``"1h2m3s"``, ``"250ms"``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if h or m else "") + f"{sec}s"


def next_utc_midnight(now: float) -> float:
    return (now // 86400 + 1) * 86400


def _too_many(d: Decision, kv: KeyVerdict | None = None) -> Verdict:
    headers = {"x-ratelimit-limit-requests": f"{d.limit_per_min:g}", "x-ratelimit-remaining-requests": "0",
               "x-ratelimit-reset-requests": openai_duration(d.retry_after)} if d.scope == "key" else None
    return Verdict(False, 429, d.message(), "rate_limit_exceeded", d.retry_after,
                   kv.key_id if kv else None, kv.scope if kv else None, headers=headers)
