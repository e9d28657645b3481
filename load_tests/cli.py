"""``ragraph loadtest``: drive a running service and write ``report.json``, ``report.md`` and plots.

    ragraph loadtest --mode open --rate 1 --duration 60 --out runs/open-1
    ragraph loadtest --mode closed --users 4 --think 2 --duration 60 --out runs/closed-4
    ragraph loadtest --mode sweep --rates 0.25,0.5,1,2 --slo-p95-ms 8000 --duration 60 --out runs/sweep

Loopback (127.0.0.1) is the default target; any other host needs ``--allow-remote``.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import platform
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

from load_tests.workload import DEMO_PROMPTS, WorkloadError


class LoadTestError(RuntimeError):
    pass


def _redacted(argv: list[str]) -> list[str]:
    """The command line for the report, without the API key."""
    out, hide = [], False
    for a in argv:
        out.append("***" if hide else "--api-key=***" if a.startswith("--api-key=") else a)
        hide = a == "--api-key"
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the service (default: loopback)")
    p.add_argument("--allow-remote", action="store_true", help="allow a target that is not a loopback address")
    p.add_argument("--mode", choices=["open", "closed", "sweep"], default="open",
                   help="open: Poisson arrivals at --rate; closed: --users with --think time; sweep: a series of either")
    p.add_argument("--rate", type=float, default=1.0, help="open loop: requests/s (Poisson arrivals)")
    p.add_argument("--users", type=int, default=4, help="closed loop: concurrent users")
    p.add_argument("--think", type=float, default=1.0, help="closed loop: mean think time between requests, s (exponential)")
    p.add_argument("--rates", help="sweep: open-loop rates, e.g. 0.25,0.5,1,2")
    p.add_argument("--users-list", help="sweep: closed-loop user counts, e.g. 1,2,4,8 (instead of --rates)")
    p.add_argument("--slo-p95-ms", type=float, default=10_000, help="sweep: a step is carried when its p95 is within this")
    p.add_argument("--max-error-rate", type=float, default=0.01, help="sweep: ...and at most this share of requests failed")
    p.add_argument("--keep-going", action="store_true", help="sweep: run every step, not stop at the first one not carried")
    p.add_argument("--duration", type=float, default=60, help="seconds of sending per run (per step in a sweep)")
    p.add_argument("--max-requests", type=int, default=10_000, help="cap on requests per run (per step)")
    p.add_argument("--timeout", type=float, default=120, help="a request that has not finished after this many s is a client timeout")
    p.add_argument("--max-inflight", type=int, default=1024, help="open loop: the client's own bound on requests in flight")
    p.add_argument("--queries", type=Path, default=None,
                   help=f"BEIR queries.jsonl (or its folder), a .jsonl of prompts, or a text file; default {DEMO_PROMPTS.name}")
    p.add_argument("--limit-queries", type=int, default=None, help="use only the first N questions")
    p.add_argument("--mix", default="chat=1,stream=2,search=1,multiturn=1",
                   help="request kinds and weights: chat, stream, search, multiturn")
    p.add_argument("--max-tokens", default="64", help="output tokens per answer: N or LO:HI (uniform)")
    p.add_argument("--top-k", type=int, default=None, help="passages per request (default: the service's)")
    p.add_argument("--model", default=None, help="model name to send (default: the first from /v1/models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=os.environ.get("RAGRAPH_API_KEY"),
                   help="sent as `Authorization: Bearer` (default: $RAGRAPH_API_KEY; needed when the service has auth on)")
    p.add_argument("--use-cache", action="store_true",
                   help="let the response cache answer repeated questions (default: every request sends "
                   "`Cache-Control: no-cache`, so the run measures the pipeline, not the cache)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs (matplotlib not needed)")
    p.add_argument("--out", type=Path, required=True, help="folder for report.json, report.md and the plots")


def check_target(url: str, allow_remote: bool) -> str:
    u = urlparse(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise LoadTestError(f"--url must be an http(s) URL like http://127.0.0.1:8000, got {url!r}")
    host = u.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_remote:
        raise LoadTestError(f"{host} is not a loopback address: a load test against another host needs --allow-remote")
    return url.rstrip("/")


def _loads(spec: str, name: str, cast) -> list:
    try:
        vals = [cast(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise LoadTestError(f"{name}: expected comma-separated numbers, got {spec!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise LoadTestError(f"{name}: every load must be > 0, got {spec!r}")
    return sorted(vals)


def main(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_main(args))
    except (LoadTestError, WorkloadError) as e:
        print(f"ragraph loadtest: {e}", file=sys.stderr)
        return 2


async def _main(args: argparse.Namespace) -> int:
    import httpx

    from load_tests.client import counter_delta, scrape
    from load_tests.report import cross_check, summarize, write_report
    from load_tests.runner import Limits, closed_loop, knee, open_loop, passes
    from load_tests.workload import Workload, load_questions, parse_mix, parse_range

    url = check_target(args.url, args.allow_remote)
    for name in ("duration", "timeout"):
        if getattr(args, name) <= 0:
            raise LoadTestError(f"--{name} must be > 0")
    if args.max_requests < 1 or args.max_inflight < 1:
        raise LoadTestError("--max-requests and --max-inflight must be >= 1")
    if args.mode == "sweep":
        if bool(args.rates) == bool(args.users_list):
            raise LoadTestError("a sweep needs exactly one of --rates (open loop) or --users-list (closed loop)")
        loop = "open" if args.rates else "closed"
        loads = _loads(args.rates, "--rates", float) if args.rates else _loads(args.users_list, "--users-list", int)
    else:
        loop = args.mode
        loads = [args.rate] if loop == "open" else [args.users]
        if loads[0] <= 0:
            raise LoadTestError(f"--{'rate' if loop == 'open' else 'users'} must be > 0")

    try:  # before the run, not after it: a run whose report cannot be written is lost
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / ".write-test").touch()
        (args.out / ".write-test").unlink()
    except OSError as e:
        raise LoadTestError(f"--out {args.out}: cannot write the report there ({e.strerror or e})") from None
    questions = load_questions(args.queries, args.limit_queries)
    mix, max_tokens = parse_mix(args.mix), parse_range(args.max_tokens)
    limits = Limits(args.duration, args.max_requests, args.timeout, args.max_inflight)
    conn = httpx.Limits(max_connections=args.max_inflight + 8, max_keepalive_connections=64)
    headers = {} if args.use_cache else {"Cache-Control": "no-cache"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(None, connect=10), limits=conn,
                                 headers=headers) as client:
        try:
            (await client.get("/health", timeout=10)).raise_for_status()
            model = args.model or (await client.get("/v1/models", timeout=10)).json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            raise LoadTestError(f"cannot reach the service at {url} ({type(e).__name__}: {e}); is `ragraph serve` running?") from None
        workload = Workload(questions, mix=mix, model=model, max_tokens=max_tokens, top_k=args.top_k, seed=args.seed)

        before = await scrape(client)
        t0 = time.perf_counter()
        steps, samples = [], []
        for i, load in enumerate(loads):
            with _Bar(args.duration, f"{loop} {load:g} {'req/s' if loop == 'open' else 'users'}") as bar:
                if loop == "open":
                    res = await open_loop(client, workload, rate=load, limits=limits, t0=t0, seed=args.seed + i, progress=bar.update)
                else:
                    res = await closed_loop(client, workload, users=int(load), think_s=args.think, limits=limits, t0=t0,
                                            seed=args.seed + i, progress=bar.update)
            summary = summarize(res.samples, res.window_s)
            steps.append({"load": load, "summary": summary})
            samples += res.samples
            print(_line(load, summary, loop), file=sys.stderr)
            if args.mode == "sweep" and not args.keep_going and not passes(summary, args.slo_p95_ms, args.max_error_rate):
                break  # the first step not carried: higher loads will not be either
        after = await scrape(client)

    the_knee = knee([(s["load"], s["summary"]) for s in steps], args.slo_p95_ms, args.max_error_rate) if args.mode == "sweep" else None
    head = next((s for s in steps if s["load"] == the_knee), steps[0]) if args.mode == "sweep" else steps[0]
    whole = summarize(samples, sum(s["summary"]["window_s"] for s in steps))
    delta = counter_delta(before, after) if before and after else {}
    report = {
        **{k: v for k, v in head["summary"].items() if k not in ("by_kind",)},
        "headline_from": ("the whole run" if args.mode != "sweep" else f"the knee step ({head['load']:g})"
                          if the_knee is not None else "the first step (no step was carried)"),
        "url": url, "mode": loop, "sweep": args.mode == "sweep", "knee": the_knee,
        "slo_p95_ms": args.slo_p95_ms if args.mode == "sweep" else None, "max_error_rate": args.max_error_rate,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores (client side)",
        "command": "ragraph " + shlex.join(_redacted(getattr(args, "argv", None) or sys.argv[1:])),
        "workload": {"source": str(args.queries or DEMO_PROMPTS.name), "questions": len(questions), "mix": mix,
                     "max_tokens": args.max_tokens, "top_k": args.top_k, "model": model, "seed": args.seed,
                     "cache": args.use_cache},
        "limits": {"duration_s": args.duration, "max_requests": args.max_requests, "timeout_s": args.timeout,
                   "think_s": args.think if loop == "closed" else None},
        "steps": steps,
        "by_kind": whole["by_kind"],
        "server_metrics_delta": delta,
        "cross_check": cross_check(whole, delta, samples),
        "failures": [f"{s.kind} at {s.start_s:.1f} s: {s.error} {s.detail or ''}".strip() for s in samples if not s.ok][:10],
    }
    files = write_report(args.out, report, samples, plots=not args.no_plots)
    if args.mode == "sweep":
        print(f"knee: {the_knee}", file=sys.stderr)
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def _line(load: float, s: dict, loop: str) -> str:
    errs = ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "none"
    p = lambda k: "-" if s[k] is None else f"{s[k]:.0f}"  # noqa: E731
    return (f"{loop} {load:g}: {s['requests']} requests, {s['ok']} ok, errors {errs}; p50 {p('p50_ms')} ms, "
            f"p95 {p('p95_ms')} ms, p99 {p('p99_ms')} ms, TTFT p50 {p('ttft_p50_ms')} ms; "
            f"{s['throughput_rps']:.2f} req/s, {s['output_tokens_per_s']:.1f} tok/s")


class _Lines:
    """Progress for a log file (stderr is not a terminal): one plain line every ``every_s`` seconds
    and one at the end, instead of a bar redrawn with carriage returns thousands of times."""

    def __init__(self, total: int, desc: str, *, every_s: float = 5.0, out=None) -> None:
        self.total, self.n, self.desc, self.every_s = total, 0, desc, every_s
        self.out = out if out is not None else sys.stderr
        self.postfix, self._last = "", float("-inf")

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            self._line()

    def _line(self) -> None:
        print(f"{self.desc}: {self.n}/{self.total} s, {self.postfix}", file=self.out, flush=True)

    def close(self) -> None:
        self._line()


class _Bar:
    """Progress over the step's seconds, with ok/error counts, on stderr: a tqdm bar redrawn in
    place on a terminal, a line every few seconds otherwise (:class:`_Lines`)."""

    def __init__(self, duration: float, desc: str) -> None:
        self.duration, self.start = duration, time.perf_counter()
        self.ok = self.err = 0
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=round(duration), desc=desc, unit="s", file=sys.stderr, leave=True,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} s {postfix}")
        else:
            self.bar = _Lines(round(duration), desc)
        self.task: asyncio.Task | None = None

    def update(self, sample) -> None:
        if sample.ok:
            self.ok += 1
        else:
            self.err += 1
        self._draw()

    def _draw(self) -> None:
        elapsed = min(round(time.perf_counter() - self.start), self.bar.total)
        self.bar.n = elapsed
        self.bar.set_postfix_str(f"ok {self.ok} errors {self.err}" + (" (draining)" if elapsed >= self.bar.total else ""))

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self._draw()

    def __enter__(self) -> _Bar:
        self.task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc) -> None:
        if self.task:
            self.task.cancel()
        self._draw()
        self.bar.close()
