"""The query router: a plain class; its Serve deployment is a thin wrapper.

Given the conversation, it decides

* whether the turn is small talk (a greeting, thanks, goodbye): no retrieval;
* the standalone search query: a follow-up ("and how much does it cost?") borrows the content words
  of earlier user turns, so the retriever sees what "it" is;
* the retrieval strategy: ``lexical`` for identifiers, quoted phrases and error codes (exact tokens
  matter), ``hybrid`` otherwise; the request may override it;
* domain filters: a query naming a domain's keywords (``router.domains`` in the config) is filtered
  to that domain and its related ones (``wine -> club, merchandise, visiting``).

Rules, not a model: they are fast, predictable and testable, and a 135M generator condensing
queries was worse than borrowing terms (it paraphrased the question away).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["rag", "small_talk"]

_SMALL_TALK = re.compile(
    r"^\s*(hi|hello|hey|hiya|howdy|yo|good (morning|afternoon|evening)|thanks?( you)?( so much| a lot)?|"
    r"thx|ty|cheers|bye|goodbye|see you|ok(ay)?|cool|great|nice|how are you( doing)?|who are you|"
    r"what'?s up)[\s!.?,]*(there|again|everyone|all)?[\s!.?]*$",
    re.IGNORECASE,
)
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-/]*")
_EXACT = re.compile(r'"[^"]+"|`[^`]+`|\b[A-Z]{2,}[-_]?\d+\b|\b\w+_\w+\b|\b\w+\.\w+\(|\b(E|ERR)\d{2,}\b')
_FOLLOW_UP = re.compile(
    r"^\s*(and|also|what about|how about|but|so|then|or)\b|\b(it|its|it's|they|them|their|this|that|these|those|"
    r"there|he|she|one)\b",
    re.IGNORECASE,
)
_STOP = frozenset(
    "a an the and or but if of to in on at by for with from about as is are was were be been being do does did "
    "have has had i you he she it we they me my your our their its this that these those what which who whom "
    "how why when where can could should would will shall may might must not no yes please tell me more also "
    "there here than then so just any some all each much many get got want need know like".split()
)


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class Route:
    kind: Kind
    query: str  # the standalone search query ("" for small talk)
    strategy: str = "hybrid"
    domains: tuple[str, ...] | None = None  # None: no domain filter
    reasons: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class DomainRule:
    keywords: tuple[str, ...]
    related: tuple[str, ...] = ()


class QueryRouter:
    def __init__(self, *, domains: dict[str, DomainRule] | None = None, history_turns: int = 3) -> None:
        if history_turns < 0:
            raise ValueError(f"history_turns must be >= 0, got {history_turns}")
        self.domains = dict(domains or {})
        for name, rule in self.domains.items():
            unknown = [r for r in rule.related if r not in self.domains]
            if unknown:
                raise ValueError(f"domain {name!r}: related {unknown} are not domains; known: {sorted(self.domains)}")
        self.history_turns = history_turns
        self._keywords = {
            name: {kw.lower() for kw in rule.keywords} | {name.lower()} for name, rule in self.domains.items()
        }

    @classmethod
    def from_config(cls, cfg) -> QueryRouter:
        r = cfg.router
        return cls(
            domains={n: DomainRule(tuple(d.keywords), tuple(d.related)) for n, d in r.domains.items()},
            history_turns=r.history_turns,
        )

    def warm_up(self) -> None:  # nothing heavy: rules only
        pass

    def run(self, *, messages: list[Message]) -> Route:
        users = [m.content for m in messages if m.role == "user"]
        if not users:
            raise ValueError("messages must contain at least one user message")
        last = users[-1].strip()
        if _SMALL_TALK.match(last):
            return Route(kind="small_talk", query="", strategy="none", reasons=("small talk",))
        reasons: list[str] = []
        query = last
        earlier = users[:-1][-self.history_turns :] if self.history_turns else []
        if earlier and (_FOLLOW_UP.search(last) or len(_content_words(last)) <= 3):
            have = {w.lower() for w in _content_words(last)}
            borrowed = list(dict.fromkeys(w for w in _content_words(" ".join(earlier)) if w.lower() not in have))
            if borrowed:
                query = f"{last} {' '.join(borrowed)}"
                reasons.append(f"follow-up: borrowed {len(borrowed)} terms from earlier turns")
        strategy = "lexical" if _EXACT.search(last) else "hybrid"
        if strategy == "lexical":
            reasons.append("exact tokens (quotes, identifiers, codes): lexical")
        domains = self._domains_for(query)
        if domains:
            reasons.append(f"domains: {', '.join(domains)}")
        return Route(kind="rag", query=query, strategy=strategy, domains=domains, reasons=tuple(reasons))

    def _domains_for(self, query: str) -> tuple[str, ...] | None:
        words = {w.lower().strip(".-/") for w in _WORD.findall(query)}
        words |= {w[:-1] for w in words if w.endswith("s")}  # plural keywords: "wines" -> "wine"
        hits = [name for name, kws in self._keywords.items() if words & kws]
        if not hits:
            return None
        out: dict[str, None] = {}
        for name in hits:
            out[name] = None
            for rel in self.domains[name].related:
                out[rel] = None
        return tuple(out)


def _content_words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text) if w.lower() not in _STOP and len(w) > 1]


class RouterDeployment:
    """Serve wrapper: the rules are microseconds, so no batching and no thread."""

    def __init__(self, cfg) -> None:
        from ray import serve

        self._router = QueryRouter.from_config(cfg)
        self._replica = serve.get_replica_context().replica_id.unique_id

    async def route(self, messages: list[Message]) -> tuple[Route, str]:
        return self._router.run(messages=messages), self._replica
