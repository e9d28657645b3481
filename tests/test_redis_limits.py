"""Rate limits shared by ingress replicas through a real Redis (governor.rate_limits.storage:
redis://, deployments/admission.py): two limiters or two Admission objects, each with a storage of
its own opened on the same redis-server as two replicas would, hold one budget between them, not
one each; and with that Redis stopped, admission with auth on fails closed (it raises a
``rate_limits`` StageError, which the ingress answers with 503) instead of admitting unlimited.

The key verdict is built here (a KeyVerdict as Governor.verify returns it): the store under test is
the counter store, not the key database."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from common.config import GovernorConfig
from deployments.admission import Admission, WindowLimiter, open_storage
from deployments.errors import StageError
from deployments.governor import KeyVerdict
from state.usage import periods

OFF = {"chat": 0, "search": 0, "other": 0}


def unique() -> str:
    """A fresh name: the session's Redis is shared by other tests, whose counters must not meet ours."""
    return uuid.uuid4().hex[:12]


def gov_cfg(storage: str, *, auth: bool = True, per_key=None, per_ip=None) -> GovernorConfig:
    return GovernorConfig.model_validate({
        "auth": {"enabled": auth, "key_cache_s": 30},
        "rate_limits": {"enabled": True, "storage": storage, "per_key": {**OFF, **(per_key or {})},
                        "per_ip": {**OFF, **(per_ip or {})}},
    })


def token() -> str:
    return f"rg-{unique()[:8]}.{unique()}{unique()}"  # well formed: rg-<8 hex>.<secret> (state.keys.well_formed)


class Verify:
    """``verify`` as the ingress passes it: every token is one active key, ``key_id``; counts calls."""

    def __init__(self, key_id: str) -> None:
        self.key_id, self.calls = key_id, 0

    async def __call__(self, tok: str) -> KeyVerdict:
        self.calls += 1
        day, month = periods(time.time())
        return KeyVerdict(200, key_id=self.key_id, scope="user", day=day, month=month)


def test_the_token_helper_is_well_formed():
    from state.keys import well_formed

    assert well_formed(token())


def test_two_limiters_on_one_redis_share_one_budget(redis_url):
    """Two replicas' limiters, each with its own connection to the one Redis: a key allowed 7
    searches a minute gets 7 in all, alternating between them, not 14; so does an address."""
    who, ip = f"key-{unique()}", f"10.{unique()}"

    async def go():
        a, b = (WindowLimiter(per_key={**OFF, "search": 7}, per_ip={**OFF, "other": 4}, storage=open_storage(redis_url),
                              where=redis_url) for _ in range(2))
        keys = [await (a if i % 2 else b).hit("key", "search", who, 7) for i in range(20)]
        ips = [await (a if i % 2 else b).hit("ip", "other", ip, 4) for i in range(10)]
        # a third replica sees the spent budget too, and when it frees
        c = WindowLimiter(per_key={**OFF, "search": 7}, per_ip=OFF, storage=open_storage(redis_url), where=redis_url)
        third = await c.test("key", "search", who, 7)
        return keys, ips, third

    keys, ips, third = asyncio.run(go())
    assert sum(d.allowed for d in keys) == 7 and all(d.allowed for d in keys[:7])
    assert sum(d.allowed for d in ips) == 4
    refused = [d for d in keys if not d.allowed]
    assert {d.scope for d in refused} == {"key"} and all(0 < d.retry_after <= 60 for d in refused)
    assert not third.allowed and 0 < third.retry_after <= 60


def test_two_admissions_on_one_redis_share_the_key_limit(redis_url):
    """Two Admission objects opening governor.rate_limits.storage themselves, as two ingress
    replicas do: one key's per-key limit (5 searches a minute) holds across both, and each
    replica's x-ratelimit-remaining-requests counts the other's requests too."""
    cfg = gov_cfg(redis_url, per_key={"search": 5})
    verify = Verify(f"key-{unique()}")
    tok = token()

    async def go():
        a, b = Admission(cfg, ingress_replicas=2), Admission(cfg, ingress_replicas=2)
        return [await (a if i % 2 else b).admit(tok, "10.0.0.1", "/v1/search", verify=verify) for i in range(12)]

    got = asyncio.run(go())
    assert [v.allowed for v in got] == [True] * 5 + [False] * 7
    assert [v.headers["x-ratelimit-remaining-requests"] for v in got[:5]] == ["4", "3", "2", "1", "0"]
    assert {v.code for v in got[5:]} == {"rate_limit_exceeded"} and got[5].status == 429
    assert verify.calls == 2  # one verification per replica: the counters are what they share


