"""The state URL a replica opens: its own environment's RAGRAPH__STATE__URL wins over the config it
was given (a Serve config carries no password)."""

from __future__ import annotations

from types import SimpleNamespace

from common.config import StateConfig
from state.db import STATE_URL_ENV, url_of


def cfg(url=None):
    return SimpleNamespace(state=StateConfig(url=url), governor=SimpleNamespace(db="/tmp/x/governor.sqlite3"))


def test_the_environment_names_the_database_with_its_password(monkeypatch):
    monkeypatch.delenv(STATE_URL_ENV, raising=False)
    assert url_of(cfg()) == "sqlite:////tmp/x/governor.sqlite3"
    assert url_of(cfg("postgresql+psycopg://ragraph@db:5432/ragraph")) == "postgresql+psycopg://ragraph@db:5432/ragraph"
    monkeypatch.setenv(STATE_URL_ENV, "postgresql+psycopg://ragraph:s3cret@db:5432/ragraph")
    assert url_of(cfg("postgresql+psycopg://ragraph@db:5432/ragraph")) == "postgresql+psycopg://ragraph:s3cret@db:5432/ragraph"
