"""Fault-injection helpers for a graph running on a local Ray (same machine as the test): find and
kill -9 Serve replicas, time their replacement, find vLLM engine processes left behind, and a steady
client load that records what a retrying client sees.

Serve replica actors (Ray 2.60): actor name ``SERVE_REPLICA::<app>#<deployment>#<unique id>``
(e.g. ``SERVE_REPLICA::ragraph#retriever#k3j9x2ab``), class name ``ServeReplica:<app>:<deployment>``,
namespace ``serve``, detached. The process title of a replica is ``ray::ServeReplica:<app>:<deployment>``
(plus ``.method`` while it runs one). The vLLM engine is a child process of the generator replica
titled ``VLLM::EngineCore``, whose own child is ``VLLM::Worker`` (``_TP0`` etc. with parallelism).

Actors are listed with ``ray.util.state.list_actors`` when the dashboard (its API server) runs;
``serve.launch.start_ray`` starts Ray with ``include_dashboard=False``, where that API is unreachable,
so the GCS actor table (``ray._private.state.actors()``, same data) is the fallback.
"""

from __future__ import annotations

import logging
import os
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import psutil

# ---------------------------------------------------------------------------------------------
# replicas


def replica_actors(deployment: str, app: str = "ragraph") -> list[dict]:
    """The ALIVE replica actors of one deployment: [{actor_id, name, pid, node_id}], by actor_id."""
    cls = f"ServeReplica:{app}:{deployment}"
    try:
        from ray.util.state import list_actors
        from ray.util.state.exception import ServerUnavailable

        try:
            rows = list_actors(filters=[("state", "=", "ALIVE"), ("class_name", "=", cls)], limit=10_000,
                               raise_on_missing_output=False)
            out = [{"actor_id": a.actor_id, "name": a.name, "pid": a.pid, "node_id": a.node_id} for a in rows]
            return sorted(out, key=lambda a: a["actor_id"])
        except ServerUnavailable:
            pass
    except ImportError:
        pass
    return gcs_replicas(app).get(deployment, [])


def gcs_replicas(app: str = "ragraph") -> dict[str, list[dict]]:
    """Every deployment's ALIVE replica actors, [{actor_id, name, pid, node_id}] by actor id, from one
    read of the GCS actor table (no dashboard needed, and cheap enough to poll)."""
    from ray._private import state

    prefix = f"ServeReplica:{app}:"
    out: dict[str, list[dict]] = {}
    for a in state.actors().values():
        if a["State"] == "ALIVE" and a["ActorClassName"].startswith(prefix):
            out.setdefault(a["ActorClassName"].removeprefix(prefix), []).append(
                {"actor_id": a["ActorID"], "name": a["Name"], "pid": a["Pid"], "node_id": a["Address"]["NodeID"]})
    return {d: sorted(rs, key=lambda a: a["actor_id"]) for d, rs in out.items()}


def kill_replica(deployment: str, app: str = "ragraph", *, actor_id: str | None = None) -> dict:
    """SIGKILL one replica's process (the first by actor id, or ``actor_id``). Local nodes only."""
    alive = replica_actors(deployment, app)
    victim = next((a for a in alive if actor_id in (None, a["actor_id"])), None)
    if victim is None:
        raise LookupError(f"no ALIVE replica of {app}/{deployment} (actor_id={actor_id}): {alive}")
    killed_at = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    return {"deployment": deployment, "app": app, "actor_id": victim["actor_id"], "pid": victim["pid"],
            "node_id": victim["node_id"], "name": victim["name"], "killed_at": killed_at}


def deployment_state(deployment: str, app: str = "ragraph") -> tuple[str, dict[str, int]]:
    """(status, {replica state: count}) as ``serve.status()`` reports them; ("MISSING", {}) if absent."""
    from ray import serve

    a = serve.status().applications.get(app)
    d = a.deployments.get(deployment) if a else None
    if d is None:
        return "MISSING", {}
    return str(getattr(d.status, "value", d.status)), {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()}


def wait_recovered(deployment: str, before_ids, *, replicas: int, app: str = "ragraph", timeout: float = 120,
                   killed_at: float | None = None, poll: float = 0.25) -> float:
    """Seconds from the kill until Serve says HEALTHY with ``replicas`` RUNNING replicas and exactly
    ``replicas`` ALIVE replica actors, none of them in ``before_ids``.

    ``before_ids``: the dict ``kill_replica`` returned (its actor id is excluded and its ``killed_at``
    is the start), or actor ids to exclude (the start is ``killed_at`` or now)."""
    if isinstance(before_ids, dict):
        killed_at = before_ids["killed_at"] if killed_at is None else killed_at
        before_ids = {before_ids["actor_id"]}
    excluded, t0 = set(before_ids), time.monotonic() if killed_at is None else killed_at
    last = None
    while True:
        status, states = deployment_state(deployment, app)
        ids = {a["actor_id"] for a in replica_actors(deployment, app)}
        last = (status, states, sorted(ids))
        if status == "HEALTHY" and states.get("RUNNING", 0) == replicas and len(ids) == replicas and not ids & excluded:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{app}/{deployment} not recovered after {timeout:.0f} s: status, replicas, actors = {last}")
        time.sleep(poll)


