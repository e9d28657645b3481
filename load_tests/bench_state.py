"""What admission and accounting cost per request on the state database, as an ingress replica runs them.

    python -m load_tests.bench_state [--rounds 3] [--n 500] [--stores sqlite,postgresql] [--limits memory,redis]
                                     [--pg-url URL] [--redis-url URL] [--out load_tests/results/state.json]
    python -m load_tests.bench_state --quick --stores sqlite --limits memory --no-scale   # a smoke test, seconds
    python -m load_tests.bench_state --stores sqlite --limits memory,memory-lib --no-scale  # our memory storage or the library's

One request here is what the ingress does for an admitted chat, in-process, no Ray:
:meth:`deployments.admission.Admission.admit` (the address window tested, the key verified, the
key's and the address's moving windows hit, the token quota and budget checked and the tokens
reserved), then :meth:`Admission.settle` and the usage record (:meth:`deployments.governor.Governor.record`
with a fresh request id: one committed transaction). Every database call goes through
:meth:`flow.calls.StageCalls.state` on its thread pool, as in the ingress (``verify`` on a key-cache
miss, ``record`` for every request, awaited here where the ingress writes it in the background).

* **Latency** (one request at a time): p50 and p95 ms per request, the client's CPU ms per request
  (``time.process_time``: the event loop and the state threads) and, for servers this script
  started, the servers' CPU ms per request (``/proc/<pid>/stat``: PostgreSQL's postmaster and its
  backends, redis-server). For each store (``sqlite``: a file in a temp folder; ``postgresql``: a
  real server), each rate-limit storage (``memory://``, ``redis://``) and two variants: the key
  cache off (``governor.auth.key_cache_s: 0``, the key and its usage read from the database on
  every request) and the default key cache.
* **Scale-out**: admissions/s of two concurrent "replicas" (two processes, ``multiprocessing``
  spawn, each with its own Governor, StageCalls and Admission on the same PostgreSQL and Redis,
  ``--concurrency`` requests in flight each) against one of them alone, over windows of the same
  length.

Method (the machine is shared and noisy): the sides are interleaved ABBA. Each latency round runs
every configuration twice, in one order and then the reverse (``n/2`` requests a segment), so a
drift in the machine's load falls on every configuration alike; each scale round runs 1, 2, 2, 1
processes. ``--rounds`` (>= 3) such rounds. Intervals are bootstrap 95% intervals: of a row's p50
(resampling segments, then requests within them), of paired differences between two configurations
(segments of the same round and pass), and of the scale ratio (geometric mean of the paired
windows' 2-replica/1-replica ratios).

At the end the ledger is checked: every request was charged exactly once (the usage rows hold
requests x tokens) and recording a request id again charges nothing. A failed check exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import math
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from load_tests._common import print_table, write_json  # noqa: E402

BIG = 10**6  # requests per minute: high enough that nothing in the run is refused
PROMPT_TOKENS, COMPLETION_TOKENS = 100, 20
TOKENS = PROMPT_TOKENS + COMPLETION_TOKENS
RESERVE = 300  # what the chat holds at admission (prompt + max_tokens)
ENDPOINT = "/v1/chat/completions"
NO_CACHE = "key_cache_s=0"
TARGETS_MS = {"sqlite": (1.0, 0.3), "postgresql": (3.0, 1.0)}  # admission + accounting p50: (bar, goal)
SCALE_BAR = 1.8  # 2 replicas / 1 replica admissions/s
IPS = [f"10.1.{i // 250}.{i % 250 + 1}" for i in range(256)]
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- configuration -------------------------------------------------------------------------------


def bench_config(limits_url: str, key_cache_s: float | None):
    """The service's config (configs/local.yaml, no environment) with auth on, limits that refuse
    nothing but are all counted, quotas that are checked but never reached, no answer cache."""
    from common.config import load_config

    cfg = load_config(environ={})
    g = cfg.governor
    rl = g.rate_limits
    rates = type(rl.per_key)(chat=BIG, search=BIG, other=BIG)
    auth = {"enabled": True, **({} if key_cache_s is None else {"key_cache_s": key_cache_s})}
    g = g.model_copy(update={
        "auth": g.auth.model_copy(update=auth),
        "rate_limits": rl.model_copy(update={"enabled": True, "storage": limits_url, "exempt_ips": [],
                                             "per_ip": rates, "per_key": rates}),
        "quotas": g.quotas.model_copy(update={"daily_tokens": 10**12, "monthly_tokens": 10**13}),
        "cache": g.cache.model_copy(update={"enabled": False}),
    })
    return cfg.model_copy(update={"governor": g})


def open_db(url: str, cfg, *, upgrade: bool):
    from state.db import Database

    s = cfg.state
    db = Database(url, pool_size=s.pool_size, connect_timeout_s=s.connect_timeout_s,
                  statement_timeout_s=s.statement_timeout_s)
    if upgrade:
        db.upgrade()
    return db


class Replica:
    """What one ingress replica holds for this path: a Governor over the store, its StageCalls
    (the state threads) and one Admission per rate-limit storage and key-cache setting."""

    def __init__(self, cfg, db, tokens: list[str], key_ids: list[str] | None = None) -> None:
        from deployments.governor import Governor
        from flow.calls import StageCalls

        self.gov = Governor(cfg, db=db)
        self.calls = StageCalls(cfg, stages=None, governor=self.gov)
        self.tokens = tokens
        self.key_ids = key_ids or []
        self.recorded = 0  # usage records committed (the ledger check's expectation)
        self.sample_ids: list[tuple[str, str]] = []  # a few (key id, request id) charged, to charge again

    def admission(self, cfg, ingress_replicas: int = 1, storage: Any = None):
        from deployments.admission import Admission

        return Admission(cfg.governor, ingress_replicas=ingress_replicas, storage=storage)

    async def request(self, adm, i: int) -> tuple[float, float]:
        """One admitted chat, as the ingress runs it: (admission s, accounting s)."""
        t0 = time.perf_counter()
        v = await adm.admit(self.tokens[i % len(self.tokens)], IPS[i % len(IPS)], ENDPOINT,
                            verify=functools.partial(self.calls.state, self.gov.verify), reserve_tokens=RESERVE)
        if not v.allowed:
            raise RuntimeError(f"a bench request was refused ({v.status} {v.code}): {v.message}")
        t1 = time.perf_counter()
        adm.settle(v.key_id, v.reserved, TOKENS, adm.cost(PROMPT_TOKENS, COMPLETION_TOKENS))
        rid = uuid.uuid4().hex  # what StageCalls.record_usage makes for each record
        charged = await self.calls.state(self.gov.record, v.key_id, PROMPT_TOKENS, COMPLETION_TOKENS,
                                         request_id=rid, attempts=1)
        if not charged:
            raise RuntimeError(f"request id {rid} was already charged")
        self.recorded += 1
        if len(self.sample_ids) < 5:
            self.sample_ids.append((v.key_id, rid))
        return t1 - t0, time.perf_counter() - t1

    def close(self) -> None:
        self.calls._state_pool.shutdown(wait=True)


# -- server CPU ----------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, int, int]:
    """(ppid, utime + stime, cutime + cstime) of ``pid`` in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    fields = s[s.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 (state) is fields[0]
    return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def tree_cpu_s(root: int) -> float:
    """CPU seconds of ``root`` and its children (PostgreSQL: the postmaster and its backends),
    those that exited included (counted in the parent's cutime once reaped)."""
    _, own, gone = _stat(root)
    ticks = own + gone
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == root:
            continue
        try:
            ppid, t, _ = _stat(int(name))
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
        if ppid == root:
            ticks += t
    return ticks / CLK_TCK


@dataclass
class Servers:
    """The PostgreSQL and Redis the run uses; the pids of those it started (for their CPU)."""

    pg_url: str | None = None
    redis_url: str | None = None
    pg_pid: int | None = None
    redis_pid: int | None = None
    started: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def cpu_s(self, store: str, limits: str) -> float | None:
        """CPU seconds so far of the servers this (store, limits) pair uses; None when one of them was
        not started here (its pid is unknown)."""
        total = 0.0
        if store == "postgresql":
            if self.pg_pid is None:
                return None
            total += tree_cpu_s(self.pg_pid)
        if limits == "redis":
            if self.redis_pid is None:
                return None
            total += tree_cpu_s(self.redis_pid)
        return total

    def close(self) -> None:
        while self.started:
            server = self.started.pop()
            try:
                server.close()
            except Exception as e:  # noqa: BLE001 - stop the others anyway
                print(f"could not stop {type(server).__name__}: {e}", file=sys.stderr)


def start_servers(args) -> Servers:
    """The servers the run needs: the URLs given, else throwaway ones (tests/servers.py). The
    throwaway PostgreSQL keeps fsync on (tests/servers.py turns it off: a test needs no durability,
    a commit latency does) unless ``--pg-fsync off``."""
    srv = Servers(pg_url=args.pg_url, redis_url=args.redis_url)
    need_pg = "postgresql" in args.stores and not srv.pg_url
    need_redis = "redis" in args.limits and not srv.redis_url
    if not (need_pg or need_redis):
        return srv
    sys.path.insert(0, str(REPO / "tests"))
    import servers

    try:
        if need_pg:
            fsync = args.pg_fsync

            class Postgres(servers.PostgresServer):
                def start(self) -> None:
                    if self.running:
                        return
                    opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync={fsync} "
                            "-c max_connections=200")
                    self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w",
                              "-t", "60", "start")

            pg = Postgres()
            srv.started.append(pg)
            srv.pg_url = pg.url
            srv.pg_pid = int((pg.data / "postmaster.pid").read_text().split()[0])
            srv.notes.append(f"PostgreSQL {pg.bin.parent.name} started here (fsync={fsync}, data in {pg.root})")
        if need_redis:
            rs = servers.RedisServer()
            srv.started.append(rs)
            srv.redis_url = rs.url
            srv.redis_pid = rs.proc.pid
            srv.notes.append(f"redis-server started here (no persistence), port {rs.port}")
    except BaseException:
        srv.close()
        raise
    return srv


