"""``ragraph chat``: a small client for the running service (standard library only)."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any


class ChatClientError(RuntimeError):
    pass


def _request(url: str, body: dict[str, Any] | None = None, timeout: float = 300):
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    key = os.environ.get("RAGRAPH_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read())["error"]["message"]
        except Exception:
            msg = e.reason
        raise ChatClientError(f"{url} answered {e.code}: {msg}") from None
    except urllib.error.URLError as e:
        raise ChatClientError(f"cannot reach {url}: {e.reason}; is `ragraph serve` running?") from None


def chat(
    question: str, *, url: str, model: str | None = None, stream: bool = False, rag: bool = True,
    top_k: int | None = None, strategy: str | None = None, domains: list[str] | None = None,
    max_tokens: int | None = None, show_json: bool = False, rerank: bool | None = None, out=sys.stdout,
) -> int:
    url = url.rstrip("/")
    if model is None:
        with _request(f"{url}/v1/models", timeout=10) as r:
            model = json.loads(r.read())["data"][0]["id"]
    opts: dict[str, Any] = {"enabled": rag}
    if top_k:
        opts["top_k"] = top_k
    if strategy:
        opts["strategy"] = strategy
    if domains:
        opts["filters"] = {"domains": domains}
    if rerank is not None:
        opts["rerank"] = rerank
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": question}], "rag": opts,
                            "stream": stream}
    if max_tokens:
        body["max_tokens"] = max_tokens
    rag_part: dict[str, Any] = {}
    with _request(f"{url}/v1/chat/completions", body) as r:
        if not stream:
            resp = json.loads(r.read())
            if show_json:
                print(json.dumps(resp, indent=2), file=out)
                return 0
            print(resp["choices"][0]["message"]["content"], file=out)
            rag_part = resp.get("rag", {})
        else:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                for c in chunk.get("choices", []):
                    print((c.get("delta") or {}).get("content") or "", end="", file=out, flush=True)
                rag_part = chunk.get("rag") or rag_part
            print(file=out)
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
