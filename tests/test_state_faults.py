"""The service under a steady client load while its stores fail: the PostgreSQL server stopped for
10 s, Redis stopped. The in-process app (serve.local, the same routes and pipeline as the graph)
runs on uvicorn with a real PostgreSQL state and real Redis counters, auth on, every request's key
checked against the database (``key_cache_s: 0``). A client that retries like the openai SDK
(after ``Retry-After``) loses no request, none hangs, and the service resumes by itself. A usage
record written while the database is down is charged exactly once when it is back."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from faults.harness import SteadyLoad
from servers import free_port


def _wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout:g} s")


@pytest.fixture()
def service(local_cfg, built_index, postgres_server, redis_server):
    """(base URL, admin key, key id, cfg): the in-process app on uvicorn over the two real servers."""
    import uvicorn

    from serve.local import create_app
    from state.db import Database
    from state.keys import SqlKeys

    data = local_cfg.model_dump()
    data["indexing"]["dir"] = str(built_index[1])
    data["state"] = {"url": postgres_server.url, "connect_timeout_s": 1}
    g = data["governor"]
    g["auth"] = {"enabled": True, "key_cache_s": 0}
    g["rate_limits"].update(storage=redis_server.url, exempt_ips=[],
                            per_key={"chat": 100000, "search": 100000, "other": 100000},
                            per_ip={"chat": 100000, "search": 100000, "other": 100000})
    g["cache"]["enabled"] = False
    data["generator"]["answer_mode"] = "extractive"
    cfg = type(local_cfg).model_validate(data)
    db = Database(cfg.state.url)
    db.upgrade()
    token, key = SqlKeys(db).create("load", scope="admin")
    db.close()
    app = create_app(cfg)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait_until(lambda: server.started, 30, "uvicorn start")
    try:
        yield f"http://127.0.0.1:{port}", token, key.id, cfg
    finally:
        server.should_exit = True
        thread.join(15)


def test_postgres_stopped_for_10_s_under_load(service, postgres_server):
    url, token, key_id, cfg = service
    auth = {"Authorization": f"Bearer {token}"}
    load = SteadyLoad(url, rate=5, headers=auth, max_retries=10, retry_after_cap=2, timeout=30).start()
    time.sleep(5)
    postgres_server.stop()
    down_at = time.monotonic()
    t = time.monotonic()
    r = httpx.post(url + "/v1/search", json={"query": "parking"}, headers=auth, timeout=30)
    took = time.monotonic() - t
    assert r.status_code == 503 and r.json()["error"]["code"] == "state_unavailable", r.text
    assert int(r.headers["retry-after"]) >= 1 and took < 10  # answered, not hung
    time.sleep(max(0.0, 10 - (time.monotonic() - down_at)))
    postgres_server.start()
    up_at = time.monotonic()
    time.sleep(8)
    records = load.stop()
    during = [x for x in records if down_at <= x.start < up_at]
    summary = SteadyLoad.summary(records, mark=up_at)
    assert summary["sent"] >= 80, summary
    assert summary["failed"] == 0, summary  # nothing lost: every request answered once the client retried
    assert any(x.attempts > 1 for x in during), summary  # the outage was seen (and retried)
    assert max(x.end - x.start for x in records) < 40, summary  # none hung
    assert summary["first_clean_after_s"] is not None and summary["first_clean_after_s"] < 8, summary


def test_usage_written_while_postgres_is_down_is_charged_once_when_it_is_back(local_cfg, postgres_server):
    """A usage record that cannot be written (the server stopped for 10 s) is retried in the background
    until the server is back, then charged exactly once: no record lost, none doubled."""
    import asyncio

    from flow.calls import StageCalls
    from state.db import Database
    from state.keys import SqlKeys
    from state.usage import SqlUsage

    data = local_cfg.model_dump()
    data["state"] = {"url": postgres_server.url, "connect_timeout_s": 1}
    cfg = type(local_cfg).model_validate(data)
    db = Database(cfg.state.url)
    db.upgrade()
    _, key = SqlKeys(db).create("usage")
    calls = StageCalls(cfg, stages=None)

    async def run() -> None:
        calls.record_usage(key.id, 10, 5)  # written at once
        await calls.drain()
        postgres_server.stop()
        for _ in range(20):
            calls.record_usage(key.id, 10, 5)
        await asyncio.sleep(10)
        postgres_server.start()
        await asyncio.wait_for(calls.drain(), 70)

    asyncio.run(run())
    day = SqlUsage(db).usage(key.id)["day"]
    db.close()
    assert (day["requests"], day["prompt_tokens"], day["completion_tokens"]) == (21, 210, 105)


def test_redis_stopped_fails_closed_then_resumes(service, redis_server):
    url, token, _, _ = service
    auth = {"Authorization": f"Bearer {token}"}
    assert httpx.post(url + "/v1/search", json={"query": "parking"}, headers=auth, timeout=30).status_code == 200
    load = SteadyLoad(url, rate=5, mix=("search",), headers=auth, max_retries=10, retry_after_cap=2, timeout=30).start()
    time.sleep(3)
    redis_server.stop()
    down_at = time.monotonic()
    t = time.monotonic()
    r = httpx.post(url + "/v1/search", json={"query": "parking"}, headers=auth, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "rate_limits_unavailable", r.text
    assert "retry-after" in r.headers and time.monotonic() - t < 10
    time.sleep(max(0.0, 5 - (time.monotonic() - down_at)))
    redis_server.start()
    up_at = time.monotonic()
    time.sleep(6)
    records = load.stop()
    summary = SteadyLoad.summary(records, mark=up_at)
    assert summary["failed"] == 0, summary
    assert any(x.attempts > 1 for x in records if down_at <= x.start < up_at), summary
    assert summary["first_clean_after_s"] is not None and summary["first_clean_after_s"] < 6, summary
