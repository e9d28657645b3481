"""API keys: their token format and hashing, the key record (:class:`ApiKey`) with its per-key
limits, the store's port (:class:`Keys`) and its implementation over the state database
(:class:`SqlKeys`, table ``api_keys``).

A token reads ``rg-<id>.<secret>``: ``id`` is 8 public hex characters (shown in lists and logs),
``secret`` is ``secrets.token_urlsafe(32)`` (256 random bits). Only ``sha256(token)`` is stored.
A plain fast hash is deliberate, not an oversight: slow hashes (bcrypt, argon2) exist to protect
guessable passwords, and nobody can brute-force 256 random bits however fast the hash is. sha256
keeps :meth:`SqlKeys.verify` at one indexed row lookup plus microseconds of hashing per request,
and the stored hash is compared to the token's in constant time.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol, get_args

from sqlalchemy import text

from state.db import Database

Scope = Literal["user", "admin", "metrics"]  # metrics: reads /metrics only (a scrape key)
SCOPES: tuple[str, ...] = get_args(Scope)
TOKEN_PREFIX = "rg-"
ID_LEN = 8
NAME_MAX = 100
RATE_FIELDS = ("chat_per_min", "search_per_min", "other_per_min")
QUOTA_FIELDS = ("daily_tokens", "monthly_tokens")
BUDGET_FIELDS = ("daily_budget",)  # cost per UTC day, in governor.pricing's currency

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


def _key(row: Any) -> ApiKey:
    return ApiKey(*row)


class Keys(Protocol):
    """The API key store."""

    def create(self, name: str, scope: str = "user", *, chat_per_min: float | None = None,
               search_per_min: float | None = None, other_per_min: float | None = None,
               daily_tokens: int | None = None, monthly_tokens: int | None = None,
               daily_budget: float | None = None) -> tuple[str, ApiKey]: ...
    def verify(self, token: str) -> ApiKey | None: ...
    def get(self, key_id: str) -> ApiKey | None: ...
    def list(self, *, include_revoked: bool = False) -> builtins.list[ApiKey]: ...
    def revoke(self, key_id: str) -> ApiKey: ...
    def count_active(self) -> int: ...


class SqlKeys:
    """:class:`Keys` over the state database (table ``api_keys``): creates, verifies, lists and
    revokes API keys. Safe to use from several threads (each call is a transaction of its own)."""

    def __init__(self, db: Database) -> None:
        self.db = db

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
        errors: list[str] = []
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
        insert = text(f"INSERT INTO api_keys (token_sha256, {_KEY_COLUMNS}) "
                      f"VALUES (:token_sha256, {', '.join(':' + f for f in _KEY_FIELDS)}) "
                      "ON CONFLICT (id) DO NOTHING")
        with self.db.tx() as c:
            while True:  # 2**32 ids: a clash is rare, but a clash must not be an error
                key_id = secrets.token_hex(ID_LEN // 2)
                token = f"{TOKEN_PREFIX}{key_id}.{secrets.token_urlsafe(32)}"
                key = ApiKey(key_id, name, scope, time.time(), None, **limits)  # type: ignore[arg-type]
                row = {"token_sha256": _hash(token), **{f: getattr(key, f) for f in _KEY_FIELDS}}
                if c.execute(insert, row).rowcount == 1:
                    break
        return token, key

    def verify(self, token: str) -> ApiKey | None:
        """The active key this token belongs to, else None (malformed, unknown, revoked, wrong secret)."""
        key_id = _parse_id(token)
        if key_id is None:
            return None
        with self.db.read() as c:
            row = c.execute(text(f"SELECT token_sha256, {_KEY_COLUMNS} FROM api_keys WHERE id = :id"),
                            {"id": key_id}).first()
        if row is None or not hmac.compare_digest(row[0], _hash(token)):
            return None
        key = _key(row[1:])
        return key if key.active else None

    def get(self, key_id: str) -> ApiKey | None:
        with self.db.read() as c:
            row = c.execute(text(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id = :id"), {"id": key_id}).first()
        return None if row is None else _key(row)

    def list(self, *, include_revoked: bool = False) -> builtins.list[ApiKey]:
        """The keys, oldest first (active ones only unless ``include_revoked``)."""
        where = "" if include_revoked else "WHERE revoked IS NULL"
        with self.db.read() as c:
            rows = c.execute(text(f"SELECT {_KEY_COLUMNS} FROM api_keys {where} ORDER BY created, id")).all()
        return [_key(r) for r in rows]

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key (at once: the next verify fails). Revoking again keeps the first revoke time."""
        with self.db.tx() as c:
            n = c.execute(text("UPDATE api_keys SET revoked = COALESCE(revoked, :now) WHERE id = :id"),
                          {"now": time.time(), "id": key_id}).rowcount
            row = c.execute(text(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id = :id"), {"id": key_id}).first()
        if n == 0 or row is None:
            raise AuthError(f"no key with id {key_id!r}; `ragraph keys list` shows them")
        return _key(row)

    def count_active(self) -> int:
        with self.db.read() as c:
            return int(c.execute(text("SELECT COUNT(*) FROM api_keys WHERE revoked IS NULL")).scalar_one())
