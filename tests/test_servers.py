"""The real servers of tests/servers.py answer, refuse once stopped, and answer again once started."""

import psycopg
import pytest
import redis


def test_postgres_answers_stops_and_starts_again(postgres_server):
    u = postgres_server.url.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(u) as c:
        assert c.execute("select 1").fetchone() == (1,)
    postgres_server.stop()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(u, connect_timeout=2)
    postgres_server.start()
    with psycopg.connect(u) as c:
        assert c.execute("select 2").fetchone() == (2,)

def test_redis_answers_stops_and_starts_again(redis_server):
    r = redis.Redis.from_url(redis_server.url, socket_timeout=1)
    assert r.ping()
    redis_server.stop()
    with pytest.raises(redis.ConnectionError):
        r.ping()
    redis_server.start()
    assert r.ping()


def test_the_session_servers_answer(postgres_url, redis_url):
    """``postgres_url``/``redis_url``, the session's servers: the URL forms the state and cache code take."""
    assert postgres_url.startswith("postgresql+psycopg://") and postgres_url.endswith("/ragraph")
    with psycopg.connect(postgres_url.replace("postgresql+psycopg", "postgresql")) as c:
        assert c.execute("select current_database(), 1").fetchone() == ("ragraph", 1)
    assert redis_url.startswith("redis://127.0.0.1:") and redis_url.endswith("/0")
    assert redis.Redis.from_url(redis_url, socket_timeout=1).ping()
