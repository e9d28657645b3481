"""Answers without the generator, and guards around it, in the ingress (docs/evaluation.md).

* :func:`extract`: the extractive answer: the sentences of the top passages that best cover the
  question's words (rarer words weigh more), each cited ``[n]``. ``generator.answer_mode:
  extractive`` answers with it, and it is the degraded answer when the generator is down.
* :func:`quote`: a passage cut to its best sentences, for a small model's context ("quote the
  passage": less to read, less to echo).
* :func:`abstain_reason`: why the service should say "I don't know" instead of answering: the
  retrieval is weak (the best dense similarity is low) or the question's words are not in the
  passages (an off-corpus question).
* :class:`LoopGuard`: a stop on degenerate generation (a phrase repeated, a token run).

Plain functions on :class:`deployments.retriever.Passage`; no model, no I/O.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from deployments.retriever import Passage

_WORD = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset(
    "a an the and or but if then else of to in on at by for with from into onto over under as is are was were be "
    "been being it its this that these those there their them they he she we you your i me my our not no do does "
    "did done can could should would will shall may might must has have had having so such than too very also only "
    "just any all each every some more most other which what who whom whose when where why how about above below "
    "up down out off again once here both few own same use used using get happen happens mean means".split()
)


def _norm(w: str) -> str:
    """A light stemmer: configure, configured, configures -> configur; settings, setting -> sett."""
    if len(w) > 4 and w.endswith("s") and not w.endswith("ss"):
        w = w[:-1]
    for suf in ("ing", "ed"):
        if len(w) > len(suf) + 3 and w.endswith(suf):
            return w[: -len(suf)]
    return w[:-1] if len(w) > 4 and w.endswith("e") else w


def terms(text: str) -> list[str]:
    """Content words: lower case, split at any non-alphanumeric, stopwords and question words
    dropped, a plural/-ed/-ing suffix stripped."""
    return [_norm(w) for w in _WORD.findall(text.lower()) if w not in STOPWORDS and len(w) > 1]


_MD = re.compile(r"\*\*|`|^\s*(?:[-*+]|#+|\d+\.)\s+", re.M)
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\"'])")


def sentences(text: str) -> list[str]:
    """Sentences of a markdown passage: lines first (a table row, a list item is one), then full
    stops; code fence markers and table rules dropped, markdown emphasis and backticks removed."""
    out: list[str] = []
    text = re.sub(r"\|\s*\|", "\n", text)  # a table row ends where the next begins (chunk text is one line)
    text = re.sub(r"```[a-z]*", "\n", text)  # a code block's lines are sentences too (commands answer questions)
    for line in text.splitlines():
        s = line.strip()
        if not s or set(s) <= set("|-: "):
            continue
        s = _MD.sub("", s).replace("|", " ").strip()
        for part in _SPLIT.split(s):
            part = " ".join(part.split())
            if len(part.split()) >= 3:
                out.append(part)
    return out


@dataclass(frozen=True, slots=True)
class Scored:
    source: int  # 1-based, as cited
    text: str
    score: float


def _idf(docs: list[set[str]]) -> dict[str, float]:
    n = len(docs)
    df: dict[str, int] = {}
    for d in docs:
        for t in d:
            df[t] = df.get(t, 0) + 1
    return {t: math.log(1 + n / c) for t, c in df.items()}


def rank_sentences(question: str, passages: list[Passage], *, top_passages: int = 3) -> list[Scored]:
    """Sentences of the first ``top_passages`` passages, best first: the share of the question's
    word weight (idf over these sentences) a sentence holds, a little more for a higher passage,
    a little less for a long sentence."""
    q = set(terms(question))
    cands = [(i, s) for i, p in enumerate(passages[:top_passages], 1) for s in sentences(p.text)]
    if not q or not cands:
        return []
    sets = [set(terms(s)) for _, s in cands]
    idf = _idf(sets)
    top = math.log(1 + len(sets))  # a word no sentence has weighs as much as the rarest
    total = sum(idf.get(t, top) for t in q)
    out = []
    for (i, s), ws in zip(cands, sets):
        cover = sum(idf.get(t, top) for t in q & ws) / total
        length = max(0, len(s.split()) - 40) / 100
        out.append(Scored(i, s, round(cover + 0.05 / i - length, 4)))
    return sorted(out, key=lambda x: -x.score)


def extract(question: str, passages: list[Passage], *, sentences_max: int = 2, top_passages: int = 3) -> tuple[str, list[int]]:
    """The extractive answer and the source numbers it cites: the best sentence, plus the next
    best ones (up to ``sentences_max``) that score at least half as well; ``("", [])`` when no
    sentence shares a word with the question."""
    ranked = [s for s in rank_sentences(question, passages, top_passages=top_passages) if s.score > 0.05 / s.source]
    if not ranked:
        return "", []
    best = ranked[0].score
    chosen = [s for s in ranked[:sentences_max] if s.score >= 0.5 * best]
    text = " ".join(f"{s.text.rstrip()} [{s.source}]" for s in chosen)
    return text, sorted({s.source for s in chosen})


def quote(question: str, passage: Passage, *, sentences_max: int = 3) -> Passage:
    """``passage`` cut to its ``sentences_max`` best sentences for ``question``, in passage order
    (a copy; the passage is kept whole when it has no more sentences than that)."""
    sents = sentences(passage.text)
    if sentences_max <= 0 or len(sents) <= sentences_max:
        return passage
    ranked = rank_sentences(question, [replace(passage, text="\n".join(sents))], top_passages=1)
    keep = {s.text for s in ranked[:sentences_max]}
    return replace(passage, text=" ".join(s for s in sents if s in keep))


def coverage(question: str, passages: list[Passage]) -> float:
    """Share of the question's content words found in the passages (text, title, headings)."""
    q = set(terms(question))
    if not q:
        return 1.0
    seen = {t for p in passages for t in terms(f"{p.text} {p.heading_path} {p.title}")}
    return len(q & seen) / len(q)


