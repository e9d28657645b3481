"""Engines die with their owner, and ``ragraph serve`` with its Ray; the local Ray listens on loopback.

- An engine's processes (``VLLM::EngineCore``, its ``VLLM::Worker``) die when their owner is
  SIGKILLed (``deployments.engine_guard``): here stand-ins titled as vLLM's; the generator replica
  (``DeltaLLMServer``) starts the guard before its engine.
- ``ragraph serve`` refuses to start while vLLM engines of an earlier run live on with no owner,
  naming their pids.
- The embedded default's local Ray (``serve.launch.start_ray``) listens on loopback only, and
  ``ragraph serve`` exits with a clear message when that Ray goes away (``ray stop --force``).
- The real thing (in the default run, 1.5 to 3 minutes): ``ragraph serve`` on the embedded
  default with the real vLLM CPU engine, then ``ray stop --force``: no engine process is left
  within 10 s.

``ray stop --force`` is emulated, scoped to the Ray under test (the real one would stop every Ray
on the machine): :func:`ray_stop_force` SIGKILLs, at once, every process under the test's
``ragraph serve`` that ``ray stop`` would match, found with Ray's own list of names and patterns
(``ray.autoscaler._private.constants.RAY_PROCESSES``, what ``ray stop`` reads), so the emulation
tracks Ray.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

FAKE_ENGINE = textwrap.dedent("""
    import subprocess, sys, time
    import setproctitle
    setproctitle.setproctitle("VLLM::EngineCore")
    subprocess.Popen([sys.executable, "-c",
                      "import setproctitle, time; setproctitle.setproctitle('VLLM::Worker'); time.sleep(300)"])
    time.sleep(300)
""")


def _title(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline()) or p.name()
    except psutil.Error:
        return ""


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _kill(pids) -> None:
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()


def _engines_under(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [p for p in root.children(recursive=True) if _title(p).startswith("VLLM::")]
    except psutil.NoSuchProcess:
        return []


def _wait_for(what, timeout: float, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(poll)


def ray_stop_force(root: psutil.Process) -> list[str]:
    """``ray stop --force`` for the Ray under ``root`` only: SIGKILL, at once, every process below
    ``root`` that ``ray stop`` matches (its own list, ``RAY_PROCESSES``: a keyword matched against
    the process name, or against the joined command line). Returns the names of those killed."""
    from ray.autoscaler._private.constants import RAY_PROCESSES

    matched = []
    for p in root.children(recursive=True):
        try:
            name, cmd = p.name(), subprocess.list2cmdline(p.cmdline())
        except psutil.Error:
            continue
        if any(keyword in (name if by_name else cmd) for keyword, by_name in RAY_PROCESSES):
            matched.append((p, name))
    for p, _ in matched:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    return [name for _, name in matched]


def listening_sockets(procs: list[psutil.Process]) -> dict[str, list[str]]:
    """'name (pid)' -> the TCP/UDP addresses each process listens on."""
    out = {}
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
            name = f"{p.name()} ({p.pid})"
        except psutil.Error:
            continue
        addrs = [f"{c.laddr.ip}:{c.laddr.port}" for c in conns
                 if c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr)]  # SOCK_DGRAM: bound
        if addrs:
            out[name] = addrs
    return out


def not_loopback(sockets: dict[str, list[str]]) -> dict[str, list[str]]:
    def loopback(addr: str) -> bool:
        ip = ipaddress.ip_address(addr.rpartition(":")[0].strip("[]"))
        if getattr(ip, "ipv4_mapped", None):
            ip = ip.ipv4_mapped
        return ip.is_loopback

    return {k: bad for k, v in sockets.items() if (bad := [a for a in v if not loopback(a)])}


# --- the engine guard ------------------------------------------------------------------------

OWNER = textwrap.dedent("""
    import subprocess, sys, time
    from deployments.engine_guard import ensure_guard
    ensure_guard()
    engine = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
    print("started", engine.pid, flush=True)
    time.sleep(300)
