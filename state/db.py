"""The one database of the service's state, over SQLAlchemy 2 (Core, no ORM): a SQLite file on the
embedded default, PostgreSQL (psycopg 3) on a cluster. The stores (:mod:`state.keys`, ...) take a
:class:`Database` and run their statements through :meth:`Database.tx` (a write) or
:meth:`Database.read`; they never see which of the two it is, save through :attr:`Database.dialect`
where the SQL must differ.

* SQLite: WAL, ``synchronous=FULL`` (a committed usage record survives a crash), a 5 s busy timeout;
  writes take the lock up front (``BEGIN IMMEDIATE``) so two writers queue instead of failing. The
  file is created 0600 in 0700 folders.
* PostgreSQL: a connection pool checked before use (a restarted server is reconnected to), a
  connect timeout and a statement timeout (``state.connect_timeout_s``, ``state.statement_timeout_s``):
  a server that is down fails a call within seconds, never hangs it.

The schema is created and upgraded by Alembic migrations (``state/migrations``), one command:
``ragraph db upgrade``; :func:`open_database` runs it at open when ``state.migrate`` is ``auto``
(the default), under a lock, so replicas starting together upgrade once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError

from common.files import private_file

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
Dialect = Literal["sqlite", "postgresql"]


class StateError(RuntimeError):
    """The state database cannot be used (unreachable, refused, not upgraded); the message says why."""


class StateUnavailable(StateError):
    """The database did not answer (a server down or a lock held too long): worth a retry later."""


def sqlite_url(path: str | Path) -> str:
    return f"sqlite:///{Path(path).expanduser()}"


STATE_URL_ENV = "RAGRAPH__STATE__URL"


def url_of(cfg) -> str:
    """The state database of an :class:`common.config.AppConfig`: ``$RAGRAPH__STATE__URL`` in this
    process's environment (a Serve replica gets its config from the Serve config, which must not hold
    the password; its pod or node sets the variable from a secret), else ``state.url``, else the
    SQLite file ``governor.db``."""
    return os.environ.get(STATE_URL_ENV) or cfg.state.url or sqlite_url(cfg.governor.db)


def describe(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    return make_url(url).render_as_string(hide_password=True)


class Database:
    """An engine and its transactions. Safe to share between threads; one per process and URL
    (:func:`open_database`)."""

    def __init__(self, url: str, *, pool_size: int = 5, connect_timeout_s: float = 3,
                 statement_timeout_s: float = 5) -> None:
        u = make_url(url)
        self.url = url
        self.dialect: Dialect = "sqlite" if u.get_backend_name() == "sqlite" else "postgresql"
        if self.dialect == "sqlite":
            if not u.database or u.database == ":memory:":
                raise StateError(f"{describe(url)}: the state needs a SQLite file (sqlite:////path/state.sqlite3)")
            self.path: Path | None = Path(u.database).expanduser()
            private_file(self.path)
            self.engine: Engine = create_engine(
                f"sqlite:///{self.path}", pool_size=pool_size, max_overflow=2 * pool_size, pool_timeout=30,
                connect_args={"timeout": 5.0, "check_same_thread": False},
            )
            self._sqlite_events()
        elif u.get_backend_name() == "postgresql":
            self.path = None
            if u.get_driver_name() not in ("psycopg", None):
                raise StateError(f"{describe(url)}: use the psycopg 3 driver (postgresql+psycopg://...)")
            u = u.set(drivername="postgresql+psycopg")
            self.engine = create_engine(
                u, pool_size=pool_size, max_overflow=pool_size, pool_timeout=connect_timeout_s + 2,
                pool_pre_ping=True, pool_recycle=1800,
                connect_args={"connect_timeout": max(1, round(connect_timeout_s)),
                              "options": f"-c statement_timeout={int(statement_timeout_s * 1000)}"},
            )
        else:
            raise StateError(f"{describe(url)}: the state database is sqlite:/// or postgresql+psycopg://")

    def _sqlite_events(self) -> None:
        @event.listens_for(self.engine, "connect")
        def connect(dbapi, _record) -> None:
            dbapi.isolation_level = None  # we issue BEGIN ourselves (below): nothing is left pending
            dbapi.execute("PRAGMA busy_timeout = 5000")
            mode = dbapi.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StateError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); put the file on a local disk")
            dbapi.execute("PRAGMA synchronous = FULL")
            private_file(self.path)  # the -wal/-shm files, now that they exist

        @event.listens_for(self.engine, "begin")
        def begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("read") else "BEGIN IMMEDIATE")

    @contextlib.contextmanager
    def tx(self) -> Iterator[Connection]:
        """A write transaction, committed at the end (rolled back on an exception)."""
        with _unavailable(self.url), self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction (SQLite: deferred, takes no write lock)."""
        with _unavailable(self.url), self.engine.connect().execution_options(read=True) as conn, conn.begin():
            yield conn

    def execute(self, sql: str, params: dict[str, Any] | None = None) -> Any:
        """One statement in a transaction of its own; its rows as a list for a SELECT, else the rowcount."""
        with self.tx() as c:
            r = c.execute(text(sql), params or {})
            return r.all() if r.returns_rows else r.rowcount

    # -- schema ----------------------------------------------------------------------------------

    def revision(self) -> str | None:
        """The schema's Alembic revision; None for a database never upgraded (empty, or made before migrations)."""
        with self.read() as c:
            if not inspect(c).has_table("alembic_version"):
                return None
            return c.execute(text("SELECT version_num FROM alembic_version")).scalar()

    def upgrade(self, target: str = "head") -> tuple[str | None, str | None]:
        """Upgrade the schema to ``target`` (one process at a time: a file lock beside a SQLite file, an
        advisory lock on PostgreSQL); returns (revision before, revision after)."""
        from alembic import command

        with self._migration_lock() as conn:
            before = _revision(conn)
            cfg = alembic_config(conn)
            command.upgrade(cfg, target)
            after = _revision(conn)
            if conn.in_transaction():
                conn.commit()
        return before, after

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[Connection]:
        if self.dialect == "sqlite":
            lock = self.path.with_name(self.path.name + ".migrate-lock")
            private_file(lock)
            with open(lock, "a") as f, _unavailable(self.url):
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    with self.engine.connect() as conn:
                        yield conn
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
        else:
            with _unavailable(self.url), self.engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(727100)"))  # ragraph's migration lock
                conn.commit()
                try:
                    yield conn
                finally:
                    if conn.in_transaction():
                        conn.rollback()
                    conn.execute(text("SELECT pg_advisory_unlock(727100)"))
                    conn.commit()

    def close(self) -> None:
        self.engine.dispose()