def abstain_reason(question: str, passages: list[Passage], *, min_similarity: float, min_coverage: float) -> str | None:
    """Why the corpus cannot answer ``question`` from ``passages``, or None.

    * the best dense (cosine) score among the passages is below ``min_similarity`` (skipped when
      no passage carries one, e.g. a lexical search);
    * fewer than ``min_coverage`` of the question's content words occur in the passages.
    0 turns a check off."""
    if not passages:
        return None
    dense = [p.scores["dense"] for p in passages if "dense" in p.scores]
    if min_similarity > 0 and dense and max(dense) < min_similarity:
        return f"weak retrieval: best dense similarity {max(dense):.2f} < {min_similarity:g}"
    if min_coverage > 0 and (c := coverage(question, passages)) < min_coverage:
        return f"off-corpus: {c:.0%} of the question's words are in the passages (< {min_coverage:.0%})"
    return None


class LoopGuard:
    """Watches streamed text; :meth:`feed` turns True once the text degenerates: the same
    ``ngram`` words ``repeats`` times, or a run of one short piece repeated (``LEM_LEM_LEM_...``)."""

    _RUN = re.compile(r"(\S{1,12}?)\1{5,}")

    def __init__(self, *, ngram: int = 4, repeats: int = 3) -> None:
        if ngram < 1 or repeats < 2:
            raise ValueError(f"LoopGuard needs ngram >= 1 and repeats >= 2, got ngram={ngram}, repeats={repeats}")
        self.ngram, self.repeats = ngram, repeats
        self._text = ""
        self._seen: dict[tuple[str, ...], int] = {}
        self._next = 0  # the first word position whose n-gram is not counted yet
        self.tripped = False

    def feed(self, text: str) -> bool:
        if self.tripped or not text:
            return self.tripped
        self._text += text
        words = self._text.lower().split()
        done = words[:-1]  # the last word may still grow
        for i in range(self._next, len(done) - self.ngram + 1):
            g = tuple(done[i : i + self.ngram])
            self._seen[g] = self._seen.get(g, 0) + 1
            if self._seen[g] >= self.repeats:
                self.tripped = True
        self._next = max(self._next, len(done) - self.ngram + 1)
        if self._RUN.search(self._text[-200:]):
            self.tripped = True
        return self.tripped
