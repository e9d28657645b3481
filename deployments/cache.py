"""The response cache: a repeated question, asked the same way of the same index, is answered from memory.
It lives in this process (:class:`ResponseCache`) or in Redis, shared by every ingress replica
(:class:`RedisResponseCache`), as ``governor.cache.storage`` says (:func:`open_cache`).

The key covers everything that changes the answer (messages, RAG options, model, index version,
sampling) and ignores what does not (spacing, a trailing '?'). Case is kept: "US" and "us", or a
name and a word, are different questions. The index version is part of the key, so a live index
swap makes old entries unreachable without a flush; the TTL and the size bound then retire them.
Values are returned as stored: put immutable values (or copies) in it.

The key also names the API key that asked (``governor.cache.shared_across_keys: false``, the
default): one key never gets another's answer, learns that somebody asked that question, or sees
another request's id. A shared cache (``true``) serves any key, so a hit must not show the id of
the request that filled it (:func:`hit_request_id`).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from cachetools import TTLCache

from common.redisurl import with_password


def normalise(text: str) -> str:
    """Collapse whitespace and drop trailing '?', '!', '.' and spaces; case is kept."""
    return " ".join(text.split()).rstrip("?!. ")


def cache_key(
    *,
    messages: list[dict[str, Any]],
    rag: dict[str, Any],
    model: str,
    index_version: str | None,
    sampling: dict[str, Any],
    key_id: str | None = None,
    shared: bool = False,
) -> str:
    """sha256 hex of a canonical JSON of what determines the response, and of who asked:
    ``key_id`` (the API key's id; None: the anonymous caller of an auth-off service) is part of the
    key unless ``shared`` (``governor.cache.shared_across_keys``)."""
    doc = {
        "messages": [{"role": m["role"], "content": normalise(str(m.get("content") or ""))} for m in messages],
        "rag": rag,
        "model": model,
        "index_version": index_version,
        "sampling": sampling,
        "key_id": None if shared else key_id,
        "shared": bool(shared),
    }
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def hit_request_id(hit: dict[str, Any], *, shared: bool) -> str | None:
    """The ``cached_request_id`` a cache hit may show its caller: the id of the request that filled
    the entry when the cache is per key (the caller's own earlier request), never with a shared
    cache (it would be another key's request id)."""
    return None if shared else hit.get("request_id")


class ResponseCache:
    """A thread-safe TTL + LRU cache that counts hits, misses, stores and clears."""

    def __init__(self, *, max_entries: int, ttl_s: float, timer: Callable[[], float] = time.monotonic) -> None:
        errors = []
        if not (isinstance(max_entries, int) and max_entries >= 1):
            errors.append(f"max_entries must be an integer >= 1, got {max_entries!r}")
        if not ttl_s > 0:
            errors.append(f"ttl_s must be > 0, got {ttl_s!r}")
        if errors:
            raise ValueError("; ".join(errors))
        self.max_entries = max_entries
        self.ttl_s = float(ttl_s)
        self._c: TTLCache[str, Any] = TTLCache(maxsize=max_entries, ttl=ttl_s, timer=timer)
        self._lock = threading.Lock()
        self.hits = self.misses = self.stores = self.clears = 0

    def get(self, key: str) -> Any | None:
        with self._lock:
            value = self._c.get(key)
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
            return value

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._c[key] = value
            self.stores += 1

    def clear(self) -> int:
        """Drop every entry; returns how many live entries were dropped."""
        with self._lock:
            self._c.expire()
            n = len(self._c)
            self._c.clear()
            self.clears += 1
            return n

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._c.expire()
            lookups = self.hits + self.misses
            return {
                "entries": len(self._c),
                "max_entries": self.max_entries,
                "ttl_s": self.ttl_s,
                "hits": self.hits,
                "misses": self.misses,
                "hit_rate": self.hits / lookups if lookups else 0.0,
                "stores": self.stores,
                "clears": self.clears,
            }


class AnswerCache(Protocol):
    """Where answers are cached (``governor.cache.storage``): :class:`ResponseCache` in this process,
    :class:`RedisResponseCache` shared by every ingress replica."""

    def get(self, key: str) -> Any | None: ...
    def put(self, key: str, value: Any) -> None: ...
    def clear(self) -> int: ...
    def stats(self) -> dict[str, Any]: ...


class RedisResponseCache:
    """The same cache in Redis, shared by every ingress replica: each answer a JSON string under
    ``ragraph:cache:<key>`` that expires after ``ttl_s``, and a sorted set of the keys by the time
    they were stored, trimmed to the newest ``max_entries`` on every put. Hit and miss counts are
    this process's (what it looked up); ``entries`` is the shared count. A Redis that does not
    answer within about a second raises (the pipeline counts it as a miss)."""

    PREFIX = "ragraph:cache:"
    INDEX = "ragraph:cache-index"

    def __init__(self, url: str, *, max_entries: int, ttl_s: float, timeout_s: float = 1.0) -> None:
        import redis

        ResponseCache(max_entries=max_entries, ttl_s=ttl_s)  # the same argument checks
        self.max_entries, self.ttl_s = max_entries, float(ttl_s)
        self._r = redis.Redis.from_url(with_password(url), socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._lock = threading.Lock()
        self.hits = self.misses = self.stores = self.clears = 0

    def get(self, key: str) -> Any | None:
        raw = self._r.get(self.PREFIX + key)
        with self._lock:
            if raw is None:
                self.misses += 1
            else:
                self.hits += 1
        return json.loads(raw) if raw is not None else None

    def put(self, key: str, value: Any) -> None:
        now = time.time()
        pipe = self._r.pipeline(transaction=True)
        pipe.set(self.PREFIX + key, json.dumps(value, separators=(",", ":")), px=int(self.ttl_s * 1000))
        pipe.zadd(self.INDEX, {key: now})
        pipe.zremrangebyscore(self.INDEX, "-inf", now - self.ttl_s)  # expired entries leave the index
        pipe.zrange(self.INDEX, 0, -self.max_entries - 1)  # the oldest beyond max_entries
        *_, old = pipe.execute()
        if old:
            pipe = self._r.pipeline(transaction=True)
            pipe.delete(*(self.PREFIX + k.decode() for k in old))
            pipe.zrem(self.INDEX, *old)
            pipe.execute()
        with self._lock:
            self.stores += 1

    def clear(self) -> int:
        """Drop every entry (of every replica); returns how many live entries were dropped."""
        keys = [k.decode() for k in self._r.zrange(self.INDEX, 0, -1)]
        n = 0
        for i in range(0, len(keys), 500):
            n += self._r.delete(*(self.PREFIX + k for k in keys[i:i + 500]))
        self._r.zrem(self.INDEX, *keys) if keys else None
        with self._lock:
            self.clears += 1
        return n

    def stats(self) -> dict[str, Any]:
        self._r.zremrangebyscore(self.INDEX, "-inf", time.time() - self.ttl_s)
        entries = self._r.zcard(self.INDEX)
        with self._lock:
            lookups = self.hits + self.misses
            return {"entries": entries, "max_entries": self.max_entries, "ttl_s": self.ttl_s, "hits": self.hits,
                    "misses": self.misses, "hit_rate": self.hits / lookups if lookups else 0.0,
                    "stores": self.stores, "clears": self.clears}


def open_cache(url: str, *, max_entries: int, ttl_s: float) -> AnswerCache:
    """The cache a ``governor.cache.storage`` URL names: ``memory://`` or ``redis://``/``rediss://``."""
    if url.startswith("memory://"):
        return ResponseCache(max_entries=max_entries, ttl_s=ttl_s)
    if url.startswith(("redis://", "rediss://")):
        return RedisResponseCache(url, max_entries=max_entries, ttl_s=ttl_s)
    raise ValueError(f"governor.cache.storage: unknown scheme in {url!r}; use memory:// or redis://host:port")
