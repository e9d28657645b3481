"""API keys and per-key token usage, in one SQLite file.

A token reads ``rg-<id>.<secret>``: ``id`` is 8 public hex characters (shown in lists and logs),
``secret`` is ``secrets.token_urlsafe(32)`` (256 random bits). Only ``sha256(token)`` is stored.
A plain fast hash is deliberate, not an oversight: slow hashes (bcrypt, argon2) exist to protect
guessable passwords, and nobody can brute-force 256 random bits however fast the hash is. sha256
keeps :meth:`KeyStore.verify` at one indexed row lookup plus microseconds of hashing per request.

:class:`UsageLedger` commits each request's token counts before the reply is finished, with
``synchronous=FULL`` in WAL mode, so a crash or restart loses no record.

Both classes may share one file (separate tables); each holds its own connection and a lock, so
one instance can be used from several threads.

The file holds key hashes and who used how much: it is created 0600 (SQLite's -wal and -shm
files take the same mode), and the folders made for it 0700; an existing file of ours that others
could read is tightened to 0600 (:func:`private_file`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

from common.files import private_dir

log = logging.getLogger("ray.serve")

Scope = Literal["user", "admin", "metrics"]  # metrics: reads /metrics only (a scrape key)
SCOPES: tuple[str, ...] = get_args(Scope)
TOKEN_PREFIX = "rg-"
ID_LEN = 8
NAME_MAX = 100
RATE_FIELDS = ("chat_per_min", "search_per_min", "other_per_min")
QUOTA_FIELDS = ("daily_tokens", "monthly_tokens")
BUDGET_FIELDS = ("daily_budget",)  # cost per UTC day, in governor.pricing's currency

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    scope TEXT NOT NULL,
    token_sha256 TEXT NOT NULL,
    created REAL NOT NULL,
    revoked REAL,
    chat_per_min REAL,
    search_per_min REAL,
    other_per_min REAL,
    daily_tokens INTEGER,
    monthly_tokens INTEGER,
    daily_budget REAL
);
CREATE TABLE IF NOT EXISTS usage (
    key_id TEXT NOT NULL,
    period TEXT NOT NULL,          -- 'YYYY-MM-DD' (UTC day) or 'YYYY-MM' (UTC month)
    requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    prefill_s REAL NOT NULL DEFAULT 0,   -- engine seconds: prompt processing (to the first token)
    decode_s REAL NOT NULL DEFAULT 0,    -- engine seconds: the rest of the answer
    cost REAL NOT NULL DEFAULT 0,        -- governor.pricing at the time of each request
    PRIMARY KEY (key_id, period)
);
"""
# Columns added after the first release: a database made before them gets them on open (_migrate).
_ADDED_COLUMNS = {
    "api_keys": (("daily_budget", "REAL"),),
    "usage": (("prefill_s", "REAL NOT NULL DEFAULT 0"), ("decode_s", "REAL NOT NULL DEFAULT 0"),
              ("cost", "REAL NOT NULL DEFAULT 0")),
}
_KEY_FIELDS = ("id", "name", "scope", "created", "revoked", *RATE_FIELDS, *QUOTA_FIELDS, *BUDGET_FIELDS)  # ApiKey's field order
_KEY_COLUMNS = ", ".join(_KEY_FIELDS)