def alembic_config(conn: Connection):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def _revision(conn: Connection) -> str | None:
    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


@contextlib.contextmanager
def _unavailable(url: str) -> Iterator[None]:
    """A database that does not answer (refused, timed out, locked) as :class:`StateUnavailable`."""
    try:
        yield
    except OperationalError as e:
        raise StateUnavailable(f"the state database {describe(url)} did not answer: "
                               f"{str(e.orig).strip().splitlines()[0] if e.orig else e}") from e
    except DBAPIError as e:
        if e.connection_invalidated:
            raise StateUnavailable(f"the state database {describe(url)} dropped the connection") from e
        raise


_OPEN: dict[str, Database] = {}
_OPEN_LOCK = threading.Lock()


def open_database(cfg, *, migrate: bool | None = None) -> Database:
    """The process's :class:`Database` for ``cfg`` (one per URL), its schema upgraded when
    ``state.migrate`` is ``auto`` (or ``migrate`` says so); with ``manual``, a schema behind the
    code's head is refused with the command that upgrades it."""
    url = url_of(cfg)
    s = cfg.state
    with _OPEN_LOCK:
        db = _OPEN.get(url)
        if db is None:
            db = Database(url, pool_size=s.pool_size, connect_timeout_s=s.connect_timeout_s,
                          statement_timeout_s=s.statement_timeout_s)
            if migrate if migrate is not None else s.migrate == "auto":
                db.upgrade()
            elif (rev := db.revision()) != head_revision():
                db.close()
                raise StateError(f"the state database {describe(url)} is at schema {rev or '(none)'}, the code needs "
                                 f"{head_revision()}: run `ragraph db upgrade` (state.migrate is 'manual')")
            _OPEN[url] = db
        return db


def close_all() -> None:
    """Dispose of every open :class:`Database` (tests, shutdown)."""
    with _OPEN_LOCK:
        for db in _OPEN.values():
            db.close()
        _OPEN.clear()
