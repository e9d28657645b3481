"""Real PostgreSQL and Redis servers for the tests, each on a free loopback port in a folder of its
own, started and stopped by the fixtures in tests/conftest.py (``postgres_url``, ``redis_url``, and
``postgres_server``/``redis_server`` for a test that stops its server).

`make test` installs Debian's ``postgresql`` and ``redis-server``; a missing binary fails the fixture
with the command that installs it. PostgreSQL refuses to run as root, so as root it runs as the
``postgres`` user (made by Debian's package) in a folder that user owns."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

INSTALL_HINT = "`make test` installs it (Debian's postgresql and redis-server packages)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not answer within {timeout:g} s (last error: {last})")


def postgres_bin() -> Path:
    """The newest installed: by version number (15 after 9.6), not by name."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: [int(x) for x in Path(p).parent.parent.name.split(".") if x.isdigit()])
    if not found:
        raise RuntimeError(f"PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb); {INSTALL_HINT}")
    return Path(found[-1]).parent


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder: trust authentication on loopback only, user
    ``ragraph``, database ``ragraph``. ``stop()`` then ``start()`` keeps its data and port."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="ragraph-pg-"))
        self.data = self.root / "data"
        self.user = None if os.getuid() != 0 else "postgres"
        if self.user is not None:
            pw = pwd.getpwnam(self.user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        try:  # a server that started but failed later (createdb) is stopped, its folder removed
            self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "ragraph", "--no-sync", "-E", "UTF8")
            self.start()
            self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "ragraph", "ragraph")
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://ragraph@127.0.0.1:{self.port}/ragraph"

    def _run(self, tool: str, *args: str, check: bool = True) -> int:
        cmd = [str(self.bin / tool), *args]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
        return out.returncode

    @property
    def running(self) -> bool:
        """Whether the server runs (``pg_ctl status``; a postmaster.pid left by a killed server is not one)."""
        return self.data.is_dir() and self._run("pg_ctl", "-D", str(self.data), "status", check=False) == 0

    def start(self) -> None:
        """Start the server (a no-op when it runs); waits until it accepts connections."""
        if self.running:
            return
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "-t", "60", "start")

    def stop(self) -> None:
        """``pg_ctl stop -m fast`` (open connections are cut); a no-op when it is not running."""
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


class RedisServer:
    """One ``redis-server`` on a free loopback port, nothing saved to disk. ``stop()`` then
    ``start()`` keeps the port (the data is gone: it was never saved). ``password``: the server
    requires it (``requirepass``); ``url`` does not carry it."""

    def __init__(self, password: str | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError(f"redis-server is not installed; {INSTALL_HINT}")
        self.exe = exe
        self.password = password
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="ragraph-redis-"))
        self.proc: subprocess.Popen | None = None
        try:
            self.start()
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server (a no-op when it runs); waits until it answers PING. A server that
        does not answer in time is stopped, not left behind."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.root), "--logfile", str(self.root / "redis.log"),
             *(["--requirepass", self.password] if self.password else [])],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        # retry=None: redis.Redis() otherwise retries a refused connection 3 times with a backoff of up
        # to 2, 4 and 8 s (redis-py 7's default), which made each start take 0.3 to 2 s instead of ~20 ms
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                             socket_timeout=1, socket_connect_timeout=1, retry=None)
        deadline = time.monotonic() + 10
        try:
            while True:
                if self.proc.poll() is not None:  # could not start (the port taken meanwhile, say)
                    logfile = self.root / "redis.log"
                    log = logfile.read_text(errors="replace").strip().splitlines()[-5:] if logfile.exists() else []
                    raise RuntimeError(f"redis-server exited at start ({self.proc.returncode}): " + " | ".join(log))
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not answer PING within 10 s")
                time.sleep(0.02)
        except BaseException:
            self.stop()
            raise
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def fresh_postgres(url: str, prefix: str = "t") -> str:
    """A new, empty database on the server of ``url``; its URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(url).set(database=name).render_as_string(hide_password=False)
