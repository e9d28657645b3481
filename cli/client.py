"""``ragraph chat``: a small client for the running service (httpx, and httpx-sse for the stream)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import httpx
from httpx_sse import connect_sse


class ChatClientError(RuntimeError):
    pass


def _headers() -> dict[str, str]:
    key = os.environ.get("RAGRAPH_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _refused(r: httpx.Response) -> ChatClientError:
    try:
        msg = json.loads(r.read())["error"]["message"]
    except Exception:
        msg = r.reason_phrase
    return ChatClientError(f"{r.request.url} answered {r.status_code}: {msg}")


def chat(
    question: str, *, url: str, model: str | None = None, stream: bool = False, rag: bool = True,
    top_k: int | None = None, strategy: str | None = None, domains: list[str] | None = None,
    max_tokens: int | None = None, show_json: bool = False, rerank: bool | None = None, out=sys.stdout,
) -> int:
    url = url.rstrip("/")
    opts: dict[str, Any] = {"enabled": rag}
    if top_k:
        opts["top_k"] = top_k
    if strategy:
        opts["strategy"] = strategy
    if domains:
        opts["filters"] = {"domains": domains}
    if rerank is not None:
        opts["rerank"] = rerank
    rag_part: dict[str, Any] = {}
    try:
        with httpx.Client(base_url=url, headers=_headers(), timeout=httpx.Timeout(300, connect=10)) as client:
            if model is None:
                r = client.get("/v1/models", timeout=10)
                if r.status_code != 200:
                    raise _refused(r)
                model = r.json()["data"][0]["id"]
            body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": question}],
                                    "rag": opts, "stream": stream}
            if max_tokens:
                body["max_tokens"] = max_tokens
            if not stream:
                r = client.post("/v1/chat/completions", json=body)
                if r.status_code != 200:
                    raise _refused(r)
                resp = r.json()
                if show_json:
                    print(json.dumps(resp, indent=2), file=out)
                    return 0
                print(resp["choices"][0]["message"]["content"], file=out)
                rag_part = resp.get("rag", {})
            else:
                with connect_sse(client, "POST", "/v1/chat/completions", json=body) as source:
                    if source.response.status_code != 200:
                        raise _refused(source.response)
                    for event in source.iter_sse():
                        if event.data == "[DONE]":
                            break
                        chunk = event.json()
                        for c in chunk.get("choices", []):
                            print((c.get("delta") or {}).get("content") or "", end="", file=out, flush=True)
                        rag_part = chunk.get("rag") or rag_part
                print(file=out)
    except httpx.TransportError as e:
        raise ChatClientError(f"cannot reach {url}: {e}; is `ragraph serve` running?") from None
    _print_sources(rag_part, out)
    return 0


def _print_sources(rag: dict[str, Any], out) -> None:
    sources, meta = rag.get("sources", []), rag.get("metadata", {})
    if sources:
        print("\nSources:", file=out)
        for s in sources:
            mark = "*" if s.get("cited") else " "
            score = s.get("relevance_score")
            print(f" {mark}[{s['index']}] {s.get('title') or s['document_id']} ({s['document_id']}"
                  f"{f', score {score:.3f}' if isinstance(score, float) else ''})", file=out)
    if meta:
        t = meta.get("timings_ms", {})
        print(f"\nindex {meta.get('index_version')}, status {meta.get('status')}"
              f"{', degraded: ' + ', '.join(meta['degraded']) if meta.get('degraded') else ''}"
              f", total {t.get('total', 0):.0f} ms", file=out)
