"""EngineGenerator.batches (deployments/engine.py), the generator replica's stream batching, over a
scripted token source in place of vLLM's (the batching is this code's, not the engine's): the first
batch goes at once, later ones at most every ``interval_s``, and the last one as soon as the
generation ends, not after the interval."""

from __future__ import annotations

import asyncio
import time

from deployments.engine import EngineGenerator, GenDelta, GenRequest


class Scripted(EngineGenerator):
    """``generate`` yields one delta after each of ``gaps`` seconds; the last carries the finish."""

    def __init__(self, gaps: list[float]) -> None:  # no engine: only batches() is under test
        self.gaps = gaps

    async def generate(self, request):
        for i, gap in enumerate(self.gaps):
            await asyncio.sleep(gap)
            last = i == len(self.gaps) - 1
            yield GenDelta(text=f"t{i} ", tokens=1, finish_reason="stop" if last else None)


def run(gen: EngineGenerator, interval_s: float) -> list[tuple[float, list[str]]]:
    async def go():
        t0, out = time.monotonic(), []
        async for batch in gen.batches(GenRequest(messages=[{"role": "user", "content": "x"}], max_tokens=8), interval_s=interval_s):
            out.append((time.monotonic() - t0, [d.text for d in batch]))
        return out

    return asyncio.run(go())


def test_the_last_batch_does_not_wait_for_the_interval():
    # first token at once, then 1 token 20 ms later and the end: with a 500 ms interval the end
    # came 500 ms after the first batch before; now it comes when the generation ends (~20 ms)
    got = run(Scripted([0.0, 0.02]), interval_s=0.5)
    assert [texts for _, texts in got] == [["t0 "], ["t1 "]]
    assert got[0][0] < 0.1
    assert got[-1][0] < 0.25, got  # not 0.5 s


def test_tokens_within_the_interval_go_together_and_none_is_lost():
    got = run(Scripted([0.0] + [0.01] * 20), interval_s=0.1)
    texts = [t for _, batch in got for t in batch]
    assert texts == [f"t{i} " for i in range(21)]
    assert len(got) < 10, got  # batched: about one item per 100 ms, not one per token
    assert got[0][1] == ["t0 "]


def test_no_interval_sends_each_delta_as_it_comes():
    got = run(Scripted([0.0, 0.02, 0.02]), interval_s=0.0)
    assert [texts for _, texts in got] == [["t0 "], ["t1 "], ["t2 "]]


def test_an_engine_error_reaches_the_consumer_after_what_came_before():
    class Failing(Scripted):
        async def generate(self, request):
            yield GenDelta(text="a", tokens=1)
            await asyncio.sleep(0.01)
            raise RuntimeError("engine died")

    async def go():
        seen = []
        try:
            async for batch in Failing([]).batches(GenRequest(messages=[{"role": "user", "content": "x"}], max_tokens=8), interval_s=0.5):
                seen.extend(d.text for d in batch)
        except RuntimeError as e:
            return seen, str(e)
        return seen, None

    t0 = time.monotonic()
    seen, err = asyncio.run(go())
    assert seen == ["a"] and err == "engine died"
    assert time.monotonic() - t0 < 0.3  # the error is not held back for the interval either
