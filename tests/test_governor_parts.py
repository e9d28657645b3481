"""API keys, usage ledger, rate limits, quotas and the response cache: real SQLite in tmp_path, injected clocks."""

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from deployments.auth import ApiKey, AuthError, KeyStore, UsageLedger, open_db
from deployments.cache import ResponseCache, cache_key, hit_request_id, normalise
from deployments.limits import (
    KINDS,
    Decision,
    RateLimiter,
    TokenBucket,
    check_quota,
    kind_of,
)

REPO = Path(__file__).resolve().parent.parent


def ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


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


@pytest.fixture
def db(tmp_path):
    return tmp_path / "state" / "auth.sqlite"


@pytest.fixture
def store(db):
    s = KeyStore(db)
    yield s
    s.close()


# ---------------------------------------------------------------- keys


def test_token_is_never_stored_in_plaintext(store, db):
    tokens = [store.create(f"k{i}")[0] for i in range(3)]
    store.close()  # checkpoints the WAL into the main file; the -wal file is read below too if left
    raw = b"".join(p.read_bytes() for p in db.parent.iterdir())
    for token in tokens:
        secret = token.split(".", 1)[1]
        assert token.encode() not in raw and secret.encode() not in raw
    conn = sqlite3.connect(db)
    cols = [r[1] for r in conn.execute("PRAGMA table_info(api_keys)")]
    rows = conn.execute("SELECT * FROM api_keys").fetchall()
    conn.close()
    cells = [str(c) for row in rows for c in row]
    assert not any(secret in c for token in tokens for secret in [token.split(".", 1)[1]] for c in cells)
    stored = {row[cols.index("token_sha256")] for row in rows}
    assert stored == {hashlib.sha256(t.encode()).hexdigest() for t in tokens}


def test_token_format_and_public_view(store):
    token, key = store.create("ci bot")
    assert token.startswith(f"rg-{key.id}.")
    assert len(key.id) == 8 and key.id == key.id.lower() and all(c in "0123456789abcdef" for c in key.id)
    assert len(token.split(".", 1)[1]) >= 43  # token_urlsafe(32)
    pub = key.public()
    assert pub["id"] == key.id and pub["name"] == "ci bot" and pub["scope"] == "user" and pub["active"] is True
    assert not any(token.split(".", 1)[1] in str(v) for v in pub.values())
    assert "token_sha256" not in pub


def test_verify(store):
    token, key = store.create("alice")
    other, _ = store.create("bob")
    assert store.verify(token) == key
    key_part, secret = token.split(".", 1)
    assert store.verify(f"{key_part}.{secret[:-1]}{'A' if secret[-1] != 'A' else 'B'}") is None  # wrong secret
    assert store.verify(f"{key_part}.{other.split('.', 1)[1]}") is None  # another key's secret
    malformed = ["", "rg-", "bearer", token.replace(".", "-"), token[3:], f"rg-{key.id}.", f"rg-{key.id}x.{secret}", None]
    for bad in malformed:
        assert store.verify(bad) is None, bad  # malformed
    assert store.verify(f"rg-zzzzzzzz.{secret}") is None  # well-formed, unknown id
    store.revoke(key.id)
    assert store.verify(token) is None  # revoked
    assert store.verify(other) is not None


def test_scopes_and_bad_arguments(store):
    assert store.create("ops", "admin")[1].scope == "admin"
    assert store.create("app")[1].scope == "user"
    assert store.create("prometheus", "metrics")[1].scope == "metrics"
    with pytest.raises(AuthError, match=r"scope must be one of \['user', 'admin', 'metrics'\], got 'root'"):
        store.create("x", "root")
    with pytest.raises(AuthError, match="name must be 1 to 100 characters"):
        store.create("   ")
    with pytest.raises(AuthError, match="name must be 1 to 100 characters"):
        store.create("n" * 101)
    with pytest.raises(AuthError, match=r"2 error\(s\).*chat_per_min must be a number > 0.*daily_tokens must be an integer"):
        store.create("x", chat_per_min=0, daily_tokens=1.5)
    assert store.count_active() == 3  # nothing was written by the refused calls


def test_overrides_round_trip(store, db):
    _, key = store.create("limited", chat_per_min=5, daily_tokens=1000, monthly_tokens=20_000)
    reopened = KeyStore(db)
    again = reopened.get(key.id)
    reopened.close()
    assert again == key
    assert (again.chat_per_min, again.search_per_min) == (5.0, None)
    assert (again.daily_tokens, again.monthly_tokens) == (1000, 20_000)
    assert again.rate_overrides() == {"chat": 5.0, "search": None, "other": None}


