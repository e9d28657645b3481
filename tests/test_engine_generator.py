"""The generator seam's engine side on the real vLLM engine (CPU build here): what OpenAI clients ask
beyond text (logprobs, response_format, vLLM's sampling extensions) reaches the engine and comes
back in the deltas. The same requests through the whole graph are in test_serve_graph.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from deployments.engine import EngineGenerator, GenRequest


@pytest.fixture(scope="module")
def gen(app_config, provisioned):
    g = EngineGenerator.start(app_config)
    g.loop = asyncio.new_event_loop()  # AsyncLLM's output handler lives on the loop of its first request
    yield g
    g.shutdown()
    g.loop.close()


def run(gen, **kw):
    async def go():
        return [d async for d in gen.generate(GenRequest(**kw))]

    return gen.loop.run_until_complete(go())


MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]


def test_deltas_count_tokens_and_carry_openai_logprobs(gen):
    deltas = run(gen, messages=MESSAGES, max_tokens=8, logprobs=3)
    final = deltas[-1]
    assert final.finish_reason in ("stop", "length") and final.usage["completion_tokens"] == sum(d.tokens for d in deltas)
    entries = [e for d in deltas for e in (d.logprobs or [])]
    assert len(entries) == final.usage["completion_tokens"]
    for e in entries:
        assert e["logprob"] <= 0 and isinstance(e["token"], str) and e["bytes"] == list(e["token"].encode())
        assert 1 <= len(e["top_logprobs"]) <= 3
        assert e["logprob"] <= e["top_logprobs"][0]["logprob"] + 1e-6  # the top one is the most likely
    text = "".join(d.text for d in deltas)
    # the tokens spell the answer; an end-of-turn token the text leaves out may close it (as vLLM's server shows)
    assert "".join(e["token"] for e in entries).strip().startswith(text.strip()), (entries, text)


def test_json_object_answers_are_json(gen):
    msgs = [{"role": "user", "content": "Give the capital of France as JSON with the key city."}]
    deltas = run(gen, messages=msgs, max_tokens=40, json_object=True)
    text = "".join(d.text for d in deltas)
    if deltas[-1].finish_reason == "stop":
        assert isinstance(json.loads(text), dict), text
    else:  # cut at max_tokens: still the start of one JSON object
        assert text.lstrip().startswith("{"), text


def test_json_schema_is_enforced(gen):
    schema = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Lyon"]}},
              "required": ["city"], "additionalProperties": False}
    deltas = run(gen, messages=MESSAGES, max_tokens=30, json_schema=schema)
    assert json.loads("".join(d.text for d in deltas))["city"] in ("Paris", "Lyon")


def test_vllm_extensions_reach_the_engine(gen):
    deltas = run(gen, messages=MESSAGES, max_tokens=6, min_tokens=6, ignore_eos=True, top_k=1,
                 repetition_penalty=1.1)
    assert deltas[-1].usage["completion_tokens"] == 6 and deltas[-1].finish_reason == "length"
