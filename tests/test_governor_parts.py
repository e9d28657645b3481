"""The decisions of admission without their counters (request kinds, quota refusals and resets) and
the response cache. Keys and usage are tested in tests/test_state_keys_usage.py, the shared rate
limits in tests/test_admission.py and tests/test_redis_limits.py."""

import time
from datetime import UTC, datetime

import pytest

from deployments.cache import ResponseCache, cache_key, hit_request_id, normalise
from deployments.limits import KINDS, Decision, check_quota, kind_of


def ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


NOV21 = ts(2026, 11, 21, 20, 48)


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def far_from_utc(monkeypatch):
    """Local time 10 h behind UTC, so a period computed in local time instead of UTC is caught."""
    monkeypatch.setenv("TZ", "XXX+10")  # POSIX TZ string: needs no tz database
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()



def test_kind_of():
    assert kind_of("/v1/chat/completions") == "chat"
    assert kind_of("/v1/chat/completions/") == "chat"
    assert kind_of("/v1/search") == "search"
    assert [kind_of(p) for p in ["/v1/models", "/health", "/", "/v1/searches"]] == ["other"] * 4
    assert set(KINDS) == {"chat", "search", "other"}


def test_allowed_decision_defaults():
    d = Decision(True)
    assert d.retry_after == 0.0 and d.message() == "allowed"


# ---------------------------------------------------------------- quotas


def test_quota_unlimited_and_under():
    assert check_quota(day_used=10**9, month_used=10**9, daily_limit=None, monthly_limit=None, now=NOV21).allowed
    assert check_quota(day_used=49_999, month_used=49_999, daily_limit=50_000, monthly_limit=50_001, now=NOV21).allowed


def test_daily_quota_refusal_and_reset(far_from_utc):
    q = check_quota(day_used=50_123, month_used=60_000, daily_limit=50_000, monthly_limit=None, now=NOV21)
    assert (q.allowed, q.period, q.used, q.limit) == (False, "day", 50_123, 50_000)
    assert q.retry_after == pytest.approx(3 * 3600 + 12 * 60)  # 20:48 UTC -> midnight
    assert q.message() == "daily token quota exhausted: 50123 of 50000 tokens used today (UTC); resets in 3 h 12 min"
    assert not check_quota(day_used=50_000, month_used=0, daily_limit=50_000, monthly_limit=None, now=NOV21).allowed


def test_monthly_quota_reset_including_year_end(far_from_utc):
    q = check_quota(day_used=0, month_used=10, daily_limit=None, monthly_limit=10, now=ts(2026, 11, 30, 12))
    assert (q.period, q.retry_after) == ("month", pytest.approx(12 * 3600))
    assert q.message() == "monthly token quota exhausted: 10 of 10 tokens used this month (UTC); resets in 12 h 0 min"
    q = check_quota(day_used=0, month_used=10, daily_limit=None, monthly_limit=10, now=ts(2026, 12, 31, 23))
    assert q.retry_after == pytest.approx(3600)
    q = check_quota(day_used=0, month_used=10, daily_limit=None, monthly_limit=10, now=ts(2026, 2, 10))
    assert q.retry_after == pytest.approx(19 * 86_400) and "resets in 19 d 0 h" in q.message()


def test_both_spent_reports_the_month():
    q = check_quota(day_used=100, month_used=100, daily_limit=50, monthly_limit=100, now=NOV21)
    assert q.period == "month" and q.retry_after == pytest.approx(ts(2026, 12, 1) - NOV21)


# ---------------------------------------------------------------- cache

BASE = dict(
    messages=[{"role": "user", "content": "When is the tasting room open?"}],
    rag={"top_k": 5, "strategy": "hybrid"},
    model="smollm2",
    index_version="v1",
    sampling={"temperature": 0.0, "max_tokens": 128},
)


def test_normalise():
    assert normalise("  When IS the   tasting\nroom open ?! ") == "When IS the tasting room open"
    assert normalise("v1.2 release") == "v1.2 release"


