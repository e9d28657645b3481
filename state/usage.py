"""Token usage per API key, per UTC day and per UTC month: the ledger's port (:class:`Usage`) and
its implementation over the state database (:class:`SqlUsage`, tables ``usage`` and
``usage_requests``).

Each request is charged exactly once: :meth:`SqlUsage.record` given the request's id writes that
id (table ``usage_requests``) and adds to the day and month rows in one transaction, and a second
record with the same (key, request id) changes nothing, so a write retried after a lost reply is
not counted twice. The ids are kept for :data:`REQUEST_RETENTION_S` and then deleted in batches
(:meth:`SqlUsage.purge_requests`), off the request path.

The counters are added to in the database (``requests = usage.requests + 1``), never read and
written back, so replicas recording at once on PostgreSQL lose no update; a committed record
survives a crash (SQLite: ``synchronous=FULL``, :mod:`state.db`).
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import text

from state.db import Database

REQUEST_RETENTION_S = 2 * 86400.0  # how long a request id is remembered (a retry comes within seconds)
PURGE_BATCH = 1000  # request ids deleted per purge transaction
REQUEST_ID_MAX = 200

_UPSERT = text(
    "INSERT INTO usage (key_id, period, requests, prompt_tokens, completion_tokens, prefill_s, decode_s, cost) "
    "VALUES (:key_id, :period, 1, :prompt_tokens, :completion_tokens, :prefill_s, :decode_s, :cost) "
    "ON CONFLICT (key_id, period) DO UPDATE SET requests = usage.requests + 1, "
    "prompt_tokens = usage.prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = usage.completion_tokens + excluded.completion_tokens, "
    "prefill_s = usage.prefill_s + excluded.prefill_s, decode_s = usage.decode_s + excluded.decode_s, "
    "cost = usage.cost + excluded.cost"
)
_CLAIM = text("INSERT INTO usage_requests (key_id, request_id, created) VALUES (:key_id, :request_id, :created) "
              "ON CONFLICT (key_id, request_id) DO NOTHING")
_ROWS = text("SELECT period, requests, prompt_tokens, completion_tokens, prefill_s, decode_s, cost FROM usage "
             "WHERE key_id = :key_id AND period IN (:day, :month)")
_PURGE = text("DELETE FROM usage_requests WHERE (key_id, request_id) IN "
              "(SELECT key_id, request_id FROM usage_requests WHERE created < :cutoff LIMIT :n)")


def periods(now: float | None = None) -> tuple[str, str]:
    """``('YYYY-MM-DD', 'YYYY-MM')``: the UTC day and month that contain ``now``."""
    t = datetime.fromtimestamp(time.time() if now is None else now, tz=UTC)
    return t.strftime("%Y-%m-%d"), t.strftime("%Y-%m")


def _period_dict(period: str, row: tuple | None) -> dict[str, Any]:
    n, p, c, prefill, decode, cost = row or (0, 0, 0, 0.0, 0.0, 0.0)
    n, p, c, prefill, decode, cost = int(n), int(p), int(c), float(prefill), float(decode), float(cost)
    return {"period": period, "requests": n, "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prefill_s": round(prefill, 6), "decode_s": round(decode, 6), "engine_s": round(prefill + decode, 6),
            "cost": round(cost, 8)}


class Usage(Protocol):
    """The usage ledger."""

    def record(self, key_id: str, *, prompt_tokens: int, completion_tokens: int, prefill_s: float = 0.0,
               decode_s: float = 0.0, cost: float = 0.0, request_id: str | None = None,
               now: float | None = None) -> bool: ...
    def usage(self, key_id: str, *, now: float | None = None) -> dict[str, Any]: ...
    def all_usage(self, *, now: float | None = None) -> list[dict[str, Any]]: ...
    def standing(self, key_id: str, *, now: float | None = None) -> tuple[int, int, float]: ...


class SqlUsage:
    """:class:`Usage` over the state database: token usage per key per UTC day and per UTC month,
    committed with each request. Safe to use from several threads and several processes."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def record(self, key_id: str, *, prompt_tokens: int, completion_tokens: int, prefill_s: float = 0.0,
               decode_s: float = 0.0, cost: float = 0.0, request_id: str | None = None,
               now: float | None = None) -> bool:
        """Add one request (its tokens, engine seconds and cost) to the key's day and month rows, in
        one committed transaction; True. With ``request_id``, once per (key, request id): a second
        record of the same request changes nothing and returns False."""
        for field, v in (("prompt_tokens", prompt_tokens), ("completion_tokens", completion_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{field} must be an integer >= 0, got {v!r}")
        for field, v in (("prefill_s", prefill_s), ("decode_s", decode_s), ("cost", cost)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0 or v == math.inf:
                raise ValueError(f"{field} must be a finite number >= 0, got {v!r}")
        if request_id is not None and (not isinstance(request_id, str) or not request_id
                                       or len(request_id) > REQUEST_ID_MAX):
            raise ValueError(f"request_id must be a string of 1 to {REQUEST_ID_MAX} characters or None, "
                             f"got {request_id!r}")
        now = time.time() if now is None else now
        values = {"key_id": key_id, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "prefill_s": float(prefill_s), "decode_s": float(decode_s), "cost": float(cost)}
        with self.db.tx() as c:
            if request_id is not None:
                claimed = c.execute(_CLAIM, {"key_id": key_id, "request_id": request_id, "created": now}).rowcount
                if claimed != 1:
                    return False  # already charged: the transaction commits nothing
            for period in periods(now):
                c.execute(_UPSERT, {**values, "period": period})
        return True

    def _rows(self, key_id: str, day: str, month: str) -> dict[str, tuple]:
        """``{period: (requests, prompt_tokens, completion_tokens, prefill_s, decode_s, cost)}``."""
        with self.db.read() as c:
            rows = c.execute(_ROWS, {"key_id": key_id, "day": day, "month": month}).all()
        return {r[0]: tuple(r[1:]) for r in rows}

    def usage(self, key_id: str, *, now: float | None = None) -> dict[str, Any]:
        day, month = periods(now)
        rows = self._rows(key_id, day, month)
        return {
            "key_id": key_id,
            "day": _period_dict(day, rows.get(day)),
            "month": _period_dict(month, rows.get(month)),
        }

    def all_usage(self, *, now: float | None = None) -> list[dict[str, Any]]:
        """:meth:`usage` of every key with a record this UTC month, sorted by key id (one read)."""
        day, month = periods(now)
        with self.db.read() as c:
            rows = c.execute(text(
                "SELECT key_id, period, requests, prompt_tokens, completion_tokens, prefill_s, decode_s, cost "
                "FROM usage WHERE period IN (:day, :month) ORDER BY key_id"), {"day": day, "month": month}).all()
        by_key: dict[str, dict[str, tuple]] = {}
        for r in rows:
            by_key.setdefault(r[0], {})[r[1]] = tuple(r[2:])
        return [{"key_id": k, "day": _period_dict(day, p.get(day)), "month": _period_dict(month, p.get(month))}
                for k, p in sorted(by_key.items()) if month in p]

    def standing(self, key_id: str, *, now: float | None = None) -> tuple[int, int, float]:
        """``(day total_tokens, month total_tokens, day cost)``: what admission checks (the quotas
        and the daily budget), in one indexed query."""
        day, month = periods(now)
        rows = self._rows(key_id, day, month)
        d, m = rows.get(day), rows.get(month)
        return (int(d[1] + d[2]) if d else 0, int(m[1] + m[2]) if m else 0, float(d[5]) if d else 0.0)

    def purge_requests(self, *, older_than_s: float = REQUEST_RETENTION_S, batch: int = PURGE_BATCH,
                       now: float | None = None) -> int:
        """Forget the request ids recorded more than ``older_than_s`` ago, in transactions of at most
        ``batch`` rows each (the usage counters are kept); returns how many went."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
        cutoff = (time.time() if now is None else now) - older_than_s
        gone = 0
        while True:
            with self.db.tx() as c:
                n = c.execute(_PURGE, {"cutoff": cutoff, "n": batch}).rowcount
            gone += n
            if n < batch:
                return gone
