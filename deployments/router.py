"""The query router: a plain class; its Serve deployment is a thin wrapper
(:class:`deployments.replicas.RouterDeployment`).

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

Every pattern here runs in linear time on any input (a message may hold 16,000 characters): no
two adjacent quantifiers can match the same characters (the small-talk tail uses possessive
quantifiers), and the small-talk check only looks at messages of up to ``SMALL_TALK_MAX_CHARS``.
The search query is capped after condensation (``router.max_query_chars`` and
``router.max_query_terms``): retrieval cost grows with the query's terms, and a long message
(plus the borrowed words) would otherwise go to BM25 and the embedder whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["rag", "small_talk"]

_SMALL_TALK = re.compile(
    r"^\s*(hi|hello|hey|hiya|howdy|yo|good (morning|afternoon|evening)|thanks?( you)?( so much| a lot)?|"
    r"thx|ty|cheers|bye|goodbye|see you|ok(ay)?|cool|great|nice|how are you( doing)?|who are you|"
    r"what'?s up)[\s!.?,]*+(?:(?:there|again|everyone|all)[\s!.?]*+)?$",
    re.IGNORECASE,
)
SMALL_TALK_MAX_CHARS = 80  # "good afternoon everyone, thanks so much!!": longer messages are never small talk
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
    def __init__(self, *, domains: dict[str, DomainRule] | None = None, history_turns: int = 3,
                 max_query_chars: int = 1000, max_query_terms: int = 64) -> None:
        errors = []
        if history_turns < 0:
            errors.append(f"history_turns must be >= 0, got {history_turns}")
        if max_query_chars < 1:
            errors.append(f"max_query_chars must be >= 1, got {max_query_chars}")
        if max_query_terms < 1:
            errors.append(f"max_query_terms must be >= 1, got {max_query_terms}")
        if errors:
            raise ValueError("; ".join(errors))
        self.max_query_chars = max_query_chars
        self.max_query_terms = max_query_terms
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
            max_query_chars=r.max_query_chars,
            max_query_terms=r.max_query_terms,
        )

    def warm_up(self) -> None:  # nothing heavy: rules only
        pass

    def run(self, *, messages: list[Message]) -> Route:
        users = [m.content for m in messages if m.role == "user"]
        if not users:
            raise ValueError("messages must contain at least one user message")
        last = users[-1].strip()
        if is_small_talk(last):
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
        capped = cap_query(query, max_chars=self.max_query_chars, max_terms=self.max_query_terms)
        if capped != query:
            reasons.append(f"query capped from {len(query)} to {len(capped)} characters "
                           f"(router.max_query_chars={self.max_query_chars}, "
                           f"router.max_query_terms={self.max_query_terms} distinct terms)")
            query = capped
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


def is_small_talk(text: str) -> bool:
    """A greeting, thanks or goodbye and nothing else (``text`` already stripped)."""
    return len(text) <= SMALL_TALK_MAX_CHARS and _SMALL_TALK.match(text) is not None


def cap_query(query: str, *, max_chars: int, max_terms: int) -> str:
    """``query`` cut before its ``max_terms + 1``-th distinct word (case-insensitive) and to at most
    ``max_chars`` characters, at a word boundary where there is one; unchanged when within both."""
    if len(query) <= max_chars and len(_WORD.findall(query[: max_chars + 1])) <= max_terms:
        return query  # cheap check first: few words cannot hold too many distinct ones
    seen: set[str] = set()
    end = len(query)
    for m in _WORD.finditer(query):
        if m.start() >= max_chars:
            break
        seen.add(m.group().lower())
        if len(seen) > max_terms:
            end = m.start()
            break
    cut = min(end, max_chars)
    if cut == max_chars and cut < len(query) and not query[cut].isspace():
        i = cut  # cut inside a word: end before it, if anything comes before it
        while i > 0 and not query[i - 1].isspace():
            i -= 1
        cut = i or cut
    return query[:cut].rstrip()


def _content_words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text) if w.lower() not in _STOP and len(w) > 1]
