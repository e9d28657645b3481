"""The generator seam's engine side on the real vLLM engine (CPU build here): what OpenAI clients ask
beyond text (logprobs, response_format, vLLM's sampling extensions) reaches the engine and comes
back in the deltas. The same requests through the whole graph are in test_serve_graph.py.

The engine runs in a child process (this file run as a script), all four requests on one event
loop: vLLM's ``AsyncLLM`` leaves ZeroMQ contexts behind whose finaliser blocks forever when the
garbage collector meets it later in the test session (seen: a hang in an unrelated test)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Lyon"]}},
          "required": ["city"], "additionalProperties": False}
CASES = {
    "logprobs": {"messages": MESSAGES, "max_tokens": 8, "logprobs": 3},
    "json_object": {"messages": [{"role": "user", "content": "Give the capital of France as JSON with the key city."}],
                    "max_tokens": 40, "json_object": True},
    "json_schema": {"messages": MESSAGES, "max_tokens": 30, "json_schema": SCHEMA},
    "extensions": {"messages": MESSAGES, "max_tokens": 6, "min_tokens": 6, "ignore_eos": True, "top_k": 1,
                   "repetition_penalty": 1.1},
}


def _run_all() -> dict:
    from common.config import load_config
    from deployments.engine import EngineGenerator, GenRequest

    gen = EngineGenerator.start(load_config())

    async def go() -> dict:
        out = {}
        for name, kw in CASES.items():
            out[name] = [dataclasses.asdict(d) async for d in gen.generate(GenRequest(**kw))]
        return out

    try:
        return asyncio.run(go())
    finally:
        gen.shutdown()


@pytest.fixture(scope="module")
def results(app_config, provisioned, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("engine") / "deltas.json"
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, __file__, str(out)], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_deltas_count_tokens_and_carry_openai_logprobs(results):
    deltas = results["logprobs"]
    final = deltas[-1]
    assert final["finish_reason"] in ("stop", "length")
    assert final["usage"]["completion_tokens"] == sum(d["tokens"] for d in deltas)
    entries = [e for d in deltas for e in (d["logprobs"] or [])]
    assert len(entries) == final["usage"]["completion_tokens"]
    for e in entries:
        assert e["logprob"] <= 0 and isinstance(e["token"], str) and e["bytes"] == list(e["token"].encode())
        assert 1 <= len(e["top_logprobs"]) <= 3
        assert e["logprob"] <= e["top_logprobs"][0]["logprob"] + 1e-6  # the top one is the most likely
    text = "".join(d["text"] for d in deltas)
    # the tokens spell the answer; an end-of-turn token the text leaves out may close it (as vLLM's server shows)
    assert "".join(e["token"] for e in entries).strip().startswith(text.strip()), (entries, text)


def test_json_object_answers_are_json(results):
    deltas = results["json_object"]
    text = "".join(d["text"] for d in deltas)
    if deltas[-1]["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict), text
    else:  # cut at max_tokens: still the start of one JSON object
        assert text.lstrip().startswith("{"), text


def test_json_schema_is_enforced(results):
    assert json.loads("".join(d["text"] for d in results["json_schema"]))["city"] in ("Paris", "Lyon")


def test_vllm_extensions_reach_the_engine(results):
    final = results["extensions"][-1]
    assert final["usage"]["completion_tokens"] == 6 and final["finish_reason"] == "length"


if __name__ == "__main__":  # the child process: every case on one engine, the deltas as JSON
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    Path(sys.argv[1]).write_text(json.dumps(_run_all()))
    sys.stdout.flush()
    os._exit(0)  # the same ZeroMQ finaliser would hold the child at exit