""")


def test_engine_processes_die_when_their_owner_is_sigkilled(tmp_path):
    """An owner (as a replica: its guard, then an engine whose processes are titled as vLLM's
    engine core and worker) is SIGKILLed: both engine processes are gone within 10 s, though
    they are children of init by then and no Ray is there to reap them."""
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    owner = subprocess.Popen([sys.executable, str(script), FAKE_ENGINE], cwd=REPO, stdout=subprocess.PIPE, text=True)
    engines: list[int] = []
    try:
        line = owner.stdout.readline()
        assert line.startswith("started"), line
        root = psutil.Process(owner.pid)
        found = _wait_for(lambda: len(_engines_under(root)) == 2, 30)
        assert found, f"no stand-in engine under the owner: {[_title(p) for p in root.children(recursive=True)]}"
        engines = [p.pid for p in _engines_under(root)]
        time.sleep(1.5)  # the guard lists the engine processes every second
        owner.kill()
        owner.wait()
        t0 = time.monotonic()
        gone = _wait_for(lambda: not _alive(engines), 10)
        assert gone, f"engine processes outlived their owner by 10 s: {[_title(psutil.Process(p)) for p in _alive(engines)]}"
        print(f"engine processes gone {time.monotonic() - t0:.2f} s after their owner")
    finally:
        owner.kill()
        _kill(_alive(engines))


def test_replica_starts_its_guard_before_the_engine(monkeypatch):
    """The generator replica (``DeltaLLMServer``, started as Serve starts it) starts the engine
    guard before its engine, and a health check restarts a guard that is gone."""
    import asyncio

    import deployments.engine_guard as guard
    from common.config import load_config
    from deployments.generator import llm_config
    from deployments.llm_adapter import DeltaLLMServer

    from ray.serve.llm import LLMServer

    calls: list[str] = []
    monkeypatch.setattr(guard, "ensure_guard", lambda: calls.append("guard"))

    async def engine_start(self):  # LLMServer.start: the engine (and, on a Ray, its telemetry)
        calls.append("engine")

    async def engine_health(self):
        calls.append("health")

    monkeypatch.setattr(LLMServer, "start", engine_start)
    monkeypatch.setattr(LLMServer, "check_health", engine_health)
    server = DeltaLLMServer.sync_init(llm_config(load_config(environ={})))
    asyncio.run(server.start())
    assert calls == ["guard", "engine"], calls
    asyncio.run(server.check_health())
    assert calls[2:] == ["guard", "health"], calls


def _orphan_engine() -> int:
    """A process titled ``VLLM::EngineCore`` whose parent exited: a child of init, as an engine
    whose replica and Ray were SIGKILLed."""
    code = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', sys.argv[1]], start_new_session=True, "
            "stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid)")
    sleeper = "import setproctitle, time; setproctitle.setproctitle('VLLM::EngineCore'); time.sleep(120)"
    out = subprocess.run([sys.executable, "-c", code, sleeper], capture_output=True, text=True, check=True)
    pid = int(out.stdout.split()[0])
    ok = _wait_for(lambda: _title(psutil.Process(pid)).startswith("VLLM::") and psutil.Process(pid).ppid() == 1, 10)
    assert ok, "the stand-in orphan did not come up as a child of init"
    return pid


def test_serve_refuses_to_start_beside_orphaned_engines(monkeypatch, capsys):
    """``ragraph serve`` names the orphan and its memory, and starts nothing (old code: deployed)."""
    import serve.launch
    from cli.main import main

    def no_deploy(*a, **k):
        raise AssertionError("ragraph serve deployed beside an orphaned engine")

    monkeypatch.setattr(serve.launch, "deploy", no_deploy)
    pid = _orphan_engine()
    try:
        rc = main(["serve", "--verbose", "--port", "8127"])
        err = capsys.readouterr().err
        assert rc == 1, err
        assert "refusing to start" in err and f"pid {pid} VLLM::EngineCore" in err and "kill -9" in err, err
        assert "GB" in err, err
    finally:
        _kill([pid])


# --- the local Ray of `ragraph serve`: loopback only, and serve exits when it goes -------------

SERVE_WITHOUT_GRAPH = textwrap.dedent("""
    import sys
    import serve.launch
    from cli.main import main

    def start_ray_only(cfg, *, address=None, verbose=False, progress=print):
        serve.launch.start_ray(cfg, address=address, verbose=verbose)
        return 0.0

    serve.launch.deploy = start_ray_only  # the real start_ray and blocking loop, no graph
    sys.exit(main(["serve", "--verbose", "--port", "8127"]))
""")


def _serve_process(args: list[str], out: Path, env: dict | None = None, script: Path | None = None) -> subprocess.Popen:
    """``ragraph serve ARGS`` (or ``script``), its output in ``out``.stdout / ``out``.stderr."""
    cmd = [sys.executable, str(script)] if script else [str(BIN / "ragraph"), "serve", *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=out.with_suffix(".stdout").open("w"),
                            stderr=out.with_suffix(".stderr").open("w"), text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def _read_until(proc: subprocess.Popen, out: Path, marker: str, timeout: float) -> str:
    def seen() -> bool:
        return marker in out.with_suffix(".stdout").read_text() or proc.poll() is not None

    _wait_for(seen, timeout, poll=0.5)
    text = out.with_suffix(".stdout").read_text()
    assert marker in text, f"no {marker!r} in {timeout:.0f} s: {text[-3000:]}{out.with_suffix('.stderr').read_text()[-3000:]}"
    return text


def _stop(proc: subprocess.Popen) -> None:
    """Leave nothing of a test's `ragraph serve` behind: its whole process tree, by pid."""
    with contextlib.suppress(psutil.NoSuchProcess):
        tree = psutil.Process(proc.pid).children(recursive=True)
        _kill([p.pid for p in tree])
    proc.kill()
    proc.wait(10)