class AuthError(ValueError):
    """A bad argument to the key store (unknown id, bad scope, bad limit); the message says what to do."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    name: str
    scope: Scope
    created: float
    revoked: float | None
    # Per-key overrides of the configured limits; None means "use the config default".
    chat_per_min: float | None = None
    search_per_min: float | None = None
    other_per_min: float | None = None
    daily_tokens: int | None = None
    monthly_tokens: int | None = None
    daily_budget: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked is None

    def rate_overrides(self) -> dict[str, float | None]:
        """``{"chat": ..., "search": ..., "other": ...}``, the shape ``RateLimiter.check`` takes."""
        return {f.removesuffix("_per_min"): getattr(self, f) for f in RATE_FIELDS}

    def public(self) -> dict[str, Any]:
        """JSON-able view for listings; the token and its hash are never part of an ApiKey."""
        return {**asdict(self), "active": self.active}


def private_file(path: Path) -> None:
    """Make sure ``path`` exists readable by its owner only: missing folders are created 0700, a
    missing file 0600; an existing file (and its SQLite -wal/-shm files) owned by this user with
    group or other bits is tightened to 0600. Folders that already exist are left as they are."""
    path = Path(path)
    private_dir(path.parent)
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            st = f.stat()
        except FileNotFoundError:
            continue
        if st.st_mode & 0o077 and st.st_uid == os.getuid():
            log.warning(f"{f}: was readable by others (mode {stat.filemode(st.st_mode)}); setting it to 0600")
            os.chmod(f, 0o600)


def connect_db(path: Path, *, error: type[Exception] = AuthError) -> sqlite3.Connection:
    """Open (creating if needed, 0600 in 0700 folders: :func:`private_file`) a SQLite database the
    way every store here does: WAL, synchronous=FULL, 5 s busy timeout, transactions by :func:`_tx`.
    Raises ``error`` when the file system refuses WAL mode."""
    path = Path(path)
    private_file(path)
    # isolation_level=None: we issue BEGIN/COMMIT ourselves (see _tx), nothing is left pending.
    conn = sqlite3.connect(path, check_same_thread=False, timeout=5.0, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode.lower() != "wal":
        conn.close()
        raise error(f"{path}: SQLite refused WAL mode (got {mode!r}); put the file on a local disk")
    conn.execute("PRAGMA synchronous = FULL")
    private_file(path)  # the -wal/-shm files, now that they exist
    return conn


def open_db(path: Path) -> sqlite3.Connection:
    """The auth database (:func:`connect_db`), its tables created or migrated."""
    conn = connect_db(path)
    conn.executescript(_SCHEMA)
    _migrate(conn)
    return conn


def _migrate(conn: sqlite3.Connection) -> None:
    """Add the columns of :data:`_ADDED_COLUMNS` that an older database lacks (existing rows get
    the defaults). Under the write lock, and checked again there: several processes may open an
    old file at once, and only the first adds each column."""

    def missing() -> list[tuple[str, str, str]]:
        out = []
        for table, cols in _ADDED_COLUMNS.items():
            have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
            out += [(table, name, decl) for name, decl in cols if name not in have]
        return out

    if not missing():
        return
    with _tx(conn):
        for table, name, decl in missing():
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")


@contextmanager
def _tx(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    # IMMEDIATE takes the write lock up front, so two writers wait (busy_timeout) instead of failing on upgrade.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


token_hash = _hash  # what the ingress's key cache is keyed by (deployments.admission): never the token itself


def _parse_id(token: str) -> str | None:
    """The key id of a well-formed token, else None (no exception: bad tokens are ordinary input)."""
    if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX):
        return None
    key_id, dot, secret = token[len(TOKEN_PREFIX) :].partition(".")
    if not dot or len(key_id) != ID_LEN or not secret or len(token) > 200:
        return None
    return key_id


def well_formed(token: str) -> bool:
    """Whether ``token`` could be a key at all (``rg-<8 hex>.<secret>``): the ingress refuses the rest without
    asking the governor."""
    return _parse_id(token) is not None


def _check_limit(field: str, value: object, errors: list[str]) -> None:
    if value is None:
        return
    ints_only = field in QUOTA_FIELDS
    ok_type = isinstance(value, int) if ints_only else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or not value > 0:  # `not >` also catches NaN
        kind = "an integer" if ints_only else "a number"
        errors.append(f"{field} must be {kind} > 0 or None (the config default), got {value!r}")


class KeyStore:
    """Creates, verifies, lists and revokes API keys."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn = open_db(self.path)
        self._lock = threading.Lock()

    def create(
        self,
        name: str,
        scope: str = "user",
        *,
        chat_per_min: float | None = None,
        search_per_min: float | None = None,
        other_per_min: float | None = None,
        daily_tokens: int | None = None,
        monthly_tokens: int | None = None,
        daily_budget: float | None = None,
    ) -> tuple[str, ApiKey]:
        """Make a key; returns ``(token, key)``. The token is shown once and cannot be recovered."""
        limits = dict(
            chat_per_min=chat_per_min,
            search_per_min=search_per_min,
            other_per_min=other_per_min,
            daily_tokens=daily_tokens,
            monthly_tokens=monthly_tokens,
            daily_budget=daily_budget,
        )
        errors = []
        name = name.strip() if isinstance(name, str) else name
        if not isinstance(name, str) or not name or len(name) > NAME_MAX:
            errors.append(f"name must be 1 to {NAME_MAX} characters, got {name!r}")
        if scope not in SCOPES:
            errors.append(f"scope must be one of {list(SCOPES)}, got {scope!r}")
        for field, value in limits.items():
            _check_limit(field, value, errors)
        if errors:
            raise AuthError(f"cannot create key ({len(errors)} error(s)): " + "; ".join(errors))
        limits = {k: (float(v) if k in (*RATE_FIELDS, *BUDGET_FIELDS) and v is not None else v)
                  for k, v in limits.items()}
        with self._lock, _tx(self._conn) as c:
            while True:  # 2**32 ids: a clash is rare, but a clash must not be an error
                key_id = secrets.token_hex(ID_LEN // 2)
                if c.execute("SELECT 1 FROM api_keys WHERE id = ?", (key_id,)).fetchone() is None:
                    break
            token = f"{TOKEN_PREFIX}{key_id}.{secrets.token_urlsafe(32)}"
            key = ApiKey(key_id, name, scope, time.time(), None, **limits)  # type: ignore[arg-type]
            c.execute(
                f"INSERT INTO api_keys (token_sha256, {_KEY_COLUMNS}) VALUES (?{', ?' * len(_KEY_FIELDS)})",
                (_hash(token), *(getattr(key, f) for f in _KEY_FIELDS)),
            )
        return token, key

    def verify(self, token: str) -> ApiKey | None:
        """The active key this token belongs to, else None (malformed, unknown, revoked, wrong secret)."""
        key_id = _parse_id(token)
        if key_id is None:
            return None
        with self._lock:
            row = self._conn.execute(
                f"SELECT token_sha256, {_KEY_COLUMNS} FROM api_keys WHERE id = ?", (key_id,)
            ).fetchone()
        if row is None or not hmac.compare_digest(row[0], _hash(token)):
            return None
        key = ApiKey(*row[1:])
        return key if key.active else None

    def get(self, key_id: str) -> ApiKey | None:
        with self._lock:
            row = self._conn.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return None if row is None else ApiKey(*row)

    def list(self, *, include_revoked: bool = False) -> list[ApiKey]:
        where = "" if include_revoked else "WHERE revoked IS NULL"
        with self._lock:
            rows = self._conn.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys {where} ORDER BY created, rowid").fetchall()
        return [ApiKey(*r) for r in rows]

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key (at once: the next verify fails). Revoking again keeps the first revoke time."""
        with self._lock, _tx(self._conn) as c:
            cur = c.execute("UPDATE api_keys SET revoked = COALESCE(revoked, ?) WHERE id = ?", (time.time(), key_id))
        if cur.rowcount == 0:
            raise AuthError(f"no key with id {key_id!r}; `ragraph keys list` shows them")
        key = self.get(key_id)
        assert key is not None
        return key

    def count_active(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM api_keys WHERE revoked IS NULL").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def periods(now: float | None = None) -> tuple[str, str]:
    """``('YYYY-MM-DD', 'YYYY-MM')``: the UTC day and month that contain ``now``."""
    t = datetime.fromtimestamp(time.time() if now is None else now, tz=UTC)
    return t.strftime("%Y-%m-%d"), t.strftime("%Y-%m")


def _period_dict(period: str, row: tuple | None) -> dict[str, Any]:
    n, p, c, prefill, decode, cost = row or (0, 0, 0, 0.0, 0.0, 0.0)
    return {"period": period, "requests": n, "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prefill_s": round(prefill, 6), "decode_s": round(decode, 6), "engine_s": round(prefill + decode, 6),
            "cost": round(cost, 8)}


class UsageLedger:
    """Token usage per key per UTC day and per UTC month, written (committed, synchronous=FULL) after each
    request, so a crash or restart loses no record."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn = open_db(self.path)
        self._lock = threading.Lock()

    def record(self, key_id: str, *, prompt_tokens: int, completion_tokens: int, prefill_s: float = 0.0,
               decode_s: float = 0.0, cost: float = 0.0, now: float | None = None) -> None:
        """Add one request (its tokens, engine seconds and cost) to the key's day and month rows, in
        one committed transaction."""
        for field, v in (("prompt_tokens", prompt_tokens), ("completion_tokens", completion_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{field} must be an integer >= 0, got {v!r}")
        for field, v in (("prefill_s", prefill_s), ("decode_s", decode_s), ("cost", cost)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0 or v == float("inf"):
                raise ValueError(f"{field} must be a finite number >= 0, got {v!r}")
        upsert = (
            "INSERT INTO usage (key_id, period, requests, prompt_tokens, completion_tokens, prefill_s, decode_s, cost) "
            "VALUES (?, ?, 1, ?, ?, ?, ?, ?) "
            "ON CONFLICT (key_id, period) DO UPDATE SET requests = requests + 1, "
            "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
            "completion_tokens = completion_tokens + excluded.completion_tokens, "
            "prefill_s = prefill_s + excluded.prefill_s, decode_s = decode_s + excluded.decode_s, "
            "cost = cost + excluded.cost"
        )
        with self._lock, _tx(self._conn) as c:
            for period in periods(now):
                c.execute(upsert, (key_id, period, prompt_tokens, completion_tokens, float(prefill_s),
                                   float(decode_s), float(cost)))

    def _rows(self, key_id: str, day: str, month: str) -> dict[str, tuple]:
        """``{period: (requests, prompt_tokens, completion_tokens, prefill_s, decode_s, cost)}``."""
        rows = self._conn.execute(
            "SELECT period, requests, prompt_tokens, completion_tokens, prefill_s, decode_s, cost FROM usage "
            "WHERE key_id = ? AND period IN (?, ?)",
            (key_id, day, month),
        ).fetchall()
        return {r[0]: r[1:] for r in rows}

    def usage(self, key_id: str, *, now: float | None = None) -> dict[str, Any]:
        day, month = periods(now)
        with self._lock:
            rows = self._rows(key_id, day, month)
        return {
            "key_id": key_id,
            "day": _period_dict(day, rows.get(day)),
            "month": _period_dict(month, rows.get(month)),
        }

    def all_usage(self, *, now: float | None = None) -> list[dict[str, Any]]:
        """:meth:`usage` of every key with a record this UTC month, sorted by key id."""
        _, month = periods(now)
        with self._lock:
            rows = self._conn.execute("SELECT key_id FROM usage WHERE period = ? ORDER BY key_id", (month,))
            ids = [r[0] for r in rows]
        return [self.usage(k, now=now) for k in ids]

    def standing(self, key_id: str, *, now: float | None = None) -> tuple[int, int, float]:
        """``(day total_tokens, month total_tokens, day cost)``: what admission checks (the quotas
        and the daily budget), in one indexed query."""
        day, month = periods(now)
        with self._lock:
            rows = self._rows(key_id, day, month)
        d, m = rows.get(day), rows.get(month)
        return (sum(d[1:3]) if d else 0, sum(m[1:3]) if m else 0, float(d[5]) if d else 0.0)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
