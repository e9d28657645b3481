"""load_tests/bench_state.py in its smallest form (SQLite, memory:// limits, no servers): it runs,
its JSON holds a row per variant with positive numbers, and the ledger check it makes holds: every
request charged once (the usage rows hold requests x tokens), a request id charged again refused."""

from __future__ import annotations

import json

from load_tests import bench_state


def test_bench_state_quick_sqlite(tmp_path):
    out = tmp_path / "state.json"
    rc = bench_state.main(["--quick", "--stores", "sqlite", "--limits", "memory", "--out", str(out)])
    data = json.loads(out.read_text())
    assert rc == 0

    rows = data["rows"]
    assert {(r["store"], r["limits"], r["variant"]) for r in rows} == {
        ("sqlite", "memory", "key_cache_s=0"), ("sqlite", "memory", "key_cache_s=30")}
    n, rounds = data["args"]["n"], data["args"]["rounds"]
    for r in rows:
        assert r["n"] == n * rounds
        assert 0 < r["ci_low_ms"] <= r["p50_ms"] <= r["ci_high_ms"], r
        assert r["p50_ms"] <= r["p95_ms"], r
        assert r["admit_p50_ms"] > 0 and r["record_p50_ms"] > 0 and r["cpu_ms"] > 0, r
        assert len(r["segment_p50_ms"]) == 2 * rounds  # ABBA: two segments a round
    (diff,) = data["diffs"]
    assert diff["factor"] == "variant" and diff["pairs"] == 2 * rounds
    assert diff["ci_low_ms"] <= diff["diff_ms"] <= diff["ci_high_ms"]
    assert data["scale"] is None  # needs postgresql and redis

    (check,) = data["checks"]
    made = sum(r["n"] for r in rows) + data["warmup"] * len(rows)  # every request the bench sent, warm-ups too
    assert check["records_made"] == made
    assert check["ledger_requests"] == made
    assert check["ledger_tokens"] == made * check["tokens_per_request"] == made * bench_state.TOKENS
    assert check["recharged"] > 0 and check["recharges_accepted"] == 0
    assert check["ok"] is True