# -- statistics ----------------------------------------------------------------------------------


def _rng(seed: int):
    import numpy as np

    return np.random.default_rng(seed)


def percentile_ci(stats) -> tuple[float, float]:
    import numpy as np

    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def median_ci(segments: list[list[float]], boot: int, seed: int) -> tuple[float, float]:
    """95% interval of the pooled median: resample the segments, then the values within each."""
    import numpy as np

    rng = _rng(seed)
    arrs = [np.asarray(s) for s in segments]
    k = len(arrs)
    out = np.empty(boot)
    for b in range(boot):
        out[b] = np.median(np.concatenate([rng.choice(arrs[j], len(arrs[j])) for j in rng.integers(0, k, k)]))
    return percentile_ci(out)


def mean_ci(values: list[float], boot: int, seed: int) -> tuple[float, float]:
    """95% interval of the mean of paired differences (resampling the pairs)."""
    import numpy as np

    rng = _rng(seed)
    v = np.asarray(values, dtype=float)
    idx = rng.integers(0, len(v), (boot, len(v)))
    return percentile_ci(v[idx].mean(axis=1))


def _median(xs: list[float]) -> float:
    import numpy as np

    return float(np.median(xs))


def _p95(xs: list[float]) -> float:
    import numpy as np

    return float(np.percentile(xs, 95))


