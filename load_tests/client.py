"""One request, measured: an asyncio + httpx client that times a streamed answer token by token.

Why not locust: its users are closed-loop by design (an open-loop Poisson arrival needs a custom
shape hack), and it records one response time per request — time to first token and inter-token
gaps of a server-sent-event stream need hand-written events around ``iter_lines`` anyway. vLLM's
``vllm bench serve`` does measure TTFT/ITL with Poisson arrivals, but only for bare completion
endpoints: it knows nothing of ``/v1/search``, multi-turn mixes, our per-stage ``rag`` metadata or a
closed loop with think time, and it needs the whole vLLM install on the operator's machine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from httpx_sse import EventSource

from load_tests.workload import Request

logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise, under Ray's logging


@dataclass(slots=True)
class Sample:
    """Everything measured about one request. Times in ms; ``start_s`` from the start of the run."""

    kind: str
    start_s: float
    load: float | None = None  # the offered load of the sweep step (rate or users)
    status: int = 0  # HTTP status; 0 when no response came back
    error: str | None = None  # None | "http_503" | "timeout" | "connect" | "protocol" | ...
    detail: str | None = None
    e2e_ms: float | None = None
    ttft_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    stages_ms: dict[str, float] = field(default_factory=dict)
    rag_status: str | None = None  # ok | degraded | sources_only
    replicas: dict[str, str] = field(default_factory=dict)  # stage -> the replica that served it
    retry_after: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def send(client: httpx.AsyncClient, req: Request, *, t0: float, timeout: float, load: float | None = None) -> Sample:
    """Send ``req`` and measure it; never raises (a failure is a sample with ``error`` set)."""
    start = time.perf_counter()
    s = Sample(kind=req.kind, start_s=start - t0, load=load)
    try:
        await asyncio.wait_for(_exchange(client, req, s, start), timeout)
    except (TimeoutError, httpx.TimeoutException):
        s.error, s.detail = "timeout", f"no complete answer within {timeout:g} s"
    except httpx.ConnectError as e:
        s.error, s.detail = "connect", str(e) or type(e).__name__
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, ValueError) as e:
        s.error, s.detail = "protocol", f"{type(e).__name__}: {e}"[:300]
    s.e2e_ms = (time.perf_counter() - start) * 1000
    return s


async def _exchange(client: httpx.AsyncClient, req: Request, s: Sample, start: float) -> None:
    async with client.stream("POST", req.path, json=req.body) as r:
        s.status = r.status_code
        if r.status_code != 200:
            body = await r.aread()
            s.error, s.retry_after = f"http_{r.status_code}", r.headers.get("retry-after")
            try:
                s.detail = json.loads(body)["error"]["message"][:300]
            except (ValueError, KeyError, TypeError):
                s.detail = body[:300].decode(errors="replace")
            return
        if not req.streamed:
            _take_body(s, json.loads(await r.aread()), req.kind)
            return
        last = None
        done = False
        async for event in EventSource(r).aiter_sse():  # httpx-sse: the one SSE reader (cli/client.py too)
            if event.data == "[DONE]":
                done = True
                break
            chunk = event.json()
            if "error" in chunk and "choices" not in chunk:
                raise ValueError(f"error in stream: {chunk['error']}")
            text = "".join((c.get("delta") or {}).get("content") or "" for c in chunk.get("choices") or [])
            if text:
                now = time.perf_counter()
                if last is None:
                    s.ttft_ms = (now - start) * 1000
                else:
                    s.itl_ms.append((now - last) * 1000)
                last = now
            if chunk.get("usage"):
                s.output_tokens = int(chunk["usage"].get("completion_tokens") or 0)
                s.prompt_tokens = int(chunk["usage"].get("prompt_tokens") or 0)
            if chunk.get("rag"):
                _take_meta(s, chunk["rag"].get("metadata") or {})
        if not done:
            raise ValueError("the stream ended without [DONE]")


def _take_body(s: Sample, body: dict[str, Any], kind: str) -> None:
    if kind == "search":
        _take_meta(s, body.get("metadata") or {})
        return
    usage = body.get("usage") or {}
    s.output_tokens = int(usage.get("completion_tokens") or 0)
    s.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    _take_meta(s, (body.get("rag") or {}).get("metadata") or {})


def _take_meta(s: Sample, meta: dict[str, Any]) -> None:
    s.stages_ms = {k: float(v) for k, v in (meta.get("timings_ms") or {}).items()}
    s.rag_status = meta.get("status")
    s.replicas = dict(meta.get("replicas") or {})


# ---------------------------------------------------------------------------------------------
# the server's own counts


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    """``/metrics`` -> {"name{label=value,...}": value} for counters and histogram counts;
    empty when the endpoint cannot be read (the report then says so)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        r = await client.get("/metrics", timeout=10)
        r.raise_for_status()
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(r.text):
        for smp in fam.samples:
            if smp.name.endswith(("_total", "_count")):
                labels = ",".join(f"{k}={v}" for k, v in sorted(smp.labels.items()))
                out[f"{smp.name}{{{labels}}}"] = smp.value
    return out


def counter_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in sorted(after.items()) if v - before.get(k, 0.0)}
