"""The converted generator runs on the real vLLM engine (CPU build here, CUDA on a cluster)."""

import os

import pytest


@pytest.fixture(scope="module")
def llm(app_config, provisioned):
    os.environ.update(app_config.generator.engine_env())
    from vllm import LLM

    engine = LLM(**app_config.generator.engine_kwargs(str(provisioned["generator"])))
    yield engine
    del engine


@pytest.mark.parametrize(
    "question, fact",
    [
        ("What is the capital of France? Answer briefly.", "Paris"),
        ("Which city is the capital of Germany?", "Berlin"),
    ],
)
def test_greedy_answer_states_the_fact(llm, question, fact):
    from vllm import SamplingParams

    [out] = llm.chat([{"role": "user", "content": question}], SamplingParams(temperature=0, max_tokens=32))
    answer = out.outputs[0].text
    assert fact in answer, answer


def test_batch_of_requests_each_gets_its_own_answer(llm):
    from vllm import SamplingParams

    questions = ["Which city is the capital of Germany?", "What is the capital of France? Answer briefly."] * 4
    outs = llm.chat([[{"role": "user", "content": q}] for q in questions], SamplingParams(temperature=0, max_tokens=32))
    answers = [o.outputs[0].text for o in outs]
    assert all("Berlin" in a for a in answers[0::2]), answers
    assert all("Paris" in a for a in answers[1::2]), answers