# -- latency -------------------------------------------------------------------------------------


@dataclass
class Config:
    store: str
    limits: str
    variant: str
    replica: Replica
    adm: Any
    i: int = 0  # the next request's index (keys and addresses round robin)
    segments: dict[tuple[int, int], list[float]] = field(default_factory=dict)  # (round, pass) -> total ms
    admit_ms: list[float] = field(default_factory=list)
    record_ms: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    server_cpu_s: float | None = 0.0

    @property
    def name(self) -> str:
        return f"{self.store}/{self.limits}/{self.variant}"


async def segment(c: Config, n: int, servers: Servers, key: tuple[int, int] | None) -> None:
    srv0 = servers.cpu_s(c.store, c.limits)
    cpu0 = time.process_time()
    totals = []
    for _ in range(n):
        a, r = await c.replica.request(c.adm, c.i)
        c.i += 1
        if key is not None:
            totals.append((a + r) * 1000)
            c.admit_ms.append(a * 1000)
            c.record_ms.append(r * 1000)
    cpu = time.process_time() - cpu0
    srv1 = servers.cpu_s(c.store, c.limits)
    if key is None:  # a warm-up
        return
    c.segments[key] = totals
    c.cpu_s += cpu
    c.server_cpu_s = None if srv0 is None or c.server_cpu_s is None else c.server_cpu_s + (srv1 - srv0)