# ---------------------------------------------------------------------------------------------
# vLLM engine processes


def _title(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline()).strip() or p.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def vllm_orphans(since: float | None = None) -> list[dict]:
    """vLLM engine processes (title ``VLLM::...``) with no live Ray worker (``ray::...``) among their
    ancestors: reparented to init (ppid 1) or to a subreaper after their replica died.
    ``since``: only processes created at or after this ``time.time()``."""
    out = []
    for p in psutil.process_iter(["pid", "ppid", "create_time", "status"]):
        try:
            title = _title(p)
            if not title.startswith("VLLM::") or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if since is not None and p.info["create_time"] < since - 1:
                continue
            owner = next((a for a in p.parents() if _title(a).startswith("ray::")), None)
            if p.info["ppid"] != 1 and owner is not None:
                continue
            out.append({"pid": p.pid, "ppid": p.info["ppid"], "title": title, "created": p.info["create_time"],
                        "rss_mb": round(p.memory_info().rss / 2**20), "parent": _title(p.parent())[:80] if p.parent() else None})
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def kill_orphans(since: float | None = None) -> list[int]:
    """SIGKILL every orphan from ``vllm_orphans`` and its descendants; the pids signalled."""
    killed = []
    for o in vllm_orphans(since):
        try:
            p = psutil.Process(o["pid"])
            for q in [*p.children(recursive=True), p]:
                q.kill()
                killed.append(q.pid)
        except psutil.NoSuchProcess:
            pass
    return killed


def wait_no_orphans(since: float | None = None, timeout: float = 20) -> list[dict]:
    """Poll until no orphan is left (engines need a moment to notice their parent died); what is left."""
    deadline = time.monotonic() + timeout
    while (left := vllm_orphans(since)) and time.monotonic() < deadline:
        time.sleep(1)
    return left


# ---------------------------------------------------------------------------------------------
# client load

RETRY_STATUSES = {408, 409, 429}  # and every 5xx: the openai client's default policy
logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise


@dataclass
class Record:
    kind: str  # "search" | "chat"
    start: float  # time.monotonic()
    end: float = 0.0
    attempts: int = 0
    status: int | None = None  # final HTTP status; None: connection error on the last attempt
    error: str | None = None  # error text (transport error or the body's error.message)
    rag_status: str | None = None  # metadata.status ("ok" | "degraded")
    degraded: list = field(default_factory=list)  # metadata.degraded (stage names)
    replicas: dict = field(default_factory=dict)  # metadata.replicas (stage -> replica id)

    @property
    def failed(self) -> bool:
        return self.status != 200

    @property
    def clean(self) -> bool:
        return self.status == 200 and self.rag_status == "ok" and self.attempts == 1