def test_two_admissions_on_one_redis_share_the_address_limit(redis_url):
    """With auth off too, an address's limit (3 a minute) is one budget across replicas."""
    cfg = gov_cfg(redis_url, auth=False, per_ip={"other": 3})
    ip = f"10.{int(unique()[:4], 16) % 250}.{int(unique()[:4], 16) % 250}.7"

    async def verify(_):
        raise AssertionError("auth is off: no key is verified")

    async def go():
        a, b = Admission(cfg), Admission(cfg)
        return [await (a if i % 2 else b).admit(None, ip, "/v1/models", verify=verify) for i in range(8)]

    assert sum(v.allowed for v in asyncio.run(go())) == 3


def test_a_stopped_redis_fails_admission_closed_with_auth_on(redis_server):
    """Redis goes away under a running replica with auth on. Each of these raises
    StageError("rate_limits", "unavailable") within about a second (the storage's socket timeouts)
    and none is admitted: a key whose verdict is cached (its per-key counter cannot be taken); a key
    not cached yet, with a per-address limit (the address is checked first, so the key database is
    not even asked); no key at all, with a per-address limit. The ingress answers them with 503
    (serve/routes.py). Redis back on the same port: admission works again, on fresh counters."""
    by_key = gov_cfg(redis_server.url, per_key={"search": 50})
    by_ip = gov_cfg(redis_server.url, per_ip={"search": 50})
    verify = Verify(f"key-{unique()}")
    cached, fresh = token(), token()

    async def go():
        adm_key, adm_ip = Admission(by_key), Admission(by_ip)
        first = [await adm_key.admit(cached, "10.0.0.1", "/v1/search", verify=verify),
                 await adm_ip.admit(cached, "10.0.0.1", "/v1/search", verify=verify)]
        calls = verify.calls
        redis_server.stop()
        errors, waits = [], []
        for adm, tok in ((adm_key, cached), (adm_ip, fresh), (adm_ip, None)):
            t = time.monotonic()
            try:
                got = await adm.admit(tok, "10.0.0.1", "/v1/search", verify=verify)
            except StageError as e:
                got = e
            waits.append(time.monotonic() - t)
            errors.append(got)
        asked_while_down = verify.calls - calls
        redis_server.start()
        again = await adm_key.admit(cached, "10.0.0.1", "/v1/search", verify=verify)
        return first, errors, waits, asked_while_down, again

    first, errors, waits, asked_while_down, again = asyncio.run(go())
    assert all(v.allowed for v in first)
    assert all(isinstance(e, StageError) for e in errors), errors  # not a Verdict: nothing admitted
    assert [(e.stage, e.kind) for e in errors] == [("rate_limits", "unavailable")] * 3
    where = redis_server.url
    assert all(str(e).startswith(f"rate_limits unavailable: {where}: ") for e in errors), [str(e) for e in errors]
    assert max(waits) < 3, waits
    assert asked_while_down == 0  # the uncached key was never looked up: its address could not be checked first
    assert again.allowed and again.headers["x-ratelimit-remaining-requests"] == "49"  # Redis came back empty


def test_a_stopped_redis_fails_admission_open_with_auth_off(redis_server):
    """The other half of the rule: with auth off, Admission raises the same StageError (the ingress
    then admits without limits and logs it; serve/routes.py). Admission itself never admits
    unchecked."""
    cfg = gov_cfg(redis_server.url, auth=False, per_ip={"other": 10})

    async def verify(_):
        raise AssertionError("auth is off: no key is verified")

    async def go():
        adm = Admission(cfg)
        assert (await adm.admit(None, "10.0.0.2", "/v1/models", verify=verify)).allowed
        redis_server.stop()
        with pytest.raises(StageError) as e:
            await adm.admit(None, "10.0.0.2", "/v1/models", verify=verify)
        return e.value

    err = asyncio.run(go())
    assert (err.stage, err.kind) == ("rate_limits", "unavailable")
