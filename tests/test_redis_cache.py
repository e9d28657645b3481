"""The answer cache in a real Redis (deployments.cache.RedisResponseCache): what two ingress
replicas share, its TTL and size bound, and a Redis that is down failing fast."""

import time

import pytest

from deployments.cache import RedisResponseCache, ResponseCache, open_cache


def test_two_replicas_share_answers(redis_server):
    a = RedisResponseCache(redis_server.url, max_entries=10, ttl_s=60)
    b = RedisResponseCache(redis_server.url, max_entries=10, ttl_s=60)
    a.clear()
    assert b.get("k") is None
    a.put("k", {"text": "hello", "usage": {"prompt_tokens": 3}})
    assert b.get("k") == {"text": "hello", "usage": {"prompt_tokens": 3}}
    assert b.stats()["entries"] == 1 and b.stats()["hits"] == 1 and b.stats()["misses"] == 1


def test_entries_expire_after_the_ttl(redis_server):
    c = RedisResponseCache(redis_server.url, max_entries=10, ttl_s=0.3)
    c.put("k", {"v": 1})
    assert c.get("k") == {"v": 1}
    time.sleep(0.5)
    assert c.get("k") is None
    assert c.stats()["entries"] == 0


def test_the_oldest_entries_go_past_max_entries(redis_server):
    c = RedisResponseCache(redis_server.url, max_entries=3, ttl_s=60)
    c.clear()
    for i in range(5):
        c.put(f"k{i}", {"i": i})
        time.sleep(0.002)
    assert [c.get(f"k{i}") for i in range(5)] == [None, None, {"i": 2}, {"i": 3}, {"i": 4}]
    assert c.stats()["entries"] == 3


def test_clear_removes_only_cache_entries(redis_server):
    import redis

    r = redis.Redis.from_url(redis_server.url)
    r.set("someone-else", "x")
    c = RedisResponseCache(redis_server.url, max_entries=10, ttl_s=60)
    c.put("a", {"v": 1})
    c.put("b", {"v": 2})
    assert c.clear() == 2
    assert c.get("a") is None and r.get("someone-else") == b"x"


def test_a_stopped_redis_fails_fast(redis_server):
    c = RedisResponseCache(redis_server.url, max_entries=10, ttl_s=60)
    redis_server.stop()
    t = time.monotonic()
    with pytest.raises(Exception, match="(?i)connect|refused"):
        c.get("k")
    assert time.monotonic() - t < 2


def test_open_cache_picks_by_url(redis_url):
    assert isinstance(open_cache("memory://", max_entries=2, ttl_s=1), ResponseCache)
    assert isinstance(open_cache(redis_url, max_entries=2, ttl_s=1), RedisResponseCache)
    with pytest.raises(ValueError, match="memory:// or redis://"):
        open_cache("memcached://h", max_entries=2, ttl_s=1)
