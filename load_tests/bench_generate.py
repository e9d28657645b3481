"""Generation throughput: vLLM continuous batching against sequential Hugging Face ``generate``.

Issue #5, comparison 2. Both engines serve the configured generator model (configs/local.yaml) with
the same RAG-like chat prompts: an msmarco-5k query with its judged passages plus other corpus
passages as numbered context blocks, laid out by ragraph's own :class:`PromptBuilder` and tokenised
with the model's chat template, so both engines get identical token ids.

- ``hf-sequential``: the seed design. One transformers model (the configured dtype, torch threads =
  all cores) and ``model.generate`` per request behind one lock: concurrent requests queue.
- ``vllm``: the engine we serve. vLLM's ``AsyncLLM`` (v1 engine) in-process, with the engine
  arguments and environment that ``deployments.generator.llm_config`` gives ``ray.serve.llm``
  (no Ray); concurrent requests are batched continuously.

At each concurrency N, N clients send requests back to back until ``--requests`` prompts are done
(each prompt once per level; vLLM's prefix cache is reset between levels). Every request makes
exactly ``--max-tokens`` tokens (vLLM ``ignore_eos``, HF ``min_new_tokens``), greedy. Output tok/s
is the tokens produced over the wall time from the first submission to the last completion; latency
is per request, from submission (queueing included) to its last token. The engines run one after
the other (HF first, then freed), so they never share the cores. Both are warmed up first.
vLLM's CPU thread binding is its default unless ``VLLM_CPU_OMP_THREADS_BIND`` is set: on 2 cores
it computes on core 0 and keeps core 1 for its scheduler (the JSON records the ``VLLM_CPU_*`` env).

    flock /tmp/ragraph-bench.lock .venv/bin/python load_tests/bench_generate.py \\
        [--concurrency 1,4,16] [--requests 32] [--max-tokens 64] [--context-tokens 600] \\
        [--out load_tests/results/generate.json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import _common  # noqa: F401
from _common import SHARED_DATA, print_table, write_json

Generate = Callable[[list[int], int], Awaitable[int]]  # (prompt token ids, max tokens) -> tokens produced


def build_prompts(cfg: Any, dataset: Path, *, n: int, context_tokens: int, max_tokens: int) -> list[list[int]]:
    """``n`` chat prompts as token ids: query ``i % queries`` with its judged passages and random
    others, shuffled (so no two prompts share a prefix beyond the system prompt), cut to
    ``context_tokens`` by the serving prompt builder."""
    from transformers import AutoTokenizer

    from flow.prompt import PromptBuilder
    from deployments.retriever import Passage
    from deployments.router import Message

    corpus = {d["_id"]: d for d in map(json.loads, (dataset / "corpus.jsonl").open())}
    queries = [json.loads(line) for line in (dataset / "queries.jsonl").open()]
    judged: dict[str, list[str]] = {}
    for line in (dataset / "qrels" / "test.tsv").open():
        qid, pid, score = line.split("\t")
        if score.strip().isdigit() and int(score) > 0 and pid in corpus:
            judged.setdefault(qid, []).append(pid)
    g = cfg.generator
    location = cfg.models.location("generator")
    builder = PromptBuilder(
        tokenizer=location, system_prompt=g.system_prompt, context_tokens=context_tokens, max_model_len=g.max_model_len
    )
    tok = AutoTokenizer.from_pretrained(location)
    ids = list(corpus)
    prompts = []
    for i in range(n):
        q = queries[i % len(queries)]
        rng = random.Random(i)
        pids = judged.get(q["_id"], [])[:3] + rng.sample(ids, 12)
        rng.shuffle(pids)
        passages = [Passage(id=p, document_id=p, text=corpus[p]["text"], title=corpus[p].get("title", "")) for p in pids]
        prompt = builder.build(messages=[Message("user", q["text"])], passages=passages, max_tokens=max_tokens)
        text = tok.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
        prompts.append(tok(text, add_special_tokens=False)["input_ids"])
    return prompts


async def measure(generate: Generate, prompts: list[list[int]], *, concurrency: int, max_tokens: int) -> dict:
    """``concurrency`` clients send ``prompts`` back to back; throughput and per-request latency."""
    todo = iter(prompts)
    latencies: list[float] = []
    produced: list[int] = []

    async def client() -> None:
        for ids in todo:  # the shared iterator hands each prompt to one client
            t = time.perf_counter()
            produced.append(await generate(ids, max_tokens))
            latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "requests": len(prompts),
        "output_tokens": sum(produced),
        "wall_s": wall,
        "output_tok_per_s": sum(produced) / wall,
        "requests_per_s": len(prompts) / wall,
        "p50_latency_s": statistics.median(latencies),
        "max_latency_s": max(latencies),
    }


class HFSequential:
    """The seed design: one model, ``model.generate`` per request, one request at a time."""

    def __init__(self, path: str, *, dtype: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(os.cpu_count() or 1)
        self._torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        self._lock = asyncio.Lock()

    async def generate(self, ids: list[int], max_tokens: int) -> int:
        async with self._lock:
            return await asyncio.to_thread(self._generate, ids, max_tokens)

    def _generate(self, ids: list[int], max_tokens: int) -> int:
        x = self._torch.tensor([ids])
        with self._torch.inference_mode():
            out = self.model.generate(
                x, attention_mask=self._torch.ones_like(x), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                do_sample=False, temperature=None, top_p=None, top_k=None,
                pad_token_id=self.model.generation_config.eos_token_id,
            )
        return out.shape[1] - len(ids)


class VLLMAsync:
    """The served engine: vLLM ``AsyncLLM``, continuous batching."""

    def __init__(self, engine_kwargs: dict[str, Any]) -> None:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs, enable_log_requests=False))

    async def generate(self, ids: list[int], max_tokens: int) -> int:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
        (prompt,) = await self.llm.renderer.render_cmpl_async([{"prompt_token_ids": ids}])
        final = None
        async for final in self.llm.generate(prompt, params, request_id=uuid.uuid4().hex):
            pass
        assert final is not None and final.finished
        return len(final.outputs[0].token_ids)

    def close(self) -> None:
        """Stop the engine-core and worker processes and drop the engine now: ``AsyncLLM.__del__``
        shuts down again, which fails if it is left to interpreter teardown."""
        self.llm.shutdown()
        del self.llm


async def run_engine(
    name: str, engine: HFSequential | VLLMAsync, prompts: list[list[int]], warm: list[int], args: argparse.Namespace
) -> list[dict]:
    await engine.generate(warm, args.max_tokens)
    rows = []
    for n in args.concurrency:
        if isinstance(engine, VLLMAsync):
            await engine.llm.reset_prefix_cache()
        row = {"engine": name, **await measure(engine.generate, prompts, concurrency=n, max_tokens=args.max_tokens)}
        print(f"{name} x{n}: {row['output_tok_per_s']:.1f} tok/s, p50 {row['p50_latency_s']:.2f} s", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated concurrent request counts")
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level (distinct prompts)")
    ap.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (fixed)")
    ap.add_argument("--context-tokens", type=int, default=None, help="context block budget (default: the config's)")
    ap.add_argument("--dataset", type=Path, default=SHARED_DATA / "msmarco-5k")
    ap.add_argument("--engines", default="hf-sequential,vllm")
    ap.add_argument("--out", type=Path, default=Path("load_tests/results/generate.json"))
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.requests < max(args.concurrency):
        ap.error(f"--requests={args.requests} must be >= the largest concurrency {max(args.concurrency)}")

    from common.config import load_config

    cfg = load_config()
    g = cfg.generator
    location = cfg.models.location("generator")
    context_tokens = args.context_tokens or g.context_tokens
    *prompts, warm = build_prompts(
        cfg, args.dataset, n=args.requests + 1, context_tokens=context_tokens, max_tokens=args.max_tokens
    )
    lengths = [len(p) for p in prompts]
    prompt_tokens = {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)}
    print(f"{len(prompts)} prompts, tokens {prompt_tokens}, {args.max_tokens} output tokens each", flush=True)

    engines = args.engines.split(",")
    engine_kwargs = g.engine_kwargs(location)
    rows: list[dict] = []
    load_before = os.getloadavg()
    if "hf-sequential" in engines:
        hf = HFSequential(location, dtype=g.dtype)
        rows += asyncio.run(run_engine("hf-sequential", hf, prompts, warm, args))
        del hf
        gc.collect()
    if "vllm" in engines:
        os.environ.update(g.engine_env())

        async def serve_vllm() -> list[dict]:
            engine = VLLMAsync(engine_kwargs)
            try:
                return await run_engine("vllm", engine, prompts, warm, args)
            finally:
                engine.close()

        rows += asyncio.run(serve_vllm())

    base = {r["concurrency"]: r["output_tok_per_s"] for r in rows if r["engine"] == "hf-sequential"}
    for r in rows:
        r["x_hf_sequential"] = r["output_tok_per_s"] / base[r["concurrency"]] if base else None
    print(f"\n{cfg.models.generator.name}, {args.dataset.name} prompts of {prompt_tokens['median']:.0f} tokens "
          f"(median), {args.max_tokens} output tokens, {args.requests} requests per level\n")
    print_table(rows, ["engine", "concurrency", "output_tok_per_s", "requests_per_s", "p50_latency_s",
                       "max_latency_s", "x_hf_sequential"])
    write_json(args.out, {
        "model": location, "prompt_tokens": prompt_tokens, "max_tokens": args.max_tokens, "requests": args.requests,
        "context_tokens": context_tokens, "hf": {"dtype": g.dtype, "torch_threads": os.cpu_count()},
        "vllm": {"engine_kwargs": engine_kwargs, "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_CPU")}},
        "loadavg_before_after": [load_before, os.getloadavg()], "results": rows,
    })


if __name__ == "__main__":
    main()