class SteadyLoad:
    """Open-loop load at ``rate`` req/s (``mix`` cycled, default alternate search / chat), each request
    retried like the openai client: up to ``max_retries`` times on connection errors, 408, 409, 429 and 5xx,
    after ``Retry-After`` (capped at ``retry_after_cap`` s) or 0.5 s, 1 s, ... Thread-safe records.
    ``vary``: append the request number to each query so that a response cache cannot answer it."""

    SEARCH = {"query": "Is parking free for visitors?", "top_k": 3}
    CHAT = {"model": "ragraph", "max_tokens": 8, "messages": [{"role": "user", "content": "When is the tasting room open?"}]}

    def __init__(self, base_url: str, *, rate: float = 4, mix=("search", "chat"), headers: dict | None = None,
                 max_retries: int = 2, retry_after_cap: float = 5, timeout: float = 60, workers: int = 32,
                 search_body: dict | None = None, chat_body: dict | None = None, vary: bool = True) -> None:
        self.url, self.rate, self.mix, self.headers = base_url.rstrip("/"), rate, list(mix), dict(headers or {})
        self.max_retries, self.cap, self.timeout, self.workers = max_retries, retry_after_cap, timeout, workers
        self.bodies = {"search": ("/v1/search", search_body or self.SEARCH), "chat": ("/v1/chat/completions", chat_body or self.CHAT)}
        self.vary = vary
        self.records: list[Record] = []
        self._clients: list[httpx.Client] = []
        self._lock, self._stop, self._local = threading.Lock(), threading.Event(), threading.local()
        self._pool: ThreadPoolExecutor | None = None
        self._ticker: threading.Thread | None = None

    def start(self) -> SteadyLoad:
        self._stop.clear()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="steadyload")
        self._ticker = threading.Thread(target=self._tick, daemon=True, name="steadyload-ticker")
        self._ticker.start()
        return self

    def stop(self) -> list[Record]:
        """Stop sending, wait for in-flight requests, return all records by start time."""
        self._stop.set()
        self._ticker.join()
        self._pool.shutdown(wait=True)
        for c in self._clients:
            c.close()
        with self._lock:
            return sorted(self.records, key=lambda r: r.start)

    def _tick(self) -> None:
        t0, n = time.monotonic(), 0
        while not self._stop.is_set():
            self._pool.submit(self._one, self.mix[n % len(self.mix)], n)
            n += 1
            self._stop.wait(max(0.0, t0 + n / self.rate - time.monotonic()))

    def _client(self) -> httpx.Client:
        if not hasattr(self._local, "client"):
            self._local.client = httpx.Client(timeout=self.timeout, headers=self.headers)
            with self._lock:
                self._clients.append(self._local.client)
        return self._local.client

    def _one(self, kind: str, n: int) -> None:
        path, body = self.bodies[kind]
        if self.vary and kind == "search":
            body = {**body, "query": f"{body['query']} ({n})"}
        elif self.vary:
            body = {**body, "messages": [*body["messages"][:-1], {**body["messages"][-1], "content": f"{body['messages'][-1]['content']} ({n})"}]}
        rec = Record(kind, time.monotonic())
        while True:
            rec.attempts += 1
            wait = None
            try:
                r = self._client().post(self.url + path, json=body)
                rec.status, rec.error = r.status_code, None
                try:
                    data = r.json()
                except ValueError:
                    data = {}
                if r.status_code == 200:
                    meta = (data.get("rag") or {}).get("metadata", {}) if kind == "chat" else data.get("metadata", {})
                    rec.rag_status, rec.degraded, rec.replicas = meta.get("status"), meta.get("degraded") or [], meta.get("replicas") or {}
                else:
                    err = data.get("error") if isinstance(data, dict) else None
                    rec.error = (err.get("message") if isinstance(err, dict) else None) or r.text[:200]
                if r.status_code in RETRY_STATUSES or r.status_code >= 500:
                    try:
                        wait = min(float(r.headers.get("retry-after", "")), self.cap)
                    except ValueError:
                        pass
                else:
                    break
            except httpx.TransportError as e:
                rec.status, rec.error = None, f"{type(e).__name__}: {e}"
            if rec.attempts > self.max_retries:
                break
            time.sleep(wait if wait is not None else 0.5 * 2 ** (rec.attempts - 1))
        rec.end = time.monotonic()
        with self._lock:
            self.records.append(rec)

    @staticmethod
    def first_clean_after(records: list[Record], t: float) -> float | None:
        """Seconds from ``t`` to the start of the first clean request (200, status ok, one attempt) started
        after ``t`` from which on no request failed; None if there is none."""
        later = sorted((r for r in records if r.start >= t), key=lambda r: r.start)
        last_fail = max((i for i, r in enumerate(later) if r.failed), default=-1)
        return next((r.start - t for r in later[last_fail + 1:] if r.clean), None)

    @classmethod
    def summary(cls, records: list[Record], since: float | None = None, until: float | None = None,
                mark: float | None = None) -> dict:
        """Counts over the records started in [since, until); ``mark`` adds ``first_clean_after(mark)``."""
        rs = [r for r in records if (since is None or r.start >= since) and (until is None or r.start < until)]
        statuses: dict = {}
        errors: dict = {}
        for r in rs:
            key = r.status if r.status is not None else "conn_error"
            statuses[key] = statuses.get(key, 0) + 1
            if r.failed:
                errors[r.error] = errors.get(r.error, 0) + 1
        lat = [r.end - r.start for r in rs if r.status == 200]
        out = {
            "sent": len(rs), "ok": sum(not r.failed for r in rs), "failed": sum(r.failed for r in rs),
            "retried": sum(r.attempts > 1 for r in rs), "degraded": sum(r.status == 200 and r.rag_status != "ok" for r in rs),
            "statuses": statuses, "errors": errors,
            "latency_p50_s": round(statistics.median(lat), 3) if lat else None, "latency_max_s": round(max(lat), 3) if lat else None,
        }
        if mark is not None:
            fc = cls.first_clean_after(records, mark)
            out["first_clean_after_s"] = round(fc, 2) if fc is not None else None
        return out
