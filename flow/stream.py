"""The answer stream: a prepared chat's answer as typed events (:class:`flow.events.Delta` text,
then one :class:`flow.events.Done` with the finish reason, the token usage and the ``rag`` block).

The answer comes from the response cache (:meth:`flow.chat.ChatPreparation.cached`), from no
generator at all (an abstention when retrieval is weak, or ``generator.answer_mode: extractive``),
or from the generator stage, whose first chunk is awaited before anything is yielded: a refusal or
an outage is known while the caller can still answer with an error. The generator sits behind a
circuit breaker (``http.breaker``). When it fails:

* with sources: an extractive answer from the top passages, or the sources listed
  (``status: sources_only``);
* without sources: ``unavailable`` (``generator_unavailable``, retry when the breaker closes);
* refusing work because its queue is full: ``overloaded``, retry shortly (backpressure, never a
  silent degradation); refusing the request's values: ``invalid``;
* breaking mid-stream: what was sent is kept, the answer is flagged ``generator``.

Citations are filtered to the sources given (``[n]`` beyond them dropped) and, when the model cited
none, attributed from the answer's overlap with the sources. The tokens are charged once
(:class:`flow.accounting.Accounting`), also when the client leaves.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from deployments.cache import hit_request_id
from deployments.errors import StageError, from_exception
from deployments.generator import GenDelta, GenRequest
from flow.accounting import Accounting
from flow.breaker import OPEN
from flow.calls import StageCalls
from flow.chat import ChatPreparation
from flow.errors import FlowError, stage_unavailable
from flow.events import ChatEvent, Delta, Done, Prepared, excerpt, metadata, public_source
from flow.extractive import LoopGuard, abstain_reason, extract
from flow.prompt import CitationFilter, attribute
from flow.requests import ChatRequest

Answer = tuple[str, list[int], str, str | None]  # text, cited source numbers, mode, why


class AnswerStream:
    def __init__(self, calls: StageCalls, chat: ChatPreparation, accounting: Accounting, *, model: str) -> None:
        self.calls, self.cfg, self.chat, self.accounting, self.model = calls, calls.cfg, chat, accounting, model

    def engine_request(self, req: ChatRequest, prep: Prepared) -> GenRequest:
        sampling = self.chat.sampling(req)
        stop = sampling.pop("stop", None)
        # the engine's id: the trace's (found in its logs) plus a suffix, since a client may send the
        # same X-Request-ID twice at once and vLLM refuses a duplicate running id
        return GenRequest(messages=prep.prompt.messages, stop=[stop] if isinstance(stop, str) else stop,
                          request_id=f"{prep.trace.request_id}-{uuid.uuid4().hex[:8]}", **sampling)

    async def start_generation(self, req: ChatRequest, prep: Prepared) -> tuple[AsyncIterator[GenDelta] | None, GenDelta | None]:
        """Start the engine and wait for its first chunk, so that a refusal (queue full) or an
        outage is known before any byte goes to the client. Returns (stream, first chunk), or
        (None, None) when the answer degrades to sources only. Raises :class:`FlowError` when there
        is nothing to degrade to, or when the generator is overloaded."""
        trace, m, breaker, timeouts = prep.trace, self.calls.metrics, self.calls.breaker, self.calls.timeouts
        if breaker is not None and not breaker.allow():
            return self._generator_down(prep, StageError("generator", "unavailable", breaker.describe()))
        stream = self.calls.stages.generate(self.engine_request(req, prep))
        m.stage_inflight.labels("generator").inc()
        t = time.perf_counter()
        try:
            first = await asyncio.wait_for(anext(stream), timeouts.generator_first_token)
        except StopAsyncIteration:
            first = GenDelta(finish_reason="stop")
        except Exception as e:
            err = e if isinstance(e, StageError) else (
                StageError("generator", "timeout", f"no first token in {timeouts.generator_first_token:g} s")
                if isinstance(e, asyncio.TimeoutError) else from_exception("generator", e)
            )
            m.errors.labels("generator", err.kind).inc()
            await _close(stream)
            if breaker is not None:  # a full queue or a refused value: a live generator saying "not so"
                breaker.success() if err.kind in ("overloaded", "invalid") else breaker.failure()
            if err.kind == "invalid":
                raise stage_unavailable("the generator", err) from None
            if err.kind == "overloaded":
                raise FlowError("overloaded", f"the generator is at capacity ({err.detail}); retry shortly",
                                code="overloaded", retry_after_s=2) from None
            return self._generator_down(prep, err)
        except BaseException:  # cancelled (the client went away): no verdict on the generator
            if breaker is not None:
                breaker.release()
            await _close(stream)
            raise
        finally:
            m.stage_inflight.labels("generator").dec()
        if breaker is not None:
            breaker.success()
        ttft = time.perf_counter() - t
        m.ttft.observe(ttft)
        trace.timings_ms["generator.first_token"] = round(ttft * 1000, 2)
        return stream, first

    def _generator_down(self, prep: Prepared, err: StageError) -> tuple[None, None]:
        """No generator: a sources-only answer, or ``unavailable`` when there is nothing to show."""
        breaker = self.calls.breaker
        if not prep.sources:
            wait = breaker.retry_in() if breaker is not None and breaker.state == OPEN else 10
            raise FlowError("unavailable", f"the generator is unavailable ({err.detail}) and there are no sources "
                            "to show", code="generator_unavailable", retry_after_s=max(1, round(wait)))
        prep.trace.degrade("generator", err.detail)
        self.calls.metrics.degraded.labels("generator").inc()
        return None, None

    def direct_answer(self, req: ChatRequest, prep: Prepared) -> Answer | None:
        """An answer that needs no generator, or None to generate. "abstain" when retrieval is weak
        or the question is off-corpus (``generator.abstain_*``); "extractive" with
        ``generator.answer_mode: extractive``."""
        g = self.cfg.generator
        route = prep.trace.route
        if req.json_mode or not prep.rag or route is None or route.kind != "rag" or not prep.sources:
            return None
        why = abstain_reason(route.query, prep.sources, min_similarity=g.abstain_min_similarity,
                             min_coverage=g.abstain_min_coverage)
        if why is not None:
            return g.abstain_text, [], "abstain", why
        if g.answer_mode == "extractive":
            text, cited = extract(route.query, prep.sources, sentences_max=g.extractive_sentences,
                                  top_passages=g.extractive_passages)
            return (text, cited, "extractive", None) if text else (g.abstain_text, [], "abstain", "no sentence matches")
        return None

    def degraded_answer(self, prep: Prepared) -> Answer:
        """The generator is down: the extractive answer from the top passages, said to be one, or
        the sources list when no sentence fits."""
        g = self.cfg.generator
        route = prep.trace.route
        text, cited = extract(route.query if route is not None else "", prep.sources,
                              sentences_max=g.extractive_sentences, top_passages=g.extractive_passages)
        if not text:
            return self.sources_only_text(prep), list(range(1, len(prep.sources) + 1)), "sources_only", None
        return ("The answer generator is unavailable right now; these sentences from the sources answer "
                f"best:\n{text}"), cited, "extractive", None

    def sources_only_text(self, prep: Prepared) -> str:
        lines = [
            "The answer generator is unavailable right now, so no answer was written. "
            "These are the most relevant sources for your question:"
        ]
        for i, p in enumerate(prep.sources, 1):
            lines.append(f"[{i}] {p.title or p.document_id}: {excerpt(p.text, 160)}")
        return "\n".join(lines)

    def _from_cache(self, prep: Prepared, hit: dict[str, Any]) -> list[ChatEvent]:
        rag = {"sources": hit["sources"], "metadata": {
            **metadata(prep.trace, model=self.model, status="ok", usage=hit["usage"], prep=prep, cached=True),
            "citations": hit["citations"],
            "cached_request_id": hit_request_id(hit, shared=self.cfg.governor.cache.shared_across_keys)}}
        return [Delta(hit["text"]), Done(hit["finish"], dict(hit["usage"]), rag)]

    async def events(self, req: ChatRequest, prep: Prepared) -> AsyncIterator[ChatEvent]:
        """:class:`Delta` ... then one :class:`Done`. The first event comes once generation has
        started (or degraded, or raised), so a caller can still answer with an error status."""
        hit = await self.chat.cached(prep)
        if hit is not None:
            for ev in self._from_cache(prep, hit):
                yield ev
            return
        direct = self.direct_answer(req, prep)
        stream, first = (None, None) if direct is not None else await self.start_generation(req, prep)
        trace, metrics = prep.trace, self.calls.metrics
        mode, note = "generate", None
        g = self.cfg.generator
        guard = LoopGuard(ngram=g.loop_ngram, repeats=g.loop_repeats) if g.loop_stop and not req.json_mode else None
        sent: list[str] = []
        cites = CitationFilter(len(prep.sources))
        raw = req.json_mode  # a JSON answer goes out as the engine wrote it: no citation edits, no markers added
        citations = "model"
        usage = {"prompt_tokens": prep.prompt.prompt_tokens, "completion_tokens": 0}
        finish = "stop"
        recorded = False
        if stream is None:
            text, cited, mode, note = direct or self.degraded_answer(prep)
            cites.cited = cited
            citations = "extracted" if mode == "extractive" else "listed"
            sent.append(text)
            yield Delta(text)
            status = "sources_only" if direct is None else "ok" if not trace.degraded else "degraded"
        else:
            t = time.perf_counter()
            chunk: GenDelta | None = first
            answer: list[str] = []
            broke = False
            try:
                while chunk is not None:
                    usage["completion_tokens"] += chunk.tokens
                    if chunk.text or chunk.logprobs:
                        out = chunk.text if raw else cites.feed(chunk.text)
                        if out or chunk.logprobs:
                            answer.append(out)
                            sent.append(out)
                            yield Delta(out, chunk.logprobs)
                    if chunk.finish_reason:
                        finish = chunk.finish_reason
                    if chunk.usage:
                        usage = {k: int(chunk.usage.get(k, 0)) for k in ("prompt_tokens", "completion_tokens")}
                    if getattr(chunk, "engine_s", None):
                        trace.engine_s = dict(chunk.engine_s)
                    if guard is not None and guard.feed(chunk.text) and not chunk.finish_reason:
                        finish = "stop"  # degenerate output (a loop): stop here, the engine request is closed
                        break
                    try:
                        chunk = await anext(stream)
                    except StopAsyncIteration:
                        chunk = None
            except Exception as e:  # mid-stream failure: keep what was sent, say so
                metrics.errors.labels("generator", "error").inc()
                trace.degrade("generator", f"stream broke after the first token: {type(e).__name__}: {e}")
                broke = True
                finish = "stop"  # OpenAI's values only; rag.metadata says the answer is cut short
            finally:
                await _close(stream)
                if not recorded and (broke or chunk is not None):
                    # the client went away (or the stream broke): charge the tokens made so far
                    recorded = True
                    self.accounting.count(prep, usage)
            tail = "" if raw else cites.flush()
            answer.append(tail)
            if not raw and not cites.cited and not broke:
                found = attribute("".join(answer), prep.sources)
                if found:
                    cites.cited = found
                    citations = "attributed"
                    tail += " [" + ", ".join(str(n) for n in sorted(found)) + "]"
            if tail:
                sent.append(tail)
                yield Delta(tail)
            took = time.perf_counter() - t
            metrics.generation_duration.observe(took)
            trace.timings_ms["generator"] = round(took * 1000 + trace.timings_ms.get("generator.first_token", 0), 2)
            status = "ok" if not trace.degraded else "degraded"
        if stream is not None and not recorded:  # a sources-only answer sent nothing through the generator
            recorded = True
            self.accounting.count(prep, usage)
        for stage in trace.degraded:
            if stage != "generator":
                metrics.degraded.labels(stage).inc()
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        trace.timings_ms["total"] = round((time.perf_counter() - trace.t0) * 1000, 2)
        rag = {
            "sources": [
                {
                    "index": i, "document_id": p.document_id, "chunk_id": p.id, "title": p.title,
                    "heading_path": p.heading_path, "excerpt": excerpt(p.text), "relevance_score": p.score,
                    "source": public_source(p.source), "domain": p.domain, "cited": i in cites.cited,
                }
                for i, p in enumerate(prep.sources, 1)
            ],
            "metadata": {**metadata(trace, model=self.model, status=status, usage=usage, prep=prep),
                         "citations": citations if cites.cited else "none",
                         "answer": {"mode": mode, "loop_stopped": bool(guard is not None and guard.tripped),
                                    "note": note}},
        }
        if prep.cache_key is not None and status == "ok" and finish in ("stop", "length"):
            await self.chat.remember(prep, {
                "text": "".join(sent), "finish": finish, "usage": dict(usage), "sources": rag["sources"],
                "citations": rag["metadata"]["citations"], "request_id": trace.request_id,
            })
        yield Done(finish, usage, rag)


async def _close(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            pass
