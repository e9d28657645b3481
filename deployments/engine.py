"""The engine side of the generator seam: vLLM's ``AsyncLLM`` turned into structured deltas.

:class:`EngineGenerator` runs in the in-process app and inside the generator's Serve replica
(``deployments.llm_adapter.DeltaLLMServer``), so both paths share one piece of generation code.
Both start the process's engine guard (``deployments.engine_guard``) before the engine. A
``response_format`` JSON schema passes :class:`deployments.schemas.SchemaGate` (compiled once per
schema, time-limited) before the engine is given its canonical JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from deployments.errors import StageError


@dataclass(frozen=True)
class GenRequest:
    """What the ingress asks the engine: chat messages (already a prompt) and sampling settings."""

    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # vLLM's sampling extensions and OpenAI's logprobs, logit_bias, response_format
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None  # None: none; n: the chosen token's and the n most likely ones
    json_object: bool = False  # the answer is one JSON object (structured decoding)
    json_schema: dict[str, Any] | None = None  # ... that matches this schema


EXTENSIONS = ("top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
              "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens", "logit_bias")


@dataclass(frozen=True)
class GenDelta:
    """One step of an answer: new text, and on the last delta the finish reason and token usage."""

    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    tokens: int = 0  # tokens this delta carries (what a client that leaves early is charged for)
    logprobs: list[dict[str, Any]] | None = None  # OpenAI's ``logprobs.content`` entries, when asked
    engine_s: dict[str, float] | None = None  # on the last delta: {"prefill": s, "decode": s} (:func:`engine_times`)


def engine_times(metrics: Any, start: float, first: float | None, end: float) -> dict[str, float]:
    """Seconds one request spent in the engine: ``prefill`` (prompt processing, up to its first
    token) and ``decode`` (the rest of the answer). From vLLM's own per-request timestamps
    (``RequestOutput.metrics``: ``scheduled_ts``, ``first_token_ts``, ``last_token_ts``; the queue
    wait before scheduling is left out) when the engine kept them, else from this process's clock
    (``start``: request sent, ``first``: first output, ``end``: last output; the wait is then in
    ``prefill``). Wall seconds of the engine, which it shares with the other requests of its batch:
    CPU seconds on the CPU build, GPU seconds (times the tensor-parallel size) on a GPU."""
    sched = getattr(metrics, "scheduled_ts", 0.0) or 0.0
    first_ts = getattr(metrics, "first_token_ts", 0.0) or 0.0
    last_ts = getattr(metrics, "last_token_ts", 0.0) or 0.0
    if sched > 0 and first_ts >= sched and last_ts >= first_ts:
        prefill, decode = first_ts - sched, last_ts - first_ts
    else:
        first = end if first is None else first
        prefill, decode = first - start, end - first
    return {"prefill": round(max(0.0, prefill), 6), "decode": round(max(0.0, decode), 6)}


class EngineGenerator:
    """:class:`Generator` over a vLLM ``AsyncLLM`` in this process (the chat template applied here,
    deltas straight from the engine's ``DELTA`` output)."""

    def __init__(self, engine: Any, tokenizer: Any = None, *, schemas: Any = None) -> None:
        from deployments.schemas import SchemaGate

        self.engine = engine
        self.tokenizer = tokenizer if tokenizer is not None else engine.get_tokenizer()
        # a response_format schema is compiled once, time-limited, before the engine is given it
        self.schemas = schemas if schemas is not None else SchemaGate(self.tokenizer)

    @classmethod
    def start(cls, cfg) -> EngineGenerator:
        """Start the configured engine in this process (the in-process app and benchmarks), with
        this process's engine guard: the engine's processes die with this process."""
        import os

        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from deployments.engine_guard import ensure_guard

        ensure_guard()
        g = cfg.generator
        os.environ.update(g.engine_env())
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**g.engine_kwargs(cfg.models.location("generator"))))
        return cls(engine)

    def shutdown(self) -> None:
        self.engine.shutdown()

    def _inputs(self, request: GenRequest, schema: str | None = None) -> tuple[list[int], Any]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        text = self.tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        extra = {k: v for k in EXTENSIONS if (v := getattr(request, k)) is not None}
        if request.json_schema is not None:  # ``schema``: its canonical JSON, checked by self.schemas
            extra["structured_outputs"] = StructuredOutputsParams(json=schema or request.json_schema)
        elif request.json_object:
            extra["structured_outputs"] = StructuredOutputsParams(json_object=True)
        params = SamplingParams(
            max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p, seed=request.seed,
            stop=request.stop, presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty, output_kind=RequestOutputKind.DELTA,
            logprobs=request.logprobs, **extra,
        )
        return ids, params

    def _logprobs(self, o: Any, top_n: int) -> list[dict[str, Any]] | None:
        """vLLM's per-token logprobs of one delta in OpenAI's ``logprobs.content`` shape: each token
        with its log probability and the ``top_n`` most likely tokens at that position."""
        if o.logprobs is None:
            return None

        def entry(tid: int, lp: Any) -> dict[str, Any]:
            tok = lp.decoded_token if lp.decoded_token is not None else self.tokenizer.decode([tid])
            return {"token": tok, "logprob": max(float(lp.logprob), -9999.0), "bytes": list(tok.encode())}

        out = []
        for token_id, alternatives in zip(o.token_ids, o.logprobs, strict=False):
            chosen = entry(token_id, alternatives[token_id])
            ranked = sorted((lp.rank, t, lp) for t, lp in alternatives.items() if lp.rank is not None and lp.rank <= top_n)
            chosen["top_logprobs"] = [entry(t, lp) for _, t, lp in ranked]
            out.append(chosen)
        return out

    async def generate(self, request: GenRequest) -> AsyncIterator[GenDelta]:
        schema = await self.schemas.check(request.json_schema) if request.json_schema is not None else None
        try:
            ids, params = self._inputs(request, schema)
        except (ValueError, TypeError, OverflowError) as e:
            raise StageError("generator", "invalid", str(e).splitlines()[0][:300]) from None
        produced = 0
        start, first = time.perf_counter(), None
        try:
            async for out in self.engine.generate({"prompt_token_ids": ids}, params, request.request_id):
                o = out.outputs[0]
                n = len(o.token_ids)
                produced += n
                if first is None and n:
                    first = time.perf_counter()
                lps = self._logprobs(o, params.logprobs) if params.logprobs is not None else None
                if out.finished:
                    times = engine_times(getattr(out, "metrics", None), start, first, time.perf_counter())
                    yield GenDelta(o.text, o.finish_reason or "stop",
                                   {"prompt_tokens": len(ids), "completion_tokens": produced}, n, lps, times)
                    return
                if o.text or n:
                    yield GenDelta(o.text, tokens=n, logprobs=lps)
        except (ValueError, TypeError, OverflowError) as e:
            raise StageError("generator", "invalid", str(e).splitlines()[0][:300]) from None
        except StageError:
            raise
        except Exception as e:
            kind = "unavailable" if type(e).__name__ == "EngineDeadError" else "error"
            raise StageError("generator", kind, f"{type(e).__name__}: {e}".splitlines()[0][:300]) from None

    async def batches(self, request: GenRequest, *, interval_s: float = 0.0) -> AsyncIterator[list[GenDelta]]:
        """:meth:`generate`, with the deltas that arrive while the consumer is busy sent together:
        one Serve stream item per batch instead of per token. The first batch goes at once (time
        to first token is not delayed); later ones at most every ``interval_s`` (what
        ``ray.serve.llm`` does with its ``stream_batching_interval_ms``), which under load saves
        the replica one stream item per request per engine step. The wait ends early when the
        generation does: the last batch (and the end of the stream) never waits for the interval."""
        q: asyncio.Queue = asyncio.Queue()
        end = object()
        ended = asyncio.Event()

        async def pump() -> None:
            try:
                async for d in self.generate(request):
                    q.put_nowait(d)
                q.put_nowait(end)
            except Exception as e:
                q.put_nowait(e)
            finally:
                ended.set()

        loop = asyncio.get_running_loop()
        task = loop.create_task(pump())
        last = None
        try:
            while True:
                if last is not None and interval_s > 0 and not ended.is_set():
                    wait = last + interval_s - loop.time()
                    if wait > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(ended.wait(), wait)
                batch: list[GenDelta] = []
                item = await q.get()
                while True:
                    if item is end or isinstance(item, Exception):
                        if batch:
                            yield batch
                        if item is end:
                            return
                        raise item
                    batch.append(item)
                    if q.empty():
                        break
                    item = q.get_nowait()
                last = loop.time()
                yield batch
        finally:
            task.cancel()  # the client went away: vLLM aborts the request
