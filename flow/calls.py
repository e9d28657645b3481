"""Stage calls, timed, counted and retried: the one place the flow talks to a stage.

Every stage call has a timeout; the idempotent ones (router, retriever, reranker) are retried with
exponential backoff and jitter when a replica is lost or errs (``http.retries``); with
``http.retries.attempt_timeout_s`` a silent replica is given up on early and another tried. The
generator sits behind a circuit breaker (``http.breaker``), kept here for the pipeline.

Calls on the service's state (:meth:`StageCalls.state`: the keys, usage, cache, conversations and
jobs of :class:`deployments.governor.Governor`, blocking database calls) run on a thread pool of
their own, off the event loop, each try within ``http.timeouts.governor``, retried like a lost
replica when the database does not answer (:class:`state.db.StateUnavailable`); :func:`state_call`
is such a call that a request cannot do without (a :class:`flow.errors.FlowError` once its tries are
spent).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from deployments.errors import StageError, from_exception
from deployments.generator import GenDelta, GenRequest
from deployments.governor import Governor
from deployments.retriever import Filters, Passage
from deployments.router import Message
from flow.breaker import CircuitBreaker
from flow.errors import stage_unavailable
from flow.events import Trace
from flow.metrics import Metrics
from state.conversations import ConversationLimitError
from state.db import StateUnavailable

log = logging.getLogger("ray.serve")
RETRIED_KINDS = ("unavailable", "error", "stalled")  # a lost, failed or silent replica; never backpressure or a timeout
T = TypeVar("T")
# State calls block on the database: threads of their own, so that a database that is down (each call
# waiting up to state.connect_timeout_s) cannot take the loop's default executor from everything else.
STATE_THREADS = 16
USAGE_RETRY_S = 60.0  # how long a usage record is retried (a database restart must not lose it)


@dataclass(frozen=True, slots=True)
class StageReply:
    value: Any
    replica: str = ""
    info: dict[str, Any] = field(default_factory=dict)


class Stages(Protocol):
    """The stages as the flow sees them: Serve handles (:class:`serve.stages.HandleStages`) or
    the plain classes in this process (:class:`serve.stages.InProcessStages`)."""

    rerank_enabled: bool

    async def route(self, messages: list[Message]) -> StageReply: ...
    async def retrieve(
        self, *, query: str, top_k: int, filters: Filters | None, strategy: str | None
    ) -> StageReply: ...  # value: list[Passage]; info: version, embed_ms, search_ms
    async def rerank(self, *, query: str, passages: list[Passage], top_k: int) -> StageReply: ...
    def generate(self, request: GenRequest) -> AsyncIterator[GenDelta]: ...  # a deployments.generator.Generator
    async def readiness(self) -> dict[str, str | None]: ...


class StageCalls:
    def __init__(self, cfg, stages: Stages, *, metrics: Metrics | None = None, governor: Governor | None = None) -> None:
        self.cfg, self.stages = cfg, stages
        self.governor = governor if governor is not None else Governor(cfg)
        self._state_pool = ThreadPoolExecutor(STATE_THREADS, thread_name_prefix="ragraph-state")
        self.metrics = metrics or Metrics()
        self.timeouts = cfg.http.timeouts
        self.retry = cfg.http.retries
        b = cfg.http.breaker
        self.breaker = CircuitBreaker(
            failure_threshold=b.failure_threshold, reset_timeout_s=b.reset_timeout_s,
            on_change=self.metrics.breaker_state.set,
        ) if b.enabled else None
        self.metrics.breaker_state.set(0)
        self._background: set[asyncio.Task] = set()
        self.replica: str | None = None  # this ingress replica's id in the graph (serve/app.py), shown in metadata.replicas

    def trace(self, request_id: str) -> Trace:
        """A new request's :class:`flow.events.Trace`, naming this ingress replica when there is one."""
        trace = Trace(request_id)
        if self.replica is not None:
            trace.replicas["ingress"] = self.replica
        return trace

    def backoff(self, attempt: int) -> float:
        """Full-jitter exponential backoff before try ``attempt + 1`` (``attempt`` >= 1)."""
        r = self.retry
        return random.uniform(0, min(r.max_backoff_s, r.backoff_s * 2 ** (attempt - 1)))

    async def retrying(self, stage: str, make: Callable[[], Awaitable[Any]], timeout: float, *,
                       attempts: int | None = None, on_retry: Callable[[], None] | None = None) -> Any:
        """``await make()`` within ``timeout`` per try, retried on a lost replica or an error; with
        ``http.retries.attempt_timeout_s``, every try but the last is cut short after that long and
        retried (a replica on a dead node that Ray has not declared dead yet answers nothing).
        Raises :class:`StageError` with the last failure."""
        m = self.metrics
        attempts = attempts or self.retry.attempts
        cut = self.retry.attempt_timeout_s
        for attempt in range(1, attempts + 1):
            limit = min(cut, timeout) if cut and attempt < attempts else timeout
            try:
                return await asyncio.wait_for(make(), limit)
            except asyncio.TimeoutError:
                err = (StageError(stage, "stalled", f"no answer in {limit:g} s (http.retries.attempt_timeout_s)")
                       if limit < timeout else StageError(stage, "timeout", f"no answer in {timeout:g} s"))
            except StageError as e:
                err = e
            except Exception as e:  # a stage bug must not become a bare 500
                err = from_exception(stage, e)
            m.errors.labels(stage, err.kind).inc()
            if err.kind not in RETRIED_KINDS or attempt == attempts:
                raise err
            m.retries.labels(stage).inc()
            if on_retry is not None:
                on_retry()
            await asyncio.sleep(self.backoff(attempt))
        raise AssertionError("unreachable")

    async def call(self, stage: str, trace: Trace, make: Callable[[], Awaitable[StageReply]], timeout: float) -> StageReply:
        m = self.metrics
        m.stage_inflight.labels(stage).inc()
        t = time.perf_counter()

        def retried() -> None:
            trace.retries[stage] = trace.retries.get(stage, 0) + 1

        try:
            reply = await self.retrying(stage, make, timeout, on_retry=retried)
        finally:
            m.stage_inflight.labels(stage).dec()
            took = time.perf_counter() - t
            m.stage_duration.labels(stage).observe(took)
            trace.timings_ms[stage] = round(took * 1000, 2)
        m.stage_requests.labels(stage, reply.replica or "local").inc()
        if reply.replica:
            trace.replicas[stage] = reply.replica
        return reply

    async def state(self, fn: Callable[..., T], *args: Any, attempts: int | None = None,
                    timeout: float | None = None, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, a blocking call on the service's state (a :class:`Governor` or store
        method), on the state threads, each try within ``timeout`` (``http.timeouts.governor`` unless
        given), retried when the database does not answer. Raises :class:`StageError` (stage
        ``state``): ``unavailable`` once the tries are spent, ``invalid`` for a refusal of the
        caller's request (the conversation limit: ``conversation_limit_reached: ...``)."""
        call = functools.partial(fn, *args, **kwargs)

        async def once() -> T:
            try:
                return await asyncio.get_running_loop().run_in_executor(self._state_pool, call)
            except StateUnavailable as e:
                raise StageError("state", "unavailable", str(e)) from None
            except ConversationLimitError as e:
                raise StageError("state", "invalid", f"{e.code}: {e}") from None

        t = time.perf_counter()
        try:
            return await self.retrying("state", once, timeout or self.timeouts.governor, attempts=attempts)
        finally:
            self.metrics.stage_duration.labels("state").observe(time.perf_counter() - t)

    def record_usage(self, key_id: str | None, prompt_tokens: int, completion_tokens: int,
                     engine_s: dict[str, float] | None = None) -> None:
        """Write usage (tokens; the engine's prefill and decode seconds when known) to the ledger in
        the background, retrying for a minute (``USAGE_RETRY_S``) so that a database restart does not lose the
        record; charged once whatever the retries (the record carries an id of its own, made here:
        a client's request id may repeat). A record that still fails is logged and counted."""
        times = (float(engine_s.get("prefill", 0.0)), float(engine_s.get("decode", 0.0))) if engine_s else ()
        record_id = uuid.uuid4().hex

        async def write() -> None:
            deadline = time.monotonic() + USAGE_RETRY_S
            tries = 0
            while True:
                tries += 1
                try:
                    await self.state(self.governor.record, key_id, prompt_tokens, completion_tokens, *times,
                                     request_id=record_id, attempts=1)
                    return
                except StageError as e:
                    if e.kind == "invalid" or time.monotonic() >= deadline:
                        self.metrics.usage_lost.inc()
                        log.error(f"usage of key {key_id or 'anonymous'} not recorded after {tries} tries "
                                  f"({prompt_tokens}+{completion_tokens} tokens): {e}")
                        return
                await asyncio.sleep(min(2.0, 0.25 * 2 ** min(tries - 1, 3)) * random.uniform(0.5, 1.0))

        task = asyncio.get_running_loop().create_task(write())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for background usage writes (tests, shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)


async def state_call(calls: Any, what: str, fn: Any, *args: Any, timeout: float | None = None) -> Any:
    """A call on the service's state (``calls.state``: :meth:`StageCalls.state`) that a request cannot
    do without: :func:`flow.errors.stage_unavailable` (``unavailable``, retry after a few seconds),
    naming ``what`` was unavailable, once its retries are spent."""
    try:
        return await calls.state(fn, *args, timeout=timeout)
    except StageError as e:
        raise stage_unavailable(what, e, code="state_unavailable") from None
