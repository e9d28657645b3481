"""What the load generator sends: questions from a BEIR ``queries.jsonl`` or a prompts file, and a
mix of request kinds (chat, streamed chat, search, multi-turn chat) with configurable output
lengths. Deterministic for a seed, so two runs offer the same requests in the same order."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = ("chat", "stream", "search", "multiturn")
DEMO_PROMPTS = Path(__file__).with_name("prompts.txt")


class WorkloadError(ValueError):
    """A workload option or file that cannot be used; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Request:
    kind: str  # one of KINDS
    path: str  # /v1/chat/completions or /v1/search
    body: dict[str, Any]

    @property
    def streamed(self) -> bool:
        return bool(self.body.get("stream"))


def load_questions(path: Path | None, limit: int | None = None) -> list[str]:
    """Questions from a BEIR ``queries.jsonl`` (``text``), a ``.jsonl`` of ``{"prompt": ...}``, or a
    text file with one question per line. ``None``: the questions about the demo corpus."""
    path = DEMO_PROMPTS if path is None else Path(path).expanduser()
    if path.is_dir():
        path = path / "queries.jsonl"
    if not path.is_file():
        raise WorkloadError(f"no queries file at {path}: give a BEIR queries.jsonl, a folder holding one, or a text file")
    out: list[str] = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if path.suffix == ".jsonl":
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise WorkloadError(f"{path}:{n}: not JSON ({e.msg})") from None
                text = rec.get("text") or rec.get("prompt") or rec.get("query") if isinstance(rec, dict) else None
                if not isinstance(text, str) or not text.strip():
                    raise WorkloadError(f"{path}:{n}: no 'text', 'prompt' or 'query' string")
                line = text.strip()
            out.append(line)
            if limit and len(out) >= limit:
                break
    if not out:
        raise WorkloadError(f"{path} holds no questions")
    return out


def parse_mix(spec: str) -> dict[str, float]:
    """``"chat=1,stream=2,search=1"`` -> normalised weights. Unknown kinds and bad weights are errors."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        kind, _, w = part.partition("=")
        kind = kind.strip()
        if kind not in KINDS:
            raise WorkloadError(f"mix: unknown request kind {kind!r}; use {', '.join(KINDS)}")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise WorkloadError(f"mix: weight of {kind!r} is not a number: {w!r}") from None
        if weight < 0:
            raise WorkloadError(f"mix: weight of {kind!r} is negative")
        weights[kind] = weight
    total = sum(weights.values())
    if total <= 0:
        raise WorkloadError(f"mix {spec!r} gives no request kind a positive weight")
    return {k: w / total for k, w in weights.items() if w > 0}


def parse_range(spec: str) -> tuple[int, int]:
    """``"64"`` or ``"32:128"`` (uniform) output tokens."""
    lo, _, hi = spec.partition(":")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise WorkloadError(f"max tokens must be N or LO:HI, got {spec!r}") from None
    if not 1 <= a <= b:
        raise WorkloadError(f"max tokens range {spec!r} must satisfy 1 <= LO <= HI")
    return a, b


class Workload:
    """An endless, seeded stream of requests: ``next()`` draws a kind from the mix and a question."""

    def __init__(
        self, questions: list[str], *, mix: dict[str, float], model: str = "ragraph",
        max_tokens: tuple[int, int] = (64, 64), top_k: int | None = None, seed: int = 0,
    ) -> None:
        if not questions:
            raise WorkloadError("the workload needs at least one question")
        self.questions, self.mix, self.model = questions, mix, model
        self.max_tokens, self.top_k = max_tokens, top_k
        self.rng = random.Random(seed)
        self._kinds, self._weights = list(mix), list(mix.values())

    def next(self) -> Request:
        kind = self.rng.choices(self._kinds, self._weights)[0]
        q = self.rng.choice(self.questions)
        if kind == "search":
            body: dict[str, Any] = {"query": q}
            if self.top_k:
                body["top_k"] = self.top_k
            return Request(kind, "/v1/search", body)
        messages = [{"role": "user", "content": q}]
        if kind == "multiturn":  # an earlier exchange, then a follow-up that leans on it
            earlier = self.rng.choice(self.questions)
            messages = [
                {"role": "user", "content": earlier},
                {"role": "assistant", "content": f"Here is what the sources say about {earlier.rstrip('?')}."},
                {"role": "user", "content": f"And how does that relate to {q.rstrip('?')}?"},
            ]
        body = {
            "model": self.model, "messages": messages, "temperature": 0,
            "max_tokens": self.rng.randint(*self.max_tokens),
        }
        if self.top_k:
            body["rag"] = {"top_k": self.top_k}
        if kind == "stream":
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return Request(kind, "/v1/chat/completions", body)
