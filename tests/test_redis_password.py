"""A Redis that requires a password, reached with a URL that carries none: the limits and the
answer cache take the password from RAGRAPH_REDIS_PASSWORD (common/redisurl.py), so neither the
config nor a cluster manifest holds it. Against a real ``redis-server --requirepass``: with the
variable set, two admissions share one budget and the cache answers; without it, admission with
auth on fails closed and the error names the URL, never a password."""

from __future__ import annotations

import asyncio

import pytest

from common.redisurl import REDIS_PASSWORD_ENV, with_password, without_password
from deployments.admission import Admission
from deployments.cache import RedisResponseCache
from deployments.errors import StageError
from test_redis_limits import Verify, gov_cfg, token, unique

SECRET = "s3cr:et/@pw"  # characters a URL must quote


@pytest.fixture
def locked_redis():
    from servers import RedisServer

    server = RedisServer(password=SECRET)
    try:
        yield server
    finally:
        server.close()


@pytest.mark.parametrize("url, env, want", [
    ("redis://h:6379/0", {REDIS_PASSWORD_ENV: "pw"}, "redis://:pw@h:6379/0"),
    ("rediss://h:6380/2?ssl_cert_reqs=none", {REDIS_PASSWORD_ENV: "pw"}, "rediss://:pw@h:6380/2?ssl_cert_reqs=none"),
    ("redis://app@h:6379", {REDIS_PASSWORD_ENV: "pw"}, "redis://app:pw@h:6379"),
    ("redis://[::1]:6379/0", {REDIS_PASSWORD_ENV: "a b/c"}, "redis://:a%20b%2Fc@[::1]:6379/0"),
    ("redis://:inurl@h:6379", {REDIS_PASSWORD_ENV: "pw"}, "redis://:inurl@h:6379"),  # the URL's own wins
    ("redis://h:6379", {REDIS_PASSWORD_ENV: ""}, "redis://h:6379"),
    ("redis://h:6379", {}, "redis://h:6379"),
    ("memory://", {REDIS_PASSWORD_ENV: "pw"}, "memory://"),
])
def test_with_password(url, env, want):
    assert with_password(url, env) == want


def test_without_password_masks_it():
    assert without_password("redis://app:hunter2@h:6379/0") == "redis://app:***@h:6379/0"
    assert without_password("redis://:hunter2@h:6379") == "redis://:***@h:6379"
    assert without_password("redis://h:6379") == "redis://h:6379"


def test_limits_and_cache_reach_a_locked_redis_with_the_password_from_the_environment(locked_redis, monkeypatch):
    monkeypatch.setenv(REDIS_PASSWORD_ENV, SECRET)
    assert SECRET not in locked_redis.url
    cfg = gov_cfg(locked_redis.url, per_key={"search": 3})
    verify = Verify(f"key-{unique()}")
    tok = token()

    async def go():
        a, b = Admission(cfg), Admission(cfg)  # two replicas, each its own storage on the one Redis
        return [await (a if i % 2 else b).admit(tok, "10.0.0.1", "/v1/search", verify=verify) for i in range(5)]

    got = asyncio.run(go())
    assert [v.allowed for v in got] == [True, True, True, False, False]
    cache = RedisResponseCache(locked_redis.url, max_entries=10, ttl_s=60)
    cache.put("k", {"text": "hi"})
    assert RedisResponseCache(locked_redis.url, max_entries=10, ttl_s=60).get("k") == {"text": "hi"}


def test_without_the_password_admission_fails_closed_and_names_no_password(locked_redis, monkeypatch):
    monkeypatch.delenv(REDIS_PASSWORD_ENV, raising=False)
    cfg = gov_cfg(locked_redis.url, per_key={"search": 3})

    async def go():
        return await Admission(cfg).admit(token(), "10.0.0.1", "/v1/search", verify=Verify(f"key-{unique()}"))

    with pytest.raises(StageError) as e:
        asyncio.run(go())
    assert (e.value.stage, e.value.kind) == ("rate_limits", "unavailable")
    assert str(e.value).startswith(f"rate_limits unavailable: {locked_redis.url}: "), str(e.value)
    assert "auth" in str(e.value).lower(), str(e.value)  # Redis says why: authentication required
    monkeypatch.setenv(REDIS_PASSWORD_ENV, "wrong")
    with pytest.raises(StageError) as e:
        asyncio.run(go())
    assert "wrong" not in str(e.value) and SECRET not in str(e.value)


def test_a_password_written_in_the_url_is_masked_in_the_error(locked_redis, monkeypatch):
    monkeypatch.delenv(REDIS_PASSWORD_ENV, raising=False)
    url = locked_redis.url.replace("redis://", "redis://:not-the-password@")
    cfg = gov_cfg(url, per_key={"search": 3})

    async def go():
        return await Admission(cfg).admit(token(), "10.0.0.1", "/v1/search", verify=Verify(f"key-{unique()}"))

    with pytest.raises(StageError) as e:
        asyncio.run(go())
    assert "not-the-password" not in str(e.value)
    assert str(e.value).startswith(f"rate_limits unavailable: {without_password(url)}: "), str(e.value)
    assert ":***@" in str(e.value)
