"""The RAG pipeline the ingress runs, as one object: route -> retrieve -> rerank -> prompt -> generate.

:class:`Pipeline` composes the flow's units and is what the HTTP layer (and a test) holds:

* :class:`flow.calls.StageCalls`: every stage and state call (timeouts, retries, the breaker, the
  state threads);
* :class:`flow.search.Search`: ``/v1/search``, and the chat's retrieval;
* :class:`flow.chat.ChatPreparation`: a chat up to its prompt and cache key (:meth:`prepare`);
* :class:`flow.stream.AnswerStream`: the answer as typed events (:meth:`chat_events`);
* :class:`flow.accounting.Accounting`: quota holds and the usage ledger.

It talks to the stages through a :class:`flow.calls.Stages` object: Serve deployment handles in the
graph (``serve/app.py``), or the plain classes called in-process (``serve/local.py``). Requests are
:mod:`flow.requests` models; refusals and failures are :class:`flow.errors.FlowError`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from deployments.admission import Admission
from deployments.generator import GenDelta, GenRequest
from deployments.governor import Governor
from deployments.ingest import IngestService
from flow.accounting import Accounting
from flow.calls import StageCalls, StageReply, Stages
from flow.chat import ChatPreparation
from flow.events import ChatEvent, Prepared, Reservation, Trace
from flow.metrics import Metrics
from flow.openai import completion
from flow.prompt import PromptBuilder
from flow.requests import ChatRequest, SearchRequest, check_limits
from flow.search import Search
from flow.stream import Answer, AnswerStream

T = TypeVar("T")


class Pipeline:
    """Search and chat over the stages; chat yields :data:`flow.events.ChatEvent` s."""

    def __init__(self, cfg, stages: Stages, *, metrics: Metrics | None = None, prompt: PromptBuilder | None = None,
                 governor: Governor | None = None):
        self.cfg = cfg
        self.model = cfg.generator.served_model_name
        self.calls = StageCalls(cfg, stages, metrics=metrics, governor=governor)
        self.prompt = prompt or PromptBuilder.from_config(cfg)
        # Admission in this replica (keys cached, limits in governor.rate_limits.storage); the usage
        # this replica records is added to its cached quota snapshot.
        self.admission = Admission(cfg.governor, ingress_replicas=cfg.http.deployment.max_replicas)
        self.accounting = Accounting(self.calls, self.admission)
        self.searcher = Search(self.calls, model=self.model)
        self.chat = ChatPreparation(self.calls, self.searcher, self.prompt, model=self.model)
        self.answers = AnswerStream(self.calls, self.chat, self.accounting, model=self.model)
        self._ingest: IngestService | None = None

    # ---------------------------------------------------------------------------------------------
    # what the units share

    @property
    def stages(self) -> Stages:
        return self.calls.stages

    @property
    def governor(self) -> Governor:
        return self.calls.governor

    @property
    def metrics(self) -> Metrics:
        return self.calls.metrics

    @property
    def breaker(self):
        return self.calls.breaker

    @property
    def timeouts(self):
        return self.calls.timeouts

    def backoff(self, attempt: int) -> float:
        return self.calls.backoff(attempt)

    async def retrying(self, stage: str, make: Callable[[], Awaitable[Any]], timeout: float, **kw: Any) -> Any:
        return await self.calls.retrying(stage, make, timeout, **kw)

    async def call(self, stage: str, trace: Trace, make: Callable[[], Awaitable[StageReply]], timeout: float) -> StageReply:
        return await self.calls.call(stage, trace, make, timeout)

    async def state(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A blocking call on the service's state (:meth:`flow.calls.StageCalls.state`)."""
        return await self.calls.state(fn, *args, **kwargs)

    async def drain(self) -> None:
        await self.calls.drain()

    def record_usage(self, key_id: str | None, prompt_tokens: int, completion_tokens: int,
                     engine_s: dict[str, float] | None = None) -> None:
        self.accounting.record(key_id, prompt_tokens, completion_tokens, engine_s)

    def settle(self, reservation: Reservation | None, used: int = 0, cost: float = 0.0) -> bool:
        return self.accounting.settle(reservation, used, cost)

    # ---------------------------------------------------------------------------------------------
    # life cycle

    def warm_up(self) -> None:
        self.prompt.warm_up()

    def ingest(self) -> IngestService:
        """This process's ingest job service over the shared jobs, started on first use: its runner
        claims the next queued job whenever none runs service-wide. The jobs' builds run as Ray tasks
        in the graph; beside in-process stages (``serve.local``) in a thread, refreshing their
        retriever when a job publishes."""
        if self._ingest is None:
            retriever = getattr(self.stages, "retriever", None)
            refresh = getattr(retriever, "refresh", None)  # only the in-process retriever: the graph's replicas poll
            runner = self.cfg.documents.runner
            if runner == "auto" and refresh is not None:
                runner = "thread"
            svc = IngestService(self.cfg, db=self.governor.db, runner=runner,
                                on_published=(lambda _: refresh()) if refresh is not None else None)
            svc.start()
            self._ingest = svc
        return self._ingest

    def stop(self) -> None:
        """Stop this process's job runner (a job it runs is taken over by another replica once stale)."""
        if self._ingest is not None:
            self._ingest.stop()
            self._ingest = None

    # ---------------------------------------------------------------------------------------------
    # /v1/search

    def check_input(self, req: ChatRequest | SearchRequest) -> None:
        check_limits(req, self.cfg.http.limits)

    async def search(self, req: SearchRequest, request_id: str) -> dict[str, Any]:
        return await self.searcher.search(req, request_id)

    # ---------------------------------------------------------------------------------------------
    # /v1/chat/completions

    def check_model(self, req: ChatRequest) -> None:
        self.chat.check_model(req)

    def answer_tokens(self, req: ChatRequest) -> int:
        return self.chat.answer_tokens(req)

    def sampling(self, req: ChatRequest) -> dict[str, Any]:
        return self.chat.sampling(req)

    def cacheable(self, req: ChatRequest, sampling: dict[str, Any], bypass: bool) -> bool:
        return self.chat.cacheable(req, sampling, bypass)

    async def prepare(self, req: ChatRequest, request_id: str, *, key_id: str | None = None,
                      reservation: Reservation | None = None, bypass_cache: bool = False) -> Prepared:
        return await self.chat.prepare(req, request_id, key_id=key_id, reservation=reservation,
                                       bypass_cache=bypass_cache)

    def engine_request(self, req: ChatRequest, prep: Prepared) -> GenRequest:
        return self.answers.engine_request(req, prep)

    async def start_generation(self, req: ChatRequest, prep: Prepared) -> tuple[AsyncIterator[GenDelta] | None, GenDelta | None]:
        return await self.answers.start_generation(req, prep)

    def direct_answer(self, req: ChatRequest, prep: Prepared) -> Answer | None:
        return self.answers.direct_answer(req, prep)

    def degraded_answer(self, prep: Prepared) -> Answer:
        return self.answers.degraded_answer(prep)

    def chat_events(self, req: ChatRequest, prep: Prepared) -> AsyncIterator[ChatEvent]:
        """:class:`flow.events.Delta` ... then one :class:`flow.events.Done` (:meth:`flow.stream.AnswerStream.events`)."""
        return self.answers.events(req, prep)

    async def chat_completion(self, req: ChatRequest, prep: Prepared) -> dict[str, Any]:
        """The whole answer as one ``chat.completion`` object."""
        return await completion(self.chat_events(req, prep), request_id=prep.trace.request_id, model=self.model)