def test_local_ray_listens_on_loopback_and_serve_exits_when_it_goes(tmp_path):
    """``ragraph serve``'s own local Ray (``start_ray``, no graph): every Ray process, the driver
    included, listens on loopback only (old code: the machine's address and ``::``); after
    ``ray stop --force`` ``ragraph serve`` exits within 15 s with status 1, saying that its Ray
    stopped (old code: kept running)."""
    script = tmp_path / "serve_no_graph.py"
    script.write_text(SERVE_WITHOUT_GRAPH)
    out = tmp_path / "serve"
    proc = _serve_process([], out, env={"RAY_AUTH_MODE": "disabled"}, script=script)
    try:
        _read_until(proc, out, "ragraph is ready", 120)
        root = psutil.Process(proc.pid)
        time.sleep(2)  # the raylet's first idle worker
        ray_procs = [root, *root.children(recursive=True)]
        assert "raylet" in {_name(p) for p in ray_procs}, [_name(p) for p in ray_procs]
        sockets = listening_sockets(ray_procs)
        assert sockets and not not_loopback(sockets), f"Ray listens beyond loopback: {not_loopback(sockets)}"
        killed = ray_stop_force(root)
        assert set(killed) >= {"raylet", "gcs_server"}, killed
        t0 = time.monotonic()
        try:
            rc = proc.wait(15)
        except subprocess.TimeoutExpired:
            pytest.fail("ragraph serve still runs 15 s after its Ray was stopped")
        err = out.with_suffix(".stderr").read_text()
        print(f"ragraph serve exited {time.monotonic() - t0:.1f} s after ray stop --force: {err.strip()[-300:]}")
        assert rc == 1, err
        assert "error: the local Ray stopped under ragraph serve" in err and "raylet" in err, err
    finally:
        _stop(proc)


# --- the real thing (about 1.5 to 3 minutes: a cold start of the graph with the real engine) ---------

def test_ray_stop_force_leaves_no_engine_behind(tmp_path, local_cfg, provisioned):
    """``ragraph serve`` on the embedded default (configs/local.yaml, auth off, a temporary index,
    the real vLLM CPU engine under a Serve replica), over real HTTP: every process of its Ray and
    of the engine listens on loopback only (but for Serve's own inter-deployment gRPC listener of
    each replica), then ``ray stop --force``: no vLLM engine process of this run is left 10 s
    later, and ``ragraph serve`` exits saying why."""
    import json
    import urllib.request

    from conftest import write_corpus
    from indexing.jobs import index_source

    index_source(local_cfg, write_corpus(tmp_path / "src"), tmp_path / "index", log=lambda _: None)
    port = 8129
    env = {"RAGRAPH__INDEXING__DIR": str(tmp_path / "index"), "RAGRAPH__HTTP__PORT": str(port),
           "RAGRAPH__GOVERNOR__DB": str(tmp_path / "governor.sqlite3"), "RAGRAPH__RERANKER__ENABLED": "false",
           "RAGRAPH__OBSERVABILITY__QUERY_LOG__PATH": str(tmp_path / "queries.jsonl")}
    out = tmp_path / "serve"
    proc = _serve_process(["--verbose"], out, env=env)
    engines: list[int] = []
    try:
        _read_until(proc, out, "ragraph is ready", 400)
        body = json.dumps({"model": "ragraph", "messages": [{"role": "user", "content": "When is the tasting room open?"}]})
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
        assert "10 am" in answer["choices"][0]["message"]["content"], answer
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
        engines = [p.pid for p in tree if _title(p).startswith("VLLM::")]
        assert engines, [_title(p)[:60] for p in tree]
        sockets = listening_sockets(tree)
        # Ray Serve 2.60 binds each replica's inter-deployment gRPC server to [::]:0, hard-coded
        # (ray/serve/_private/replica.py, Replica._on_initialized; Ray's token interceptor guards
        # it): that one wildcard listener per replica is the only exception allowed here
        beyond = not_loopback(sockets)
        serve_grpc = {k: v for k, v in beyond.items()
                      if k.startswith("ray::ServeReplica:") and len(v) == 1 and v[0].rpartition(":")[0] == "::"}
        assert beyond.keys() == serve_grpc.keys(), f"listening beyond loopback: {beyond}"
        assert any(k.startswith("raylet") for k in sockets) and any(k.startswith("gcs_server") for k in sockets), sockets
        ray_stop_force(root)
        t0 = time.monotonic()
        gone = _wait_for(lambda: not _alive(engines), 10)
        took = time.monotonic() - t0
        assert gone, f"vLLM engine processes alive 10 s after ray stop --force: {[_title(psutil.Process(p)) for p in _alive(engines)]}"
        print(f"engines {engines} gone {took:.1f} s after ray stop --force")
        rc = proc.wait(30)
        err = out.with_suffix(".stderr").read_text()
        assert rc == 1 and "the local Ray stopped under ragraph serve" in err, err[-2000:]
    finally:
        _stop(proc)
        _kill(_alive(engines))
