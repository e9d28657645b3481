"""Which index version each retriever replica serves, so that an ingest job can report
``succeeded`` only once every replica serves what it published (read your writes).

Every retriever replica reports its version when it loads one and then at each of its index
polls (``retriever.reload_interval_s``); a replica that has not reported for ``stale_s`` is taken
as gone (stopped, or on a lost node) and not waited for.
"""

from __future__ import annotations

import time
from typing import Protocol

from sqlalchemy import text

from state.db import Database


class Serving(Protocol):
    def report(self, replica: str, version: str | None, *, host: str = "", now: float | None = None) -> None: ...
    def forget(self, replica: str) -> None: ...
    def versions(self, *, stale_s: float, now: float | None = None) -> dict[str, str | None]: ...


class SqlServing:
    """:class:`Serving` over the state database (table ``index_serving``)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def report(self, replica: str, version: str | None, *, host: str = "", now: float | None = None) -> None:
        with self.db.tx() as c:
            c.execute(text("INSERT INTO index_serving (replica, version, host, seen_at) "
                           "VALUES (:r, :v, :h, :t) ON CONFLICT (replica) DO UPDATE SET "
                           "version = excluded.version, host = excluded.host, seen_at = excluded.seen_at"),
                      {"r": replica, "v": version, "h": host, "t": time.time() if now is None else now})

    def forget(self, replica: str) -> None:
        with self.db.tx() as c:
            c.execute(text("DELETE FROM index_serving WHERE replica = :r"), {"r": replica})

    def versions(self, *, stale_s: float, now: float | None = None) -> dict[str, str | None]:
        """Replica -> the version it serves, for every replica heard from in the last ``stale_s``
        (older rows are dropped on the way)."""
        cutoff = (time.time() if now is None else now) - stale_s
        with self.db.tx() as c:
            c.execute(text("DELETE FROM index_serving WHERE seen_at < :c"), {"c": cutoff - 3600})
            rows = c.execute(text("SELECT replica, version FROM index_serving WHERE seen_at >= :c"), {"c": cutoff})
            return {r[0]: r[1] for r in rows}


def lagging(versions: dict[str, str | None], published: str) -> list[str]:
    """The replicas of ``versions`` that do not serve ``published`` yet (or a later version: names
    sort by their publish time)."""
    return sorted(r for r, v in versions.items() if v is None or v < published)
