"""The ingress's admission (deployments/admission.py) without Ray: the real Governor on a temporary
SQLite file answers ``verify``, counted, with an injected clock for the key cache and a patched
clock for the ``limits`` counters where a test needs time to pass."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import limits.aio.storage.memory as limits_memory
import pytest

from common.config import ConfigError, GovernorConfig, load_config
from deployments import admission as admission_mod
from deployments.admission import Admission, open_storage, rate_item
from deployments.errors import StageError
from deployments.governor import Governor, KeyVerdict

REPO = Path(__file__).resolve().parent.parent
LOCAL = REPO / "configs" / "local.yaml"
OFF = {"chat": 0, "search": 0, "other": 0}
BAD = "rg-deadbeef.not-a-real-secret"  # well formed, unknown


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class CountingVerify:
    """``verify`` as the ingress passes it, answered by a real Governor, counting calls."""

    def __init__(self, gov: Governor) -> None:
        self.gov, self.calls = gov, 0

    async def __call__(self, token: str) -> KeyVerdict:
        self.calls += 1
        await asyncio.sleep(0)  # a real call yields to the loop
        return self.gov.verify(token)


def governor_for(g: GovernorConfig) -> Governor:
    """The real Governor over the local config with the governor section ``g`` (its SQLite file ``g.db``)."""
    return Governor(load_config(LOCAL, environ={}).model_copy(update={"governor": g}))


def gcfg(tmp_path, *, auth=True, key_cache_s=30.0, per_key=None, per_ip=None, exempt=(), quotas=None, enabled=True):
    return GovernorConfig.model_validate({
        "db": str(tmp_path / "gov.sqlite3"),
        "auth": {"enabled": auth, "key_cache_s": key_cache_s},
        "rate_limits": {"enabled": enabled, "per_key": per_key or OFF, "per_ip": per_ip or OFF,
                        "exempt_ips": list(exempt)},
        **({"quotas": quotas} if quotas else {}),
    })


@pytest.fixture
def setup(tmp_path):
    """``make(**cfg) -> (admission, verify, governor, clock)``; every Admission made shares the governor."""
    made = {}

    def make(storage=None, **kw):
        cfg = gcfg(tmp_path, **kw)
        if "gov" not in made:
            made["gov"] = governor_for(cfg)
        clock = Clock()
        return Admission(cfg, storage=storage, clock=clock), CountingVerify(made["gov"]), made["gov"], clock

    yield make
    if "gov" in made:
        made["gov"].db.close()


def run(coro):
    return asyncio.run(coro)


async def admit_n(adm, verify, n, token, *, ip="10.0.0.1", path="/v1/search", admin=False):
    return [await adm.admit(token, ip, path, admin, verify=verify) for _ in range(n)]


# ---------------------------------------------------------------- the key cache


def test_key_cache_hit_makes_no_governor_call(setup):
    adm, verify, gov, _ = setup()
    token, key = gov.keys.create("alice")
    got = run(admit_n(adm, verify, 50, token))
    assert all(v.allowed and v.key_id == key.id and v.scope == "user" for v in got)
    assert verify.calls == 1 and adm.stats()["key_cache_hits"] == 49


def test_expiry_reverifies(setup):
    adm, verify, gov, clock = setup(key_cache_s=30)
    token, _ = gov.keys.create("alice")

    async def go():
        await admit_n(adm, verify, 3, token)
        assert verify.calls == 1
        clock.t += 29.9
        await admit_n(adm, verify, 3, token)
        assert verify.calls == 1  # still fresh
        clock.t += 0.2
        await admit_n(adm, verify, 3, token)
        assert verify.calls == 2  # expired: asked again, then cached again

    run(go())


def test_no_cache_asks_every_time(setup):
    adm, verify, gov, _ = setup(key_cache_s=0)
    token, _ = gov.keys.create("alice")
    run(admit_n(adm, verify, 5, token))
    assert verify.calls == 5


def test_a_revoked_key_is_refused_once_the_cache_expires(setup):
    adm, verify, gov, clock = setup(key_cache_s=30)
    token, key = gov.keys.create("bob")

    async def go():
        assert (await adm.admit(token, "10.0.0.1", "/v1/search", verify=verify)).allowed
        gov.keys.revoke(key.id)
        clock.t += 29  # the documented window: the ingress still trusts its cached verdict
        assert (await adm.admit(token, "10.0.0.1", "/v1/search", verify=verify)).allowed
        clock.t += 2
        v = await adm.admit(token, "10.0.0.1", "/v1/search", verify=verify)
        assert (v.allowed, v.status, v.code) == (False, 401, "invalid_api_key")
        assert "not valid" in v.message

    run(go())


def test_concurrent_misses_share_one_verify(setup):
    adm, verify, gov, _ = setup()
    token, _ = gov.keys.create("carol")

    async def go():
        return await asyncio.gather(*(adm.admit(token, "10.0.0.1", "/v1/search", verify=verify) for _ in range(40)))

    assert all(v.allowed for v in run(go())) and verify.calls == 1


def test_missing_and_malformed_keys_never_reach_the_governor(setup):
    adm, verify, _, _ = setup()

    async def go():
        return [await adm.admit(t, "10.0.0.1", "/v1/models", verify=verify) for t in (None, "", "nope", "rg-x.y")]

    got = run(go())
    assert [(v.status, v.code) for v in got] == [(401, "missing_api_key")] * 2 + [(401, "invalid_api_key")] * 2
    assert "Authorization: Bearer" in got[0].message and verify.calls == 0


def test_admin_scope(setup):
    adm, verify, gov, _ = setup()
    user, ukey = gov.keys.create("user")
    admin, _ = gov.keys.create("ops", "admin")

    async def go():
        v = await adm.admit(user, "10.0.0.1", "/v1/cache", True, verify=verify)
        assert (v.status, v.code, v.key_id) == (403, "insufficient_scope", ukey.id) and "admin" in v.message
        assert (await adm.admit(admin, "10.0.0.1", "/v1/cache", True, verify=verify)).allowed

    run(go())


def test_bad_key_flood_costs_one_verify_per_ttl(setup):
    adm, verify, _, clock = setup(key_cache_s=30)  # no per-IP limit: every request reaches the key check

    async def go():
        got = await admit_n(adm, verify, 1000, BAD)
        assert {(v.status, v.code) for v in got} == {(401, "invalid_api_key")}
        assert verify.calls == 1
        clock.t += 31
        await admit_n(adm, verify, 1000, BAD)
        assert verify.calls == 2

    run(go())


def test_bad_key_flood_from_one_address_meets_the_per_ip_limit(setup):
    adm, verify, _, _ = setup(per_ip={"other": 100})
    got = run(admit_n(adm, verify, 1000, BAD, path="/v1/models"))
    codes = [v.code for v in got]
    assert codes[:100] == ["invalid_api_key"] * 100 and set(codes[100:]) == {"rate_limit_exceeded"}
    assert "this IP address: 100 other requests per minute" in got[-1].message
    assert verify.calls == 1
    other = run(adm.admit(BAD, "10.0.0.2", "/v1/models", verify=verify))
    assert other.code == "invalid_api_key"  # another address has its own allowance


def test_per_ip_limit_is_checked_before_the_key(setup):
    adm, verify, gov, _ = setup(per_ip={"search": 2})
    token, _ = gov.keys.create("dave")

    async def go():
        got = [await adm.admit(None, "10.0.0.9", "/v1/search", verify=verify) for _ in range(2)]
        assert [v.code for v in got] == ["missing_api_key"] * 2  # unauthenticated requests count too
        v = await adm.admit(token, "10.0.0.9", "/v1/search", verify=verify)
        assert (v.status, v.code, v.key_id) == (429, "rate_limit_exceeded", None)
        assert "this IP address" in v.message and v.retry_after > 0
        assert verify.calls == 0  # refused before the key was looked at
        assert (await adm.admit(token, "10.0.0.10", "/v1/search", verify=verify)).allowed

    run(go())


def test_exempt_addresses_and_auth_off(setup):
    adm, verify, _, _ = setup(auth=False, per_ip={"search": 2}, exempt=["127.0.0.1", "10.1.0.0/16"])

    async def go():
        for ip in ("127.0.0.1", "10.1.2.3"):
            assert all(v.allowed for v in await admit_n(adm, verify, 5, None, ip=ip))
        got = await admit_n(adm, verify, 3, "rg-anything.x", ip="192.0.2.1")
        assert [v.allowed for v in got] == [True, True, False] and got[0].scope == "admin"
        assert got[2].code == "rate_limit_exceeded"

    run(go())
    assert verify.calls == 0  # auth off: the governor is never asked


def test_key_refusal_does_not_spend_the_address(setup):
    adm, verify, gov, _ = setup(per_key={"search": 1}, per_ip={"search": 3})
    a, _ = gov.keys.create("a")
    b, _ = gov.keys.create("b")

    async def go():
        got = [(await adm.admit(a, "10.0.0.1", "/v1/search", verify=verify)).code for _ in range(4)]
        assert got == ["", "rate_limit_exceeded", "rate_limit_exceeded", "rate_limit_exceeded"]
        # the address spent one of its 3 (the allowed request); key b still gets the other two
        got = [(await adm.admit(b, "10.0.0.1", "/v1/search", verify=verify)) for _ in range(1)]
        assert got[0].allowed

    run(go())


# ---------------------------------------------------------------- limits across replicas


def test_shared_storage_holds_the_combined_rate_across_two_replicas(setup):
    shared = open_storage("memory://")  # stands for one redis that both ingress replicas use
    a, verify, gov, _ = setup(storage=shared, per_key={"search": 10}, per_ip={"other": 6})
    b, _, _, _ = setup(storage=shared, per_key={"search": 10}, per_ip={"other": 6})
    token, _ = gov.keys.create("shared")

    async def go():
        got = []
        for i in range(30):  # alternate, as a load balancer would
            got.append(await (a if i % 2 else b).admit(token, f"10.0.0.{i % 7}", "/v1/search", verify=verify))
        assert sum(v.allowed for v in got) == 10
        refused = [v for v in got if not v.allowed]
        assert {v.code for v in refused} == {"rate_limit_exceeded"} and "this API key: 10 search" in refused[0].message
        ips = [await (a if i % 2 else b).admit(token, "10.9.9.9", "/v1/models", verify=verify) for i in range(12)]
        assert sum(v.allowed for v in ips) == 6  # the per-address limit is shared too

    run(go())
    assert verify.calls == 2  # one verification per replica


def test_separate_memory_storage_counts_per_replica(setup):
    a, verify, gov, _ = setup(per_key={"search": 10})
    b, _, _, _ = setup(per_key={"search": 10})
    token, _ = gov.keys.create("split")

    async def go():
        return [await (a if i % 2 else b).admit(token, "10.0.0.1", "/v1/search", verify=verify) for i in range(30)]

    assert sum(v.allowed for v in run(go())) == 20  # why memory:// is exact only with one ingress replica


@pytest.fixture
def fake_time(monkeypatch) -> Clock:
    """A clock for both the ``limits`` counters and admission: tests move ``.t`` to let time pass."""
    now = Clock(5_000_000.0)

    class FakeTime:
        @staticmethod
        def time() -> float:
            return now.t

    monkeypatch.setattr(limits_memory, "time", FakeTime)
    monkeypatch.setattr(admission_mod, "time", FakeTime)
    return now


def test_retry_after_is_when_the_window_frees(setup, fake_time):
    now = fake_time
    adm, verify, gov, _ = setup(per_key={"search": 2})
    token, _ = gov.keys.create("slow")

    async def go():
        assert all(v.allowed for v in await admit_n(adm, verify, 2, token))
        now.t += 10
        v = await adm.admit(token, "10.0.0.1", "/v1/search", verify=verify)
        assert (v.status, v.code) == (429, "rate_limit_exceeded") and v.retry_after == pytest.approx(50, abs=0.01)
        assert v.message == "rate limit exceeded for this API key: 2 search requests per minute; retry in 50 s"
        now.t += 49.9
        assert not (await adm.admit(token, "10.0.0.1", "/v1/search", verify=verify)).allowed
        now.t += 0.2  # the first two left the window
        assert (await adm.admit(token, "10.0.0.1", "/v1/search", verify=verify)).allowed

    run(go())


def test_rate_items():
    assert (rate_item(30).amount, rate_item(30).multiples, rate_item(30).GRANULARITY.name) == (30, 1, "minute")
    assert (rate_item(1.5).amount, rate_item(1.5).multiples) == (3, 2)
    assert (rate_item(0.25).amount, rate_item(0.25).multiples, rate_item(0.25).GRANULARITY.name) == (1, 240, "second")
    with pytest.raises(ValueError):
        rate_item(0)


# ---------------------------------------------------------------- quotas


def test_quota_refusal_from_the_ledger(setup):
    adm, verify, gov, _ = setup()
    token, key = gov.keys.create("thrifty", daily_tokens=100)
    gov.ledger.record(key.id, prompt_tokens=80, completion_tokens=30)

    async def go():
        v = await adm.admit(token, "10.0.0.1", "/v1/chat/completions", verify=verify)
        assert (v.status, v.code, v.key_id) == (429, "insufficient_quota", key.id)
        assert "110 of 100" in v.message and v.retry_after > 0
        assert (await adm.admit(token, "10.0.0.1", "/v1/search", verify=verify)).allowed  # searches spend no tokens

    run(go())


def test_quota_counts_this_replicas_usage_without_a_call(setup):
    adm, verify, gov, clock = setup(quotas={"daily_tokens": 1000, "monthly_tokens": None})
    token, key = gov.keys.create("busy")

    async def go():
        assert (await adm.admit(token, "10.0.0.1", "/v1/chat/completions", verify=verify)).allowed
        gov.record(key.id, 600, 450)  # what Pipeline.record_usage sends the governor...
        adm.note_usage(key.id, 1050)  # ...and adds to this replica's snapshot
        v = await adm.admit(token, "10.0.0.1", "/v1/chat/completions", verify=verify)
        assert (v.code, verify.calls) == ("insufficient_quota", 1) and "1050 of 1000" in v.message
        clock.t += 31  # a fresh snapshot from the ledger agrees
        v = await adm.admit(token, "10.0.0.1", "/v1/chat/completions", verify=verify)
        assert (v.code, verify.calls) == ("insufficient_quota", 2)

    run(go())


def test_quota_snapshot_rolls_over_at_midnight_utc(tmp_path):
    wall = Clock(1_800_000_000.0 - (1_800_000_000 % 86_400) - 10)  # 10 s before a UTC midnight
    cfg = gcfg(tmp_path, quotas={"daily_tokens": 100, "monthly_tokens": None})
    gov = governor_for(cfg)
    adm = Admission(cfg, clock=Clock(), wall=wall)
    token, key = gov.keys.create("night")

    async def verify(t):
        return gov.verify(t, now=wall.t)

    async def go():
        assert (await adm.admit(token, "10.0.0.1", "/v1/chat/completions", verify=verify)).allowed
        adm.note_usage(key.id, 100)
        assert not (await adm.admit(token, "10.0.0.1", "/v1/chat/completions", verify=verify)).allowed
        wall.t += 11  # the next UTC day: the cached day's count no longer applies
        assert (await adm.admit(token, "10.0.0.1", "/v1/chat/completions", verify=verify)).allowed

    run(go())


# ---------------------------------------------------------------- failures


def test_state_unreachable_on_a_miss_raises_but_cached_keys_still_pass(setup):
    adm, verify, gov, _ = setup()
    token, _ = gov.keys.create("eve")
    other, _ = gov.keys.create("frank")

    async def down(t):
        raise StageError("state", "unavailable", "the state database did not answer")

    async def go():
        assert (await adm.admit(token, "10.0.0.1", "/v1/search", verify=verify)).allowed
        assert (await adm.admit(token, "10.0.0.1", "/v1/search", verify=down)).allowed  # a hit needs no call
        with pytest.raises(StageError) as e:
            await adm.admit(other, "10.0.0.1", "/v1/search", verify=down)
        assert e.value.stage == "state" and e.value.kind == "unavailable"
        assert (await adm.admit(other, "10.0.0.1", "/v1/search", verify=verify)).allowed  # a failure is not cached

    run(go())


def test_storage_unreachable_is_a_rate_limits_stage_error(tmp_path):
    cfg = gcfg(tmp_path, per_ip={"search": 5})
    storage = open_storage("redis://127.0.0.1:1")  # nothing listens on port 1
    adm = Admission(cfg, storage=storage)

    async def verify(t):
        raise AssertionError("not reached")

    with pytest.raises(StageError) as e:
        run(adm.admit(None, "10.0.0.1", "/v1/search", verify=verify))
    assert e.value.stage == "rate_limits" and e.value.kind == "unavailable"


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("url", ["mysql://db:3306", "redis://", "memory://somewhere", "redis://h:99999", "localhost:6379"])
def test_a_bad_storage_url_names_the_key(url):
    with pytest.raises(ConfigError) as e:
        load_config(LOCAL, environ={"RAGRAPH__GOVERNOR__RATE_LIMITS__STORAGE": url})
    msg = str(e.value)
    assert "governor.rate_limits.storage" in msg and "redis://host:port" in msg, msg


def test_storage_and_key_cache_config():
    cfg = load_config(LOCAL, environ={})
    assert cfg.governor.rate_limits.storage == "memory://" and cfg.governor.auth.key_cache_s == 30
    cfg = load_config(LOCAL, environ={"RAGRAPH__GOVERNOR__RATE_LIMITS__STORAGE": "redis://10.0.0.5:6379/2",
                                      "RAGRAPH__GOVERNOR__AUTH__KEY_CACHE_S": "0"})
    assert cfg.governor.rate_limits.storage == "redis://10.0.0.5:6379/2" and cfg.governor.auth.key_cache_s == 0
    with pytest.raises(ConfigError, match="governor.auth.key_cache_s"):
        load_config(LOCAL, environ={"RAGRAPH__GOVERNOR__AUTH__KEY_CACHE_S": "-1"})
    open_storage("redis://10.0.0.5:6379/2")  # builds without connecting


def test_pipeline_has_an_admission_and_notes_recorded_usage(tmp_path):
    from flow.pipeline import Pipeline

    cfg = load_config(LOCAL, environ={})
    cfg = cfg.model_copy(update={"governor": gcfg(tmp_path)})
    sent = []

    class Stages:
        rerank_enabled = False

    class Ledger:  # the governor's record, seen from the pipeline
        def record(self, *args, **kw):
            sent.append(("record", *args))

    async def go():
        p = Pipeline(cfg, Stages(), governor=Ledger())
        assert isinstance(p.admission, Admission)
        entry_token = "rg-0000abcd.secret"
        gov_answer = KeyVerdict(200, key_id="0000abcd", scope="user", daily_tokens=10, day="x", month="y")

        async def verify(t):
            return gov_answer

        await p.admission.admit(entry_token, "10.0.0.1", "/v1/search", verify=verify)
        p.record_usage("0000abcd", 7, 5)
        await p.drain()
        v = await p.admission.admit(entry_token, "10.0.0.1", "/v1/chat/completions", verify=verify)
        return v

    v = run(go())
    assert sent == [("record", "0000abcd", 7, 5)]  # the usage write is unchanged
    assert v.code == "insufficient_quota" and "12 of 10" in v.message


def test_admission_is_fast_enough_to_not_matter(setup):
    """Loose guard (not a benchmark): a cached admission costs well under a millisecond here."""
    adm, verify, gov, _ = setup(per_key={"search": 1e6}, per_ip={"search": 1e6})
    token, _ = gov.keys.create("fast")

    async def go():
        await admit_n(adm, verify, 10, token)
        t = time.perf_counter()
        await admit_n(adm, verify, 500, token)
        return (time.perf_counter() - t) / 500

    assert run(go()) < 2e-3


# ---------------------------------------------------------------- issue 16: rows 5, 6 and 11


def fresh_token() -> str:
    import secrets

    return f"rg-{secrets.token_hex(4)}.{secrets.token_urlsafe(32)}"  # well formed, unknown, never cached


@pytest.mark.parametrize("concurrent", [False, True])
def test_1000_bad_keys_from_one_address_cost_at_most_its_limit_of_verify_calls(setup, concurrent):
    adm, verify, _, _ = setup(per_ip={"chat": 20})
    tokens = [fresh_token() for _ in range(1000)]  # a new key each time: the key cache cannot help

    async def go():
        calls = [adm.admit(t, "198.51.100.7", "/v1/chat/completions", verify=verify) for t in tokens]
        if concurrent:  # all at once: none has been refused yet when the others are checked
            return await asyncio.gather(*calls)
        return [await c for c in calls]

    got = run(go())
    assert verify.calls <= 20, f"{verify.calls} governor calls for 1,000 bad keys from one address (limit 20/min)"
    codes = [v.code for v in got]
    assert codes.count("invalid_api_key") == verify.calls and codes.count("rate_limit_exceeded") == 1000 - verify.calls
    assert run(adm.admit(fresh_token(), "198.51.100.8", "/v1/chat/completions", verify=verify)).code == "invalid_api_key"


def test_a_verified_key_spends_the_address_once(setup):
    adm, verify, gov, _ = setup(per_ip={"search": 3})
    token, _ = gov.keys.create("eve")
    got = run(admit_n(adm, verify, 4, token, ip="10.0.0.3"))
    assert [v.allowed for v in got] == [True, True, True, False] and verify.calls == 1


def test_ipv6_clients_are_limited_per_64(setup):
    adm, verify, _, _ = setup(auth=False, per_ip={"search": 3})

    async def go():
        same_64 = [f"2001:db8:aa:bb::{i:x}" for i in range(1, 6)] + ["2001:db8:aa:bb:ffff:1:2:3"]
        got = [await adm.admit(None, ip, "/v1/search", verify=verify) for ip in same_64]
        assert [v.allowed for v in got] == [True, True, True, False, False, False]
        assert "this IP address" in got[-1].message
        assert (await adm.admit(None, "2001:db8:aa:bc::1", "/v1/search", verify=verify)).allowed  # another /64
        v4 = [await adm.admit(None, f"192.0.2.{i}", "/v1/search", verify=verify) for i in range(1, 6)]
        assert all(v.allowed for v in v4)  # IPv4: per address, as before
        mapped = [await adm.admit(None, "::ffff:192.0.2.77", "/v1/search", verify=verify) for _ in range(3)]
        assert all(v.allowed for v in mapped)
        assert not (await adm.admit(None, "192.0.2.77", "/v1/search", verify=verify)).allowed  # the same client

    run(go())


def test_ipv6_prefix_is_configurable(tmp_path):
    cfg = GovernorConfig.model_validate({"db": str(tmp_path / "g.sqlite3"), "rate_limits": {"ipv6_prefix": 56}})
    adm = Admission(cfg)
    assert adm.limiter.who("2001:db8:aa:bb::1") == "2001:db8:aa::/56" == adm.limiter.who("2001:db8:aa:ff::9")
    assert adm.limiter.who("2001:db8:aa:1bb::1") == "2001:db8:aa:100::/56"
    with pytest.raises(ValueError, match="ipv6_prefix"):
        GovernorConfig.model_validate({"rate_limits": {"ipv6_prefix": 8}})


def test_a_burst_of_concurrent_chats_cannot_overshoot_the_quota(setup):
    adm, verify, gov, _ = setup(quotas={"daily_tokens": 1000, "monthly_tokens": None})
    token, key = gov.keys.create("bursty")

    async def go():
        got = await asyncio.gather(*(adm.admit(token, "10.0.0.1", "/v1/chat/completions", verify=verify,
                                               reserve_tokens=150) for _ in range(50)))
        admitted = [v for v in got if v.allowed]
        assert len(admitted) == 6 and all(v.reserved == 150 for v in admitted)  # 6 * 150 <= 1000 < 7 * 150
        assert adm.reserved(key.id) == 900
        refused = [v for v in got if not v.allowed]
        assert {v.code for v in refused} == {"insufficient_quota"}
        assert "900 reserved by this key's requests in progress" in refused[0].message
        assert 0 < refused[0].retry_after <= 10
        # two finish having used less than they reserved: their reservations are released, usage counted
        adm.settle(key.id, 150, 40)
        adm.settle(key.id, 150, 60)
        assert adm.reserved(key.id) == 600
        more = [await adm.admit(token, "10.0.0.1", "/v1/chat/completions", verify=verify, reserve_tokens=150)
                for _ in range(3)]
        assert [v.allowed for v in more] == [True, True, False]  # 100 used + 900 reserved, then 1,150 > 1,000
        for _ in range(6):
            adm.settle(key.id, 150, 150)
        assert adm.reserved(key.id) == 0
        v = await adm.admit(token, "10.0.0.1", "/v1/chat/completions", verify=verify, reserve_tokens=1)
        assert v.code == "insufficient_quota" and "1000 of 1000 tokens used today" in v.message

    run(go())


def test_a_request_larger_than_what_is_left_is_told_to_ask_for_less(setup):
    adm, verify, gov, _ = setup(quotas={"daily_tokens": 1000, "monthly_tokens": None})
    token, key = gov.keys.create("big")
    gov.ledger.record(key.id, prompt_tokens=700, completion_tokens=0)

    async def go():
        v = await adm.admit(token, "10.0.0.1", "/v1/chat/completions", verify=verify, reserve_tokens=400)
        assert v.code == "insufficient_quota" and "300 of 1000 are left" in v.message and "max_tokens" in v.message
        assert v.retry_after > 10  # waiting for requests in progress would not help: the day's reset
        ok = await adm.admit(token, "10.0.0.1", "/v1/chat/completions", verify=verify, reserve_tokens=300)
        assert ok.allowed and ok.reserved == 300
        search = await adm.admit(token, "10.0.0.1", "/v1/search", verify=verify, reserve_tokens=300)
        assert search.allowed and search.reserved == 0  # only chats spend tokens
        assert adm.reserved(key.id) == 300

    run(go())


def test_reservations_outlive_a_key_cache_refresh(setup):
    adm, verify, gov, clock = setup(key_cache_s=30, quotas={"daily_tokens": 1000, "monthly_tokens": None})
    token, key = gov.keys.create("long")

    async def go():
        assert (await adm.admit(token, "10.0.0.1", "/v1/chat/completions", verify=verify, reserve_tokens=800)).allowed
        clock.t += 31  # re-verified: the ledger knows nothing of the request in progress, this replica does
        v = await adm.admit(token, "10.0.0.1", "/v1/chat/completions", verify=verify, reserve_tokens=800)
        assert v.code == "insufficient_quota" and verify.calls == 2

    run(go())


def test_reserve_and_settle_check_their_arguments(setup):
    adm, verify, _, _ = setup()
    with pytest.raises(ValueError, match="reserve_tokens must be an integer >= 0, got -1"):
        run(adm.admit(None, "10.0.0.1", "/v1/chat/completions", verify=verify, reserve_tokens=-1))
    with pytest.raises(ValueError, match="used must be an integer >= 0, got -5"):
        adm.settle("k", 10, -5)
    adm.settle(None, 10, 5)  # auth off: nothing reserved, nothing to do
    adm.settle("unknown", 10, 5)  # never more released than was reserved
    assert adm.reserved("unknown") == 0


def test_zero_reserve_keeps_the_old_check(setup):
    adm, verify, gov, _ = setup(quotas={"daily_tokens": 100, "monthly_tokens": None})
    token, key = gov.keys.create("old")
    gov.ledger.record(key.id, prompt_tokens=99, completion_tokens=0)
    v = run(adm.admit(token, "10.0.0.1", "/v1/chat/completions", verify=verify))
    assert v.allowed and v.reserved == 0 and adm.reserved(key.id) == 0


def test_the_memory_storage_sweeps_at_most_once_a_second_without_threads(fake_time, monkeypatch):
    """limits' own memory storage sweeps every key through a thread after each hit (0.35 to 1.1 ms of
    CPU per admission); ours overrides the hook it calls (a limits that renames it fails here), sweeps
    at most once per SWEEP_S in the event loop, and still drops what has left the window."""
    from limits.aio.storage import MemoryStorage

    from deployments.admission import SweptMemoryStorage, WindowLimiter

    assert hasattr(MemoryStorage, "_MemoryStorage__schedule_expiry")
    now = fake_time
    hops = []
    real_to_thread = asyncio.to_thread
    monkeypatch.setattr(asyncio, "to_thread", lambda *a, **k: hops.append(a) or real_to_thread(*a, **k))
    storage = open_storage("memory://")
    assert isinstance(storage, SweptMemoryStorage)
    lim = WindowLimiter(per_key={"chat": 0, "search": 5, "other": 0}, per_ip={"chat": 0, "search": 0, "other": 0},
                        storage=storage)

    async def go():
        got = []
        for i in range(200):  # 40 keys, 5 hits each: the 6th of one key would be refused
            got.append((await lim.hit("key", "search", f"key-{i % 40}", 5)).allowed)
            await asyncio.sleep(0)
        sweeps = storage.sweeps
        assert sweeps <= 1, sweeps  # not one per hit
        assert len(storage.events) == 40
        refused = (await lim.hit("key", "search", "key-0", 5)).allowed
        now.t += 61  # every entry has left the window
        assert (await lim.hit("key", "search", "key-new", 5)).allowed
        for _ in range(3):
            await asyncio.sleep(0)
        return got, refused, sweeps

    got, refused, sweeps = run(go())
    assert all(got) and not refused
    assert storage.sweeps == sweeps + 1
    assert len(storage.events) == 1 and "key-new" in next(iter(storage.events)), storage.events.keys()  # swept
    assert hops == []  # no thread per key
