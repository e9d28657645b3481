"""The engine guard: vLLM's engine processes die with the process that owns them.

vLLM's ``AsyncLLM`` starts its engine core (title ``VLLM::EngineCore``) as a child process, and
the engine core starts its workers (``VLLM::Worker``). Neither watches its parent. When the owner
is SIGKILLed together with its Ray (``ray stop --force``, a stop that escalates to SIGKILL, the
OOM killer), both live on as orphans of init and keep the model's memory (about 3 GB each on CPU,
the GPU's memory on a GPU).

:func:`ensure_guard` starts a small watcher process (:func:`start_guard`) for the calling process,
the owner (a generator replica, or the in-process app), once. While the owner lives, the watcher records every
``VLLM::`` process under it, with the children of those (pid and start time). When the owner is
gone it SIGKILLs the recorded processes that still run, then exits. The start time rules out a
reused pid. The watcher runs in a session of its own, and its command line matches none of the
names that ``ray stop`` looks for, so it outlives whatever killed the owner. It looks at the owner every
:data:`POLL_S` (an engine outlives its owner by about that long) and lists the engine processes
every :data:`SCAN_S`.

:func:`orphaned_engines` lists the vLLM processes whose owner is already gone (their first
ancestor that is not a vLLM process is init). ``ragraph serve`` refuses to start while any of them
holds memory, and :func:`describe_orphans` says which.

The watcher runs as ``python -m deployments.engine_guard OWNER_PID OWNER_START_TIME [POLL_S]``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

ENGINE_PREFIX = "VLLM::"  # vLLM's process titles (setproctitle): VLLM::EngineCore, VLLM::Worker, VLLM::Worker_TP0
POLL_S = 0.25  # how often the watcher looks at its owner
SCAN_S = 1.0  # how often it lists the engine processes under it (a walk of /proc)


def _title(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline()).strip() or p.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def _alive(p: psutil.Process) -> bool:
    """Running, and the same process (``is_running`` compares the start time): not a zombie."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def engine_processes(owner: psutil.Process) -> list[psutil.Process]:
    """The ``VLLM::`` processes under ``owner`` and every process under one of them."""
    try:
        below = owner.children(recursive=True)  # one walk of /proc
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []
    parent: dict[int, int] = {}
    for p in below:
        try:
            parent[p.pid] = p.ppid()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    engines = {p.pid for p in below if p.pid in parent and _title(p).startswith(ENGINE_PREFIX)}
    grown = True
    while grown:  # ... and whatever sits under one of them
        more = {pid for pid, ppid in parent.items() if ppid in engines} - engines
        engines |= more
        grown = bool(more)
    return [p for p in below if p.pid in engines]


def watch(owner_pid: int, owner_created: float, *, poll_s: float = POLL_S) -> list[int]:
    """Record ``owner``'s engine processes until ``owner`` is gone, then SIGKILL those still
    running. Returns the pids killed (none if the owner was gone, or another process, at the start)."""
    try:
        owner = psutil.Process(owner_pid)
        if abs(owner.create_time() - owner_created) > 0.05:
            return []
    except psutil.NoSuchProcess:
        return []
    known: dict[int, psutil.Process] = {}
    next_scan = 0.0
    while _alive(owner):
        if time.monotonic() >= next_scan:
            for p in engine_processes(owner):
                known.setdefault(p.pid, p)
            known = {pid: p for pid, p in known.items() if _alive(p)}
            next_scan = time.monotonic() + SCAN_S
        time.sleep(poll_s)
    # an engine may have started a process since the last scan: what is under a recorded one counts too
    for p in list(known.values()):
        try:
            for q in p.children(recursive=True):
                known.setdefault(q.pid, q)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    killed = []
    for p in known.values():
        try:
            p.kill()  # psutil checks the start time first: a reused pid is left alone
            killed.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(list(known.values()), timeout=5)
    return killed


def start_guard(owner_pid: int | None = None, *, poll_s: float = POLL_S) -> subprocess.Popen:
    """Start the watcher for ``owner_pid`` (default: this process). Call it before the engine
    starts: an engine whose start-up hangs is covered too."""
    owner = psutil.Process(owner_pid or os.getpid())
    root = str(Path(__file__).resolve().parent.parent)  # the folder that holds deployments/
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (root, os.environ.get("PYTHONPATH")) if x)}
    return subprocess.Popen(
        [sys.executable, "-m", "deployments.engine_guard", str(owner.pid), repr(owner.create_time()), str(poll_s)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True, env=env, cwd=root,
    )


_GUARDS: dict[int, subprocess.Popen] = {}


def ensure_guard() -> subprocess.Popen:
    """This process's watcher: started on the first call, and again if it is gone (one per process)."""
    guard = _GUARDS.get(os.getpid())
    if guard is None or guard.poll() is not None:
        guard = _GUARDS[os.getpid()] = start_guard()
    return guard


def orphaned_engines() -> list[dict]:
    """vLLM processes whose owner is gone: the first ancestor that is not a vLLM process is init
    (pid 1), or there is none. Each: pid, ppid, title, rss_mb."""
    out = []
    for p in psutil.process_iter(["pid", "ppid", "status"]):
        try:
            title = _title(p)
            if not title.startswith(ENGINE_PREFIX) or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            top = p
            while (parent := top.parent()) is not None and _title(parent).startswith(ENGINE_PREFIX):
                top = parent
            if top.ppid() > 1:
                continue
            out.append({"pid": p.pid, "ppid": p.info["ppid"], "title": title,
                        "rss_mb": round(p.memory_info().rss / 2**20)})
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return sorted(out, key=lambda o: o["pid"])


def describe_orphans(orphans: list[dict]) -> str:
    """What ``ragraph serve`` says when it refuses to start beside ``orphans``."""
    total = sum(o["rss_mb"] for o in orphans) / 1024
    each = ", ".join(f"pid {o['pid']} {o['title']} ({o['rss_mb'] / 1024:.1f} GB)" for o in orphans)
    pids = " ".join(str(o["pid"]) for o in orphans)
    return (f"{len(orphans)} vLLM engine process{'es' if len(orphans) != 1 else ''} of an earlier run "
            f"{'are' if len(orphans) != 1 else 'is'} still alive with no owner, holding {total:.1f} GB: {each}. "
            f"A new generator would not fit beside them; stop them with `kill -9 {pids}` and start again "
            "(`ps -eo pid,ppid,rss,cmd | grep VLLM` lists them)")


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: python -m deployments.engine_guard OWNER_PID OWNER_START_TIME [POLL_S]", file=sys.stderr)
        return 2
    watch(int(argv[0]), float(argv[1]), poll_s=float(argv[2]) if len(argv) == 3 else POLL_S)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
