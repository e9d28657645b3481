"""The load patterns: an open loop (Poisson arrivals at a rate: a slow server cannot slow the
arrivals down, so queueing delay shows), a closed loop (N users, each waiting for its answer and
then thinking), and a sweep over either that finds the knee.

Every run is bounded by its duration and a request cap; requests still in flight when the window
closes are waited for (each is bounded by the request timeout) and counted."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from load_tests.client import Sample, send
from load_tests.workload import Workload

Progress = Callable[[Sample | None], None]  # called with each finished sample (None: a tick)


@dataclass(frozen=True, slots=True)
class Limits:
    duration_s: float
    max_requests: int
    timeout_s: float = 120.0
    max_inflight: int = 1024  # open loop: the client's own bound, reported as "client_limit"


@dataclass(slots=True)
class StepResult:
    mode: str  # open | closed
    load: float  # requests/s (open) or users (closed)
    samples: list[Sample] = field(default_factory=list)
    window_s: float = 0.0  # from the first send to the last answer


async def open_loop(
    client: httpx.AsyncClient, workload: Workload, *, rate: float, limits: Limits, t0: float,
    seed: int = 0, progress: Progress | None = None,
) -> StepResult:
    if rate <= 0:
        raise ValueError(f"open loop needs a rate > 0 requests/s, got {rate}")
    rng = random.Random(seed)
    tasks: list[asyncio.Task[Sample]] = []
    skipped: list[Sample] = []
    inflight = 0
    start = time.perf_counter()
    due = start

    async def one(req) -> Sample:
        nonlocal inflight
        inflight += 1
        try:
            s = await send(client, req, t0=t0, timeout=limits.timeout_s, load=rate)
        finally:
            inflight -= 1
        if progress:
            progress(s)
        return s

    while len(tasks) + len(skipped) < limits.max_requests:
        due += rng.expovariate(rate)
        if due - start >= limits.duration_s:
            break
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        req = workload.next()
        if inflight >= limits.max_inflight:
            s = Sample(kind=req.kind, start_s=time.perf_counter() - t0, load=rate, error="client_limit",
                       detail=f"{limits.max_inflight} requests already in flight (--max-inflight)")
            skipped.append(s)
            continue
        tasks.append(asyncio.create_task(one(req)))
    samples = [*await asyncio.gather(*tasks), *skipped]
    return StepResult("open", rate, sorted(samples, key=lambda s: s.start_s), time.perf_counter() - start)


async def closed_loop(
    client: httpx.AsyncClient, workload: Workload, *, users: int, think_s: float, limits: Limits, t0: float,
    seed: int = 0, progress: Progress | None = None,
) -> StepResult:
    if users < 1:
        raise ValueError(f"closed loop needs at least 1 user, got {users}")
    if think_s < 0:
        raise ValueError(f"think time must be >= 0 s, got {think_s}")
    rng = random.Random(seed)
    samples: list[Sample] = []
    start = time.perf_counter()
    end = start + limits.duration_s
    sent = 0

    async def user(i: int) -> None:
        nonlocal sent
        await asyncio.sleep(rng.uniform(0, think_s) if think_s else 0)  # users do not all start at once
        while time.perf_counter() < end and sent < limits.max_requests:
            sent += 1
            s = await send(client, workload.next(), t0=t0, timeout=limits.timeout_s, load=users)
            samples.append(s)
            if progress:
                progress(s)
            if think_s:
                await asyncio.sleep(rng.expovariate(1 / think_s))

    await asyncio.gather(*(user(i) for i in range(users)))
    return StepResult("closed", users, sorted(samples, key=lambda s: s.start_s), time.perf_counter() - start)


def passes(summary: dict, slo_p95_ms: float, max_error_rate: float) -> bool:
    """A step is carried when its p95 is within the SLO and at most ``max_error_rate`` of its
    requests failed (any failure, 503s included: shed load is not carried load)."""
    p95 = summary.get("p95_ms")
    return p95 is not None and p95 <= slo_p95_ms and summary["error_rate"] <= max_error_rate


def knee(steps: list[tuple[float, dict]], slo_p95_ms: float, max_error_rate: float) -> float | None:
    """The highest load carried before the first step that is not."""
    best = None
    for load, summary in sorted(steps, key=lambda x: x[0]):
        if not passes(summary, slo_p95_ms, max_error_rate):
            break
        best = load
    return best