def test_cache_key_keeps_case_and_ignores_whitespace():
    k = cache_key(**BASE)
    assert len(k) == 64
    same = {**BASE, "messages": [{"role": "user", "content": "  When is the tasting   room open"}]}
    assert cache_key(**same) == k
    other_case = {**BASE, "messages": [{"role": "user", "content": "when is THE tasting room open?"}]}
    assert cache_key(**other_case) != k  # "US" and "us" are different questions
    reordered = {**BASE, "rag": {"strategy": "hybrid", "top_k": 5}}
    assert cache_key(**reordered) == k


@pytest.mark.parametrize(
    "change",
    [
        {"index_version": "v2"},
        {"index_version": None},
        {"model": "other-model"},
        {"rag": {"top_k": 6, "strategy": "hybrid"}},
        {"sampling": {"temperature": 0.7, "max_tokens": 128}},
        {"messages": [{"role": "system", "content": "When is the tasting room open?"}]},
        {"messages": [{"role": "user", "content": "When is the shop open?"}]},
    ],
)
def test_cache_key_changes_with_what_changes_the_answer(change):
    assert cache_key(**{**BASE, **change}) != cache_key(**BASE)


def test_cache_key_is_per_api_key_unless_shared():
    a, b = cache_key(**BASE, key_id="aaaa0001"), cache_key(**BASE, key_id="bbbb0002")
    assert a != b  # key B never finds key A's answer
    assert a != cache_key(**BASE)  # nor does the anonymous caller of an auth-off service
    assert cache_key(**BASE, key_id="aaaa0001") == a
    shared = cache_key(**BASE, key_id="aaaa0001", shared=True)
    assert shared == cache_key(**BASE, key_id="bbbb0002", shared=True) == cache_key(**BASE, shared=True)
    assert shared != cache_key(**BASE)  # switching the config does not serve the other mode's entries


def test_a_shared_cache_hit_shows_no_request_id():
    hit = {"text": "t", "request_id": "req-of-key-a"}
    assert hit_request_id(hit, shared=False) == "req-of-key-a"
    assert hit_request_id(hit, shared=True) is None


def test_cache_is_per_key_by_default(app_config):
    assert app_config.governor.cache.shared_across_keys is False


def test_cache_ttl_expiry():
    t = Clock(0.0)
    c = ResponseCache(max_entries=10, ttl_s=30, timer=t)
    c.put("a", {"answer": 1})
    t.t = 29.9
    assert c.get("a") == {"answer": 1}
    t.t = 30.1
    assert c.get("a") is None
    assert c.stats()["entries"] == 0


def test_cache_size_bound():
    c = ResponseCache(max_entries=3, ttl_s=60, timer=Clock(0.0))
    for k in "abcde":
        c.put(k, k)
    assert c.stats()["entries"] == 3
    assert c.get("a") is None and c.get("e") == "e"


def test_cache_stats_and_clear():
    c = ResponseCache(max_entries=10, ttl_s=60, timer=Clock(0.0))
    assert c.stats()["hit_rate"] == 0.0
    c.put("a", 1)
    c.put("b", 2)
    c.get("a"), c.get("a"), c.get("a"), c.get("zzz")
    assert c.stats() == {
        "entries": 2, "max_entries": 10, "ttl_s": 60.0, "hits": 3, "misses": 1,
        "hit_rate": 0.75, "stores": 2, "clears": 0,
    }  # fmt: skip
    assert c.clear() == 2
    assert c.get("a") is None
    s = c.stats()
    assert (s["entries"], s["clears"], s["misses"]) == (0, 1, 2)
    assert c.clear() == 0


def test_cache_rejects_bad_sizes():
    with pytest.raises(ValueError, match="max_entries must be an integer >= 1, got 0; ttl_s must be > 0, got -1"):
        ResponseCache(max_entries=0, ttl_s=-1)


# ---------------------------------------------------------------- issue 16 row 11: IPv6 clients by /64


def test_address_group():
    from common.networks import address_group

    assert address_group("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64" == address_group("2001:DB8:1:2::99")
    assert address_group("2001:db8:1:2:3:4:5:6", 48) == "2001:db8:1::/48"
    assert address_group("2001:db8::1", 128) == "2001:db8::1/128"
    assert address_group("203.0.113.9") == "203.0.113.9" == address_group("::ffff:203.0.113.9")
    assert address_group("testclient") == "testclient"
    with pytest.raises(ValueError, match="ipv6_prefix must be between 0 and 128, got 129"):
        address_group("::1", 129)
