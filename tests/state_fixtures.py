"""The state database every store test runs against, twice: a SQLite file and a real PostgreSQL
server (``postgres_url``, tests/conftest.py), each test on a database of its own at the code's
schema head. ``from state_fixtures import state_db`` in a test module."""

from __future__ import annotations


import pytest

from servers import fresh_postgres  # noqa: F401  (tests import it from here)




@pytest.fixture(params=["sqlite", "postgresql"])
def state_db(request, tmp_path):
    """A :class:`state.db.Database` upgraded to head: SQLite in ``tmp_path``, or a fresh PostgreSQL database."""
    from state.db import Database

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.sqlite3'}"
    else:
        url = fresh_postgres(request.getfixturevalue("postgres_url"))
    db = Database(url)
    db.upgrade()
    yield db
    db.close()