def test_revoke_list_and_count(store):
    keys = [store.create(n)[1] for n in ["a", "b", "c"]]
    assert [k.name for k in store.list()] == ["a", "b", "c"]
    assert store.count_active() == 3
    first = store.revoke(keys[1].id)
    assert first.revoked is not None and not first.active
    again = store.revoke(keys[1].id)
    assert again.revoked == first.revoked  # keeps the first revoke time
    assert [k.name for k in store.list()] == ["a", "c"]
    assert [k.name for k in store.list(include_revoked=True)] == ["a", "b", "c"]
    assert store.count_active() == 2
    assert store.get("nope") is None


def test_revoke_unknown_is_a_clear_error(store):
    with pytest.raises(AuthError, match=r"no key with id 'deadbeef'; `ragraph keys list` shows them"):
        store.revoke("deadbeef")


def test_wal_mode_and_full_sync(store, db):
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent, seen by any connection
    conn.close()
    c = open_db(db)
    assert c.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert c.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    c.close()


# ---------------------------------------------------------------- usage


NOV21 = ts(2026, 11, 21, 20, 48)


def test_usage_counts_and_zeros(db):
    led = UsageLedger(db)
    assert led.usage("k1", now=NOV21) == {
        "key_id": "k1",
        "day": {"period": "2026-11-21", "requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "prefill_s": 0.0, "decode_s": 0.0, "engine_s": 0.0, "cost": 0.0},
        "month": {"period": "2026-11", "requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "prefill_s": 0.0, "decode_s": 0.0, "engine_s": 0.0, "cost": 0.0},
    }
    led.record("k1", prompt_tokens=100, completion_tokens=20, now=NOV21)
    led.record("k1", prompt_tokens=50, completion_tokens=5, now=NOV21 + 60)
    led.record("k2", prompt_tokens=1, completion_tokens=1, now=NOV21)
    u = led.usage("k1", now=NOV21)
    assert u["day"] == {
        "period": "2026-11-21", "requests": 2, "prompt_tokens": 150, "completion_tokens": 25, "total_tokens": 175,
        "prefill_s": 0.0, "decode_s": 0.0, "engine_s": 0.0, "cost": 0.0,  # no engine time or price given
    }  # fmt: skip
    assert u["month"]["total_tokens"] == 175 and u["month"]["requests"] == 2
    assert led.standing("k1", now=NOV21)[:2] == (175, 175)
    assert led.standing("nobody", now=NOV21)[:2] == (0, 0)
    with pytest.raises(ValueError, match="prompt_tokens must be an integer >= 0, got -1"):
        led.record("k1", prompt_tokens=-1, completion_tokens=0, now=NOV21)
    assert led.standing("k1", now=NOV21)[:2] == (175, 175)


def test_usage_survives_a_restart(db):
    KeyStore(db).create("shares the file")
    UsageLedger(db).record("k1", prompt_tokens=7, completion_tokens=3, now=NOV21)
    fresh = UsageLedger(db)  # a new process would do exactly this
    assert fresh.standing("k1", now=NOV21)[:2] == (10, 10)
    assert KeyStore(db).count_active() == 1


def test_usage_survives_sigkill_right_after_record(db):
    script = textwrap.dedent(
        f"""
        import sys, time
        from deployments.auth import UsageLedger
        UsageLedger({str(db)!r}).record("k1", prompt_tokens=40, completion_tokens=2, now={NOV21})
        print("recorded", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "recorded"
        os.kill(proc.pid, signal.SIGKILL)  # no close, no atexit, no checkpoint
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert UsageLedger(db).usage("k1", now=NOV21)["day"]["requests"] == 1
    assert UsageLedger(db).standing("k1", now=NOV21)[:2] == (42, 42)


def test_day_and_month_rollover(db, far_from_utc):
    led = UsageLedger(db)
    led.record("k", prompt_tokens=10, completion_tokens=0, now=ts(2026, 11, 29, 23, 59, 59))
    led.record("k", prompt_tokens=20, completion_tokens=0, now=ts(2026, 11, 30, 0, 0, 1))  # new day, same month
    u = led.usage("k", now=ts(2026, 11, 30, 12))
    assert (u["day"]["period"], u["day"]["total_tokens"]) == ("2026-11-30", 20)
    assert (u["month"]["period"], u["month"]["total_tokens"]) == ("2026-11", 30)
    led.record("k", prompt_tokens=5, completion_tokens=0, now=ts(2026, 12, 1, 0, 0, 1))  # new month
    assert led.standing("k", now=ts(2026, 12, 1, 1))[:2] == (5, 5)
    assert led.usage("k", now=ts(2026, 12, 1, 1))["month"]["period"] == "2026-12"
    assert led.standing("k", now=ts(2026, 11, 30, 23))[:2] == (20, 30)  # earlier periods are kept


def test_all_usage_is_this_month_sorted(db):
    led = UsageLedger(db)
    led.record("zz", prompt_tokens=1, completion_tokens=0, now=NOV21)
    led.record("aa", prompt_tokens=2, completion_tokens=0, now=NOV21)
    led.record("old", prompt_tokens=3, completion_tokens=0, now=ts(2026, 10, 5))
    rows = led.all_usage(now=NOV21)
    assert [r["key_id"] for r in rows] == ["aa", "zz"]
    assert rows[0]["month"]["total_tokens"] == 2


# ---------------------------------------------------------------- rate limits


def test_bucket_burst_refill_and_retry_after():
    b = TokenBucket(60, now=0.0)
    assert all(b.take(0.0) == 0.0 for _ in range(60))  # one minute's allowance as burst
    assert b.take(0.0) == pytest.approx(1.0)
    assert b.take(0.25) == pytest.approx(0.75)
    assert b.take(1.0) == 0.0
    assert b.take(1.0) == pytest.approx(1.0)
    assert b.take(100.0) == 0.0 and b.tokens == pytest.approx(59.0)  # refill capped at capacity
    slow = TokenBucket(30, now=0.0)
    for _ in range(30):
        slow.take(0.0)
    assert slow.take(0.0) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="per_min must be > 0, got 0"):
        TokenBucket(0, now=0.0)


def test_limiter_per_key_retry_and_message():
    clock = Clock()
    rl = RateLimiter(per_key={"chat": 30, "search": 0}, per_ip={}, clock=clock)
    assert all(rl.check(kind="chat", ip="1.1.1.1", key_id="k").allowed for _ in range(30))
    d = rl.check(kind="chat", ip="1.1.1.1", key_id="k")
    assert (d.allowed, d.scope, d.kind, d.limit_per_min) == (False, "key", "chat", 30.0)
    assert d.retry_after == pytest.approx(2.0)
    assert d.message() == "rate limit exceeded for this API key: 30 chat requests per minute; retry in 2 s"
    assert rl.check(kind="chat", ip="1.1.1.1", key_id="other").allowed  # buckets are per key
    assert all(rl.check(kind="search", ip="1.1.1.1", key_id="k").allowed for _ in range(500))  # 0 = no limit
    clock.t += 2.0
    assert rl.check(kind="chat", ip="1.1.1.1", key_id="k").allowed
    with pytest.raises(ValueError, match=r"kind must be one of \['chat', 'search', 'other'\], got 'chaat'"):
        rl.check(kind="chaat", ip="1.1.1.1")
    with pytest.raises(ValueError, match="unknown kind 'chats'"):
        RateLimiter(per_key={"chats": 1}, per_ip={})


def test_limiter_key_override():
    rl = RateLimiter(per_key={"chat": 100}, per_ip={}, clock=Clock())
    overrides = ApiKey("abcd1234", "n", "user", 0.0, None, chat_per_min=2).rate_overrides()
    results = [rl.check(kind="chat", ip="1.1.1.1", key_id="a", key_overrides=overrides) for _ in range(3)]
    assert [d.allowed for d in results] == [True, True, False]
    d = rl.check(kind="chat", ip="1.1.1.1", key_id="a", key_overrides=overrides)
    assert d.limit_per_min == 2.0 and d.retry_after == pytest.approx(30.0)
    # A None override falls back to the configured default.
    fallback = {"chat": None}
    assert all(rl.check(kind="chat", ip="1.1.1.1", key_id="b", key_overrides=fallback).allowed for _ in range(100))
    assert not rl.check(kind="chat", ip="1.1.1.1", key_id="b", key_overrides=fallback).allowed


def test_limiter_ip_exemptions_exact_and_cidr():
    exempt = ["127.0.0.1", "10.0.0.0/8", "fd00::/8"]
    rl = RateLimiter(per_key={"chat": 1}, per_ip={"chat": 1}, exempt_ips=exempt, clock=Clock())
    for ip in ["127.0.0.1", "10.1.2.3", "::ffff:10.9.9.9", "fd00::1"]:
        assert all(rl.check(kind="chat", ip=ip).allowed for _ in range(5)), ip
    assert rl.check(kind="chat", ip="11.0.0.1").allowed
    d = rl.check(kind="chat", ip="11.0.0.1")
    assert (d.allowed, d.scope) == (False, "ip")
    assert d.message().startswith("rate limit exceeded for this IP address: 1 chat requests per minute; retry in 1 min")
    assert rl.check(kind="chat", ip="testclient").allowed and not rl.check(kind="chat", ip="testclient").allowed
    # Exemption is from the IP bucket only; the key's bucket still applies.
    assert rl.check(kind="chat", ip="10.0.0.1", key_id="k").allowed
    assert rl.check(kind="chat", ip="10.0.0.1", key_id="k").scope == "key"
    with pytest.raises(ValueError, match=r"not an IP address or CIDR network: \['localhost'\]"):
        RateLimiter(per_key={}, per_ip={}, exempt_ips=["localhost"])


def test_key_refusal_does_not_consume_the_ip_bucket():
    rl = RateLimiter(per_key={"chat": 1}, per_ip={"chat": 2}, clock=Clock())
    assert rl.check(kind="chat", ip="9.9.9.9", key_id="a").allowed
    assert rl.check(kind="chat", ip="9.9.9.9", key_id="a").scope == "key"  # refused: must leave the IP's token
    assert rl.check(kind="chat", ip="9.9.9.9", key_id="b").allowed
    assert rl.check(kind="chat", ip="9.9.9.9", key_id="c").scope == "ip"


def test_ip_refusal_does_not_consume_the_key_bucket():
    rl = RateLimiter(per_key={"chat": 2}, per_ip={"chat": 1}, clock=Clock())
    assert rl.check(kind="chat", ip="1.0.0.1", key_id="a").allowed
    assert rl.check(kind="chat", ip="1.0.0.1", key_id="a").scope == "ip"  # refused: must leave the key's token
    assert rl.check(kind="chat", ip="1.0.0.2", key_id="a").allowed
    assert rl.check(kind="chat", ip="1.0.0.3", key_id="a").scope == "key"


def test_bucket_count_is_bounded_oldest_dropped_first():
    clock = Clock()
    rl = RateLimiter(per_key={}, per_ip={"other": 1}, max_buckets=10, clock=clock)
    for i in range(50):
        clock.t += 1
        assert rl.check(kind="other", ip=f"10.0.0.{i}").allowed
    assert rl.stats() == {"buckets": 10}
    assert not rl.check(kind="other", ip="10.0.0.49").allowed  # recent: still limited
    assert rl.check(kind="other", ip="10.0.0.0").allowed  # oldest: dropped, starts full
    assert rl.stats() == {"buckets": 10}


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


def test_token_buckets_group_ipv6_clients_by_64():
    rl = RateLimiter(per_key={}, per_ip={"chat": 2}, clock=Clock())
    got = [rl.check(kind="chat", ip=f"2001:db8:7:7::{i}").allowed for i in range(1, 5)]
    assert got == [True, True, False, False]  # rotating addresses inside one /64 does not refill
    assert rl.check(kind="chat", ip="2001:db8:7:8::1").allowed  # the next /64 is another client
    assert all(rl.check(kind="chat", ip=f"203.0.113.{i}").allowed for i in range(1, 5))  # IPv4: per address


# ---------------------------------------------------------------- issue 16 row 17: the database is private


@pytest.fixture
def umask_022():
    old = os.umask(0o022)  # the usual umask, under which files were created 0644
    yield
    os.umask(old)


def mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


def test_the_governor_database_is_created_0600_in_0700_folders(tmp_path, umask_022):
    db = tmp_path / "made" / "by-us" / "governor.sqlite3"
    keys, ledger = KeyStore(db), UsageLedger(db)
    keys.create("alice")
    ledger.record("k", prompt_tokens=1, completion_tokens=2)
    try:
        assert oct(mode(db)) == oct(0o600)
        for side in ("-wal", "-shm"):  # SQLite gives them the database's mode
            f = db.with_name(db.name + side)
            if f.exists():
                assert oct(mode(f)) == oct(0o600), f.name
        assert oct(mode(db.parent)) == oct(0o700) and oct(mode(db.parent.parent)) == oct(0o700)
    finally:
        keys.close()
        ledger.close()


def test_an_existing_folder_is_left_alone_and_an_open_file_tightened(tmp_path, umask_022):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    db = shared / "governor.sqlite3"
    db.touch(mode=0o644)
    store = KeyStore(db)
    try:
        assert oct(mode(db)) == oct(0o600) and oct(mode(shared)) == oct(0o755)
    finally:
        store.close()