async def latency(args, servers: Servers, tmp: Path) -> tuple[list[Config], dict[str, Replica], dict[str, Any]]:
    from state.db import sqlite_url

    replicas: dict[str, Replica] = {}
    dbs = []
    configs: list[Config] = []
    default_cache = None
    try:
        for store in args.stores:
            url = sqlite_url(tmp / "state.sqlite3") if store == "sqlite" else servers.pg_url
            base = bench_config("memory://", None)
            db = open_db(url, base, upgrade=True)
            dbs.append(db)
            from state.keys import SqlKeys

            keys = SqlKeys(db)
            made = [keys.create(f"bench-state-{i}", chat_per_min=BIG, search_per_min=BIG, other_per_min=BIG)
                    for i in range(args.keys)]
            replicas[store] = Replica(base, db, [t for t, _ in made], [k.id for _, k in made])
            for limits in args.limits:
                limits_url = servers.redis_url if limits == "redis" else "memory://"
                for cache in (0.0, None):
                    cfg = bench_config(limits_url, cache)
                    default_cache = default_cache if cache == 0.0 else cfg.governor.auth.key_cache_s
                    variant = NO_CACHE if cache == 0.0 else f"key_cache_s={cfg.governor.auth.key_cache_s:g}"
                    storage = None
                    if limits == "memory-lib":  # the limits library's own memory storage, to compare with ours
                        from limits.storage import storage_from_string

                        storage = storage_from_string("async+memory://")
                    configs.append(Config(store, limits, variant, replicas[store],
                                          replicas[store].admission(cfg, storage=storage)))
        for c in configs:  # warm-up: connections, key caches, the first statements
            await segment(c, args.warmup, servers, None)
        half = args.n // 2
        for r in range(args.rounds):
            t = time.perf_counter()
            for p, order in enumerate((configs, configs[::-1])):  # A B ... B A
                for c in order:
                    await segment(c, half if p == 0 else args.n - half, servers, (r, p))
            print(f"latency round {r + 1}/{args.rounds}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    except BaseException:
        for rep in replicas.values():
            rep.close()
        for db in dbs:
            db.close()
        raise
    return configs, replicas, {"dbs": dbs, "default_key_cache_s": default_cache}


def latency_rows(configs: list[Config], args) -> list[dict]:
    rows = []
    for k, c in enumerate(configs):
        every = [x for seg in c.segments.values() for x in seg]
        n = len(every)
        lo, hi = median_ci(list(c.segments.values()), args.boot, args.seed + k)
        p50 = _median(every)
        bar, goal = TARGETS_MS[c.store]
        rows.append({
            "store": c.store, "limits": c.limits, "variant": c.variant, "n": n,
            "p50_ms": round(p50, 4), "p95_ms": round(_p95(every), 4),
            "ci_low_ms": round(lo, 4), "ci_high_ms": round(hi, 4),
            "admit_p50_ms": round(_median(c.admit_ms), 4), "record_p50_ms": round(_median(c.record_ms), 4),
            "cpu_ms": round(c.cpu_s * 1000 / n, 4),
            "server_cpu_ms": None if c.server_cpu_s is None or (c.store == "sqlite" and c.limits != "redis")
            else round(c.server_cpu_s * 1000 / n, 4),
            "bar_ms": bar, "goal_ms": goal,
            "target": "goal" if p50 <= goal else "bar" if p50 <= bar else "MISSED",
            "segment_p50_ms": [round(_median(s), 4) for s in c.segments.values()],
        })
    return rows


def paired_diffs(configs: list[Config], args) -> list[dict]:
    """b - a for each two configurations that differ in one factor: per (round, pass) segment p50s."""
    out = []
    factors = ("store", "limits", "variant")
    for i, x in enumerate(configs):
        for y in configs[i + 1:]:
            differ = [f for f in factors if getattr(x, f) != getattr(y, f)]
            if len(differ) != 1:
                continue
            f = differ[0]
            # b - a: redis - memory, postgresql - sqlite, the key cache off - on
            a, b = (y, x) if f == "variant" and x.variant == NO_CACHE else (x, y)
            d = [_median(b.segments[k]) - _median(a.segments[k]) for k in a.segments]
            lo, hi = mean_ci(d, args.boot, args.seed + 1000 + len(out))
            at = ", ".join(getattr(a, g) for g in factors if g != f)
            out.append({"factor": f, "b_minus_a": f"{getattr(b, f)} - {getattr(a, f)}", "at": at, "pairs": len(d),
                        "diff_ms": round(sum(d) / len(d), 4), "ci_low_ms": round(lo, 4), "ci_high_ms": round(hi, 4)})
    return out


# -- ledger check ---------------------------------------------------------------------------------


def ledger_check(store: str, replica: Replica, extra_records: int) -> dict:
    """Every request charged exactly once: the usage rows of the run's keys (this month) hold the
    records made times their tokens, and charging a request id again is refused and changes nothing."""
    gov = replica.gov
    key_ids = replica.key_ids

    def totals() -> tuple[int, int]:
        month = [gov.ledger.usage(k)["month"] for k in key_ids]
        return sum(m["requests"] for m in month), sum(m["total_tokens"] for m in month)

    before = totals()
    again = [gov.record(k, PROMPT_TOKENS, COMPLETION_TOKENS, request_id=rid) for k, rid in replica.sample_ids]
    after = totals()
    expected = replica.recorded + extra_records
    ok = (before == after == (expected, expected * TOKENS)) and not any(again) and len(again) > 0
    return {"store": store, "records_made": expected, "ledger_requests": after[0], "ledger_tokens": after[1],
            "tokens_per_request": TOKENS, "recharged": len(again), "recharges_accepted": sum(again), "ok": ok}


# -- scale-out -----------------------------------------------------------------------------------


def _replica_main(conn, spec: dict) -> None:
    """One scale-out replica (a spawned process): its own Governor, StageCalls and Admission over
    the shared PostgreSQL and Redis; runs windows on command."""
    try:
        cfg = bench_config(spec["redis_url"], spec["key_cache_s"])
        db = open_db(spec["pg_url"], cfg, upgrade=False)
        rep = Replica(cfg, db, spec["tokens"])
        adm = rep.admission(cfg, ingress_replicas=2)
        loop = asyncio.new_event_loop()
        state = {"i": spec["offset"]}

        async def window(start_at: float, duration: float) -> dict:
            await asyncio.sleep(max(0.0, start_at - time.time()))
            end = time.perf_counter() + duration
            cpu0 = time.process_time()
            done = [0]
            lat: list[float] = []

            async def worker() -> None:
                while time.perf_counter() < end:
                    i = state["i"]
                    state["i"] += 1
                    a, r = await rep.request(adm, i)
                    if time.perf_counter() <= end:
                        done[0] += 1
                        lat.append((a + r) * 1000)

            await asyncio.gather(*(worker() for _ in range(spec["concurrency"])))
            return {"done": done[0], "per_s": done[0] / duration, "cpu_s": time.process_time() - cpu0,
                    "p50_ms": _median(lat) if lat else None, "recorded": rep.recorded}

        conn.send(("ready", None))
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                break
            conn.send(("result", loop.run_until_complete(window(msg[1], msg[2]))))
        conn.send(("stopped", rep.recorded))
        rep.close()
        db.close()
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise


def _reply(conn, timeout: float) -> Any:
    if not conn.poll(timeout):
        raise RuntimeError(f"a scale-out replica did not answer within {timeout:g} s")
    kind, value = conn.recv()
    if kind == "error":
        raise RuntimeError(f"a scale-out replica failed:\n{value}")
    return value


def scale(args, servers: Servers, tokens: list[str], key_cache_s: float | None) -> dict:
    """1 replica against 2 (same PostgreSQL and Redis): admissions/s, windows ABBA per round."""
    from load_tests import bench_state as this  # the spawned processes import the function from here

    ctx = mp.get_context("spawn")
    procs, conns = [], []
    spec = {"pg_url": servers.pg_url, "redis_url": servers.redis_url, "tokens": tokens,
            "key_cache_s": key_cache_s, "concurrency": args.concurrency}
    windows = []
    recorded = 0
    stopped = False
    try:
        for w in range(2):
            a, b = ctx.Pipe()
            p = ctx.Process(target=this._replica_main, args=(b, {**spec, "offset": w * 7919}), daemon=True)
            p.start()
            procs.append(p)
            conns.append(a)
        for c in conns:
            _reply(c, 120)

        def run(which: list[int], duration: float) -> dict:
            start_at = time.time() + 0.3
            srv0 = servers.cpu_s("postgresql", "redis")
            for w in which:
                conns[w].send(("run", start_at, duration))
            res = [_reply(conns[w], duration + 60) for w in which]
            srv1 = servers.cpu_s("postgresql", "redis")
            done = sum(r["done"] for r in res)
            return {"replicas": len(which), "workers": which, "admissions": done, "per_s": done / duration,
                    "client_cpu_ms": round(sum(r["cpu_s"] for r in res) * 1000 / max(done, 1), 4),
                    "server_cpu_ms": None if srv0 is None else round((srv1 - srv0) * 1000 / max(done, 1), 4),
                    "p50_ms": [round(r["p50_ms"], 3) if r["p50_ms"] else None for r in res]}

        run([0, 1], args.warmup_s)  # warm-up: connections, key caches
        pairs = []
        for r in range(args.rounds):
            one_a = run([0], args.window)  # A B B A; the lone replica alternates
            two_a = run([0, 1], args.window)
            two_b = run([0, 1], args.window)
            one_b = run([1], args.window)
            for x in (one_a, two_a, two_b, one_b):
                windows.append({"round": r + 1, **x})
            pairs += [(one_a["per_s"], two_a["per_s"]), (one_b["per_s"], two_b["per_s"])]
            print(f"scale round {r + 1}/{args.rounds}: 1 replica {one_a['per_s']:.0f}, {one_b['per_s']:.0f}/s; "
                  f"2 replicas {two_a['per_s']:.0f}, {two_b['per_s']:.0f}/s", file=sys.stderr)
        for c in conns:
            c.send(("stop",))
        recorded = sum(_reply(c, 60) for c in conns)
        stopped = True
    finally:
        for p in procs:  # after an error nothing tells a replica to stop: end it
            p.join(10 if stopped else 0)
            if p.is_alive():
                p.terminate()
                p.join(5)
    logs = [math.log(b / a) for a, b in pairs]
    lo, hi = mean_ci(logs, args.boot, args.seed + 2000)
    diffs = [b - a for a, b in pairs]
    dlo, dhi = mean_ci(diffs, args.boot, args.seed + 2001)
    ratio = math.exp(sum(logs) / len(logs))
    one = [w["per_s"] for w in windows if w["replicas"] == 1]
    two = [w["per_s"] for w in windows if w["replicas"] == 2]
    return {
        "store": "postgresql", "limits": "redis", "variant": f"key_cache_s={key_cache_s:g}" if key_cache_s is not None
        else "default", "concurrency": args.concurrency, "window_s": args.window, "pairs": len(pairs),
        "one_per_s": round(sum(one) / len(one), 1), "two_per_s": round(sum(two) / len(two), 1),
        "ratio": round(ratio, 4), "ci_low": round(math.exp(lo), 4), "ci_high": round(math.exp(hi), 4),
        "diff_per_s": round(sum(diffs) / len(diffs), 1), "diff_ci_low": round(dlo, 1), "diff_ci_high": round(dhi, 1),
        "bar": SCALE_BAR, "met": ratio >= SCALE_BAR, "windows": windows, "records": recorded,
    }


# -- main ----------------------------------------------------------------------------------------


def _csv(allowed: tuple[str, ...]):
    def parse(v: str) -> list[str]:
        items = [x.strip() for x in v.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}, got {v!r}")
        return [x for x in allowed if x in items]  # one order: the differences read b - a alike every run
    return parse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=500, help="requests per configuration per round (two segments of n/2)")
    p.add_argument("--rounds", type=int, default=3, help="ABBA rounds (>= 3)")
    p.add_argument("--stores", type=_csv(("sqlite", "postgresql")), default=["sqlite", "postgresql"])
    p.add_argument("--limits", type=_csv(("memory", "redis", "memory-lib")), default=["memory", "redis"],
                   help="memory-lib: the limits library's own memory storage (deployments.admission."
                        "SweptMemoryStorage replaces it), to compare with memory")
    p.add_argument("--pg-url", default=None, help="a PostgreSQL to use (a scratch database: keys and usage are "
                   "written to it); default: start a throwaway server")
    p.add_argument("--redis-url", default=None, help="a Redis to use; default: start a throwaway redis-server")
    p.add_argument("--pg-fsync", choices=("on", "off"), default="on", help="fsync of the throwaway PostgreSQL")
    p.add_argument("--keys", type=int, default=64, help="API keys per store (requests go round robin)")
    p.add_argument("--warmup", type=int, default=50, help="unmeasured requests per configuration first")
    p.add_argument("--no-scale", dest="scale", action="store_false",
                   help="skip the scale-out run (it needs postgresql and redis)")
    p.add_argument("--window", type=float, default=5.0, help="seconds per scale-out window")
    p.add_argument("--warmup-s", type=float, default=2.0, help="seconds of unmeasured scale-out first")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight per scale-out replica")
    p.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test")
    p.add_argument("--out", type=Path, default=REPO / "load_tests" / "results" / "state.json")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.rounds, args.keys, args.warmup = min(args.n, 30), 3, min(args.keys, 8), min(args.warmup, 5)
        args.window, args.warmup_s, args.boot = min(args.window, 0.5), min(args.warmup_s, 0.3), min(args.boot, 300)
    if args.rounds < 3 or args.n < 2:
        p.error("--rounds must be >= 3 and --n >= 2")
    run_scale = args.scale and "postgresql" in args.stores and "redis" in args.limits
    servers = start_servers(args)
    t_start = time.time()
    load0 = os.getloadavg()
    try:
        with tempfile.TemporaryDirectory(prefix="ragraph-bench-state-") as d:
            configs, replicas, held = asyncio.run(latency(args, servers, Path(d)))
            try:
                rows = latency_rows(configs, args)
                diffs = paired_diffs(configs, args)
                sc = None
                if run_scale:
                    sc = scale(args, servers, replicas["postgresql"].tokens, held["default_key_cache_s"])
                checks = [ledger_check(s, rep, sc["records"] if sc and s == "postgresql" else 0)
                          for s, rep in replicas.items()]
            finally:
                for rep in replicas.values():
                    rep.close()
                for db in held["dbs"]:
                    db.close()
    finally:
        servers.close()
    load1 = os.getloadavg()

    print()
    print_table(rows, ["store", "limits", "variant", "n", "p50_ms", "ci_low_ms", "ci_high_ms", "p95_ms",
                       "admit_p50_ms", "record_p50_ms", "cpu_ms", "server_cpu_ms", "bar_ms", "goal_ms", "target"])
    print("\npaired differences (b - a, mean of segment p50s, bootstrap 95%):")
    print_table(diffs, ["factor", "b_minus_a", "at", "pairs", "diff_ms", "ci_low_ms", "ci_high_ms"])
    if sc is not None:
        print("\nscale-out (PostgreSQL + Redis, admissions/s, 2 replicas vs 1):")
        print_table([sc], ["variant", "concurrency", "window_s", "pairs", "one_per_s", "two_per_s", "ratio", "ci_low",
                           "ci_high", "diff_per_s", "diff_ci_low", "diff_ci_high", "bar", "met"])
        print_table(sc["windows"], ["round", "replicas", "workers", "admissions", "per_s", "client_cpu_ms",
                                    "server_cpu_ms", "p50_ms"])
    elif args.scale:
        print("\nscale-out skipped: it needs --stores postgresql and --limits redis")
    print("\nledger (every request charged once):")
    print_table(checks, ["store", "records_made", "ledger_requests", "ledger_tokens", "tokens_per_request",
                         "recharged", "recharges_accepted", "ok"])
    for note in servers.notes:
        print(f"note: {note}")
    write_json(args.out, {
        "benchmark": "admission + accounting per request on the state database (load_tests/bench_state.py)",
        "command": "python -m load_tests.bench_state " + " ".join(argv if argv is not None else sys.argv[1:]),
        "path": f"Admission.admit {ENDPOINT} (reserve {RESERVE}) + settle + Governor.record ({PROMPT_TOKENS}+"
                f"{COMPLETION_TOKENS} tokens, fresh request id), state calls through StageCalls.state",
        "targets": {"p50_ms": {s: {"bar": b, "goal": g} for s, (b, g) in TARGETS_MS.items()}, "scale_ratio": SCALE_BAR},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "servers": servers.notes, "loadavg_start": load0, "loadavg_end": load1,
        "seconds": round(time.time() - t_start, 1), "warmup": args.warmup,
        "rows": rows, "diffs": diffs, "scale": sc, "checks": checks,
    })
    if not all(c["ok"] for c in checks):
        print("LEDGER CHECK FAILED: a request was not charged exactly once", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
