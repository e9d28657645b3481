"""``ragraph eval-answers QA.jsonl``: score the answers of a running service (docs/evaluation.md).

A QA line is ``{"id", "question", "gold_documents": [document ids], "answer": "reference, optional"}``;
empty ``gold_documents`` means the corpus cannot answer the question. Each question is asked once,
sequentially, through OpenAI's ``POST /v1/chat/completions`` (response cache bypassed), and scored
from the answer text and ``rag.sources`` (``document_id``, ``chunk_id``, ``cited``):

* **citation recall**: answerable questions whose answer cites at least one gold document;
* **citation precision**: of the sources the answers to answerable questions cite, the share that
  are gold documents;
* **groundedness**: of the answer sentences that make a claim, the share supported by the passages
  they cite (:func:`groundedness`; the definition is in docs/evaluation.md);
* **token F1** with the reference answer, and **answer recall** (the share of the reference's
  words found in the answer), both on SQuAD-normalised tokens without the ``[n]`` markers;
* **abstention**: unanswerable questions the service declined, and answerable ones it declined;
* **gold in sources**: answerable questions with a gold document among the returned sources;
* **seconds per question**, wall clock, client side.

The metric functions are pure and unit-tested (tests/test_eval_answers.py). The last stdout line
is one JSON object.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------
# the QA set


@dataclass(frozen=True, slots=True)
class QAItem:
    id: str
    question: str
    gold_documents: tuple[str, ...]
    answer: str = ""

    @property
    def answerable(self) -> bool:
        return bool(self.gold_documents)


def load_qa(path: Path) -> list[QAItem]:
    """The QA set; every bad line is reported at once (file:line and what is wrong)."""
    items: list[QAItem] = []
    problems: list[str] = []
    seen: set[str] = set()
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not JSON ({e.msg})")
            continue
        if not isinstance(d, dict):
            problems.append(f"{where}: expected an object, got {type(d).__name__}")
            continue
        qid, question, gold = d.get("id"), d.get("question"), d.get("gold_documents")
        bad = []
        if not isinstance(qid, str) or not qid:
            bad.append("'id' must be a non-empty string")
        elif qid in seen:
            bad.append(f"duplicate id {qid!r}")
        if not isinstance(question, str) or not question.strip():
            bad.append("'question' must be a non-empty string")
        if not isinstance(gold, list) or not all(isinstance(g, str) for g in gold):
            bad.append("'gold_documents' must be a list of document ids (empty: unanswerable)")
        if not isinstance(d.get("answer", ""), str):
            bad.append("'answer' must be a string")
        extra = set(d) - {"id", "question", "gold_documents", "answer"}
        if extra:
            bad.append(f"unknown keys {sorted(extra)}; allowed: id, question, gold_documents, answer")
        if bad:
            problems.extend(f"{where}: {b}" for b in bad)
            continue
        seen.add(qid)
        items.append(QAItem(qid, question, tuple(gold), d.get("answer", "")))
    if problems:
        raise ValueError(f"{len(problems)} problem(s) in the QA set:\n  " + "\n  ".join(problems))
    if not items:
        raise ValueError(f"{path}: no questions")
    return items


# ---------------------------------------------------------------------------------------------
# text

CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_WORD = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset(
    "a an the and or but if then else of to in on at by for with from into onto over under as is are was were be "
    "been being it its this that these those there their them they he she we you your i me my our not no do does "
    "did done can could should would will shall may might must has have had having so such than too very also only "
    "just any all each every some more most other which what who whom whose when where why how about above below "
    "up down out off again once here both few own same s t".split()
)


def strip_citations(text: str) -> str:
    return CITATION.sub(" ", text)


def answer_tokens(text: str) -> list[str]:
    """SQuAD normalisation: lower case, ``[n]`` markers, punctuation and articles removed."""
    return _WORD.findall(_ARTICLES.sub(" ", strip_citations(text).lower()))


def token_f1(prediction: str, reference: str) -> tuple[float, float, float]:
    """(precision, recall, F1) of the answer's tokens against the reference's (bag of words)."""
    p, r = answer_tokens(prediction), answer_tokens(reference)
    if not p or not r:
        return 0.0, 0.0, 0.0
    same = sum((Counter(p) & Counter(r)).values())
    if same == 0:
        return 0.0, 0.0, 0.0
    prec, rec = same / len(p), same / len(r)
    return prec, rec, 2 * prec * rec / (prec + rec)


def _norm(w: str) -> str:
    for suf in ("ing", "ed", "es", "s"):
        if len(w) > len(suf) + 3 and w.endswith(suf):
            return w[: -len(suf)]
    return w


def content_terms(text: str) -> list[str]:
    """Words that carry a claim: lower case, split at any non-alphanumeric (``ann_threshold`` is two
    words), stopwords and one-letter words dropped, a plural/-ed/-ing suffix stripped."""
    return [_norm(w) for w in _WORD.findall(strip_citations(text).lower()) if w not in STOPWORDS and len(w) > 1]


_SENT = re.compile(r"(?<=[.!?])\s+(?=[\[A-Z0-9`\"'(])|\n+")


def split_sentences(text: str) -> list[str]:
    """Sentences (and lines); a citation right after a full stop (``... done. [1]``) stays with the
    sentence before it."""
    out: list[str] = []
    for s in _SENT.split(text.strip()):
        s = s.strip()
        if not s:
            continue
        if out and CITATION.fullmatch(s.rstrip(". ")):  # a lone "[1]" belongs to what came before
            out[-1] = f"{out[-1]} {s}"
        else:
            out.append(s)
    return out


def cited_numbers(text: str) -> list[int]:
    return [int(n) for m in CITATION.finditer(text) for n in re.split(r"\s*,\s*", m.group(1))]


@dataclass(frozen=True, slots=True)
class SentenceJudgement:
    sentence: str
    cites: tuple[int, ...]  # the source numbers it was judged against
    support: float  # share of its content terms found in those passages
    supported: bool


MIN_TERMS = 2  # a sentence with fewer content terms makes no checkable claim ("See [1].")


def judge_sentences(
    answer: str, passages: dict[int, str], *, threshold: float = 0.7, min_terms: int = MIN_TERMS
) -> list[SentenceJudgement]:
    """Each claim-making sentence of ``answer`` against the passages it cites.

    ``passages`` maps a source number (1-based, as in ``[n]``) to that passage's full text. A
    sentence's citations are the ``[n]`` in it; a sentence without any takes those of the nearest
    cited sentence after it (the service appends its attributed ``[n]`` at the end), else before
    it. A sentence is *supported* when at least ``threshold`` of its content terms occur in the
    union of the passages it cites; a citation of a number not in ``passages`` supports nothing,
    and a sentence in an answer that cites nothing is unsupported. Sentences with fewer than
    ``min_terms`` content terms are not judged."""
    sents = split_sentences(answer)
    own = [tuple(cited_numbers(s)) for s in sents]
    out: list[SentenceJudgement] = []
    for i, s in enumerate(sents):
        terms = content_terms(s)
        if len(terms) < min_terms:
            continue
        cites = own[i] or next((c for c in own[i + 1 :] if c), ()) or next((c for c in reversed(own[:i]) if c), ())
        vocab = {t for n in cites for t in content_terms(passages.get(n, ""))}
        support = sum(t in vocab for t in terms) / len(terms)
        out.append(SentenceJudgement(s, cites, round(support, 3), bool(cites) and support >= threshold))
    return out


def groundedness(answer: str, passages: dict[int, str], *, threshold: float = 0.7) -> float | None:
    """Share of the answer's claim-making sentences supported by the passages they cite
    (:func:`judge_sentences`); None when no sentence makes a checkable claim."""
    judged = judge_sentences(answer, passages, threshold=threshold)
    return sum(j.supported for j in judged) / len(judged) if judged else None


ABSTAIN = re.compile(
    r"\b(i (do not|don't|cannot|can't|could not|couldn't) (know|answer|find|tell)|"
    r"(do|does|did) not (contain|say|mention|cover)|doesn't (contain|say|mention|cover)|"
    r"no (information|answer) (about|on|for|to)|not (covered|mentioned|found) in|"
    r"(cannot|can't|could not|couldn't) (be )?(answer|found|determine))",
    re.I,
)


def is_abstention(text: str, metadata: dict[str, Any] | None = None) -> bool:
    """The service declined: ``rag.metadata.answer.mode == "abstain"`` where the service says so,
    else an "I don't know" phrase in the answer."""
    mode = ((metadata or {}).get("answer") or {}).get("mode")
    if mode is not None:
        return mode == "abstain"
    return bool(ABSTAIN.search(text))


# ---------------------------------------------------------------------------------------------
# one question


@dataclass
class Record:
    id: str
    answerable: bool
    gold: tuple[str, ...] = ()
    answer: str = ""
    seconds: float = 0.0
    error: str | None = None
    status: str | None = None
    sources: list[str] = field(default_factory=list)  # document ids, in order
    cited: list[str] = field(default_factory=list)  # document ids of cited sources (with repeats)
    abstained: bool = False
    gold_in_sources: bool | None = None
    cites_gold: bool | None = None
    groundedness: float | None = None
    judged_sentences: int = 0
    supported_sentences: int = 0
    token_f1: float | None = None
    answer_recall: float | None = None


def score(item: QAItem, body: dict[str, Any], *, seconds: float, passages: dict[int, str],
          threshold: float = 0.7) -> Record:
    """A :class:`Record` from a ``chat.completion`` body; ``passages`` maps source number -> full text."""
    text = body["choices"][0]["message"]["content"] or ""
    rag = body.get("rag") or {}
    sources = rag.get("sources") or []
    meta = rag.get("metadata") or {}
    rec = Record(item.id, item.answerable, item.gold_documents, answer=text, seconds=round(seconds, 3), status=meta.get("status"))
    rec.sources = [s["document_id"] for s in sources]
    rec.cited = [s["document_id"] for s in sources if s.get("cited")]
    rec.abstained = is_abstention(text, meta)
    if not rec.abstained:
        judged = judge_sentences(text, passages, threshold=threshold)
        rec.judged_sentences = len(judged)
        rec.supported_sentences = sum(j.supported for j in judged)
        rec.groundedness = rec.supported_sentences / len(judged) if judged else None
    if item.answerable:
        gold = set(item.gold_documents)
        rec.gold_in_sources = bool(gold & set(rec.sources))
        rec.cites_gold = bool(gold & set(rec.cited))
        if item.answer:
            _, rec.answer_recall, rec.token_f1 = token_f1(text, item.answer)
    return rec


def summarise(records: list[Record]) -> dict[str, Any]:
    """The report's numbers over all records (errors count as wrong, never as skipped)."""
    ans = [r for r in records if r.answerable]
    una = [r for r in records if not r.answerable]
    with_ref = [r for r in ans if r.token_f1 is not None or r.error]
    cited = [d for r in ans for d in r.cited]
    gold_cited = sum(1 for r in ans for d in r.cited if d in r.gold)
    judged = sum(r.judged_sentences for r in records)

    def mean(xs: list[float]) -> float | None:
        return round(sum(xs) / len(xs), 4) if xs else None

    return {
        "questions": len(records),
        "answerable": len(ans),
        "unanswerable": len(una),
        "errors": sum(r.error is not None for r in records),
        "citation_recall": mean([1.0 if r.cites_gold else 0.0 for r in ans]),
        "citation_precision": round(gold_cited / len(cited), 4) if cited else None,
        "groundedness": round(sum(r.supported_sentences for r in records) / judged, 4) if judged else None,
        "judged_sentences": judged,
        "token_f1": mean([r.token_f1 or 0.0 for r in with_ref]),
        "answer_recall": mean([r.answer_recall or 0.0 for r in with_ref]),
        "abstained_unanswerable": sum(r.abstained for r in una),
        "abstention_rate": mean([1.0 if r.abstained else 0.0 for r in una]),
        "false_abstention_rate": mean([1.0 if r.abstained else 0.0 for r in ans]),
        "gold_in_sources": mean([1.0 if r.gold_in_sources else 0.0 for r in ans]),
        "seconds_per_question": mean([r.seconds for r in records]),
    }


# ---------------------------------------------------------------------------------------------
# the run


def _passage_texts(client, body: dict[str, Any], question: str) -> dict[int, str]:
    """Full passage texts for the answer's sources: ``POST /v1/search`` with the query the service
    used (``rag.metadata.route.query``), matched by chunk id; a source not found keeps its excerpt."""
    sources = (body.get("rag") or {}).get("sources") or []
    texts = {s["index"]: s.get("excerpt") or "" for s in sources}
    if not sources:
        return texts
    route = ((body.get("rag") or {}).get("metadata") or {}).get("route") or {}
    try:
        r = client.post("/v1/search", json={"query": route.get("query") or question,
                                             "top_k": max(len(sources), 1), "strategy": route.get("strategy")})
        if r.status_code == 200:
            full = {x["chunk_id"]: x["text"] for x in r.json().get("results", [])}
            for s in sources:
                if s.get("chunk_id") in full:
                    texts[s["index"]] = full[s["chunk_id"]]
    except Exception:
        pass
    return texts


def evaluate(items: list[QAItem], *, url: str, api_key: str | None = None, model: str | None = None,
             threshold: float = 0.7, timeout_s: float = 300, progress=None) -> list[Record]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    records: list[Record] = []
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(timeout_s, connect=10)) as c:
        if model is None:
            r = c.get("/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        for it in items:
            t = time.perf_counter()
            try:
                r = c.post("/v1/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": it.question}],
                    "rag": {"cache": False},
                })
                took = time.perf_counter() - t
                if r.status_code != 200:
                    rec = Record(it.id, it.answerable, it.gold_documents, seconds=round(took, 3), error=f"HTTP {r.status_code}: {r.text[:200]}")
                else:
                    body = r.json()
                    rec = score(it, body, seconds=took, passages=_passage_texts(c, body, it.question), threshold=threshold)
            except httpx.HTTPError as e:
                rec = Record(it.id, it.answerable, it.gold_documents, seconds=round(time.perf_counter() - t, 3), error=f"{type(e).__name__}: {e}")
            if not it.answerable or rec.error:
                rec.gold_in_sources = False if it.answerable else None
            records.append(rec)
            if progress is not None:
                progress(it, rec)
    return records


def _line(it: QAItem, r: Record) -> str:
    if r.error:
        return f"{it.id:<6} ERROR {r.error}"
    flags = ("declined" if r.abstained else "answered") + ("" if not it.answerable else
             f" gold:{'y' if r.gold_in_sources else 'n'} cites-gold:{'y' if r.cites_gold else 'n'}")
    g = "-" if r.groundedness is None else f"{r.groundedness:.2f}"
    f1 = "-" if r.token_f1 is None else f"{r.token_f1:.2f}"
    ans = " ".join(r.answer.split())
    return f"{it.id:<6} {r.seconds:5.1f}s {flags:<34} grounded {g:<4} f1 {f1:<4} {ans[:90]!r}"


def main(args) -> int:
    try:
        items = load_qa(args.qa)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    quiet = args.json
    if not quiet:
        print(f"ragraph eval-answers: {len(items)} questions from {args.qa} against {args.url}")
    try:
        records = evaluate(items, url=args.url, api_key=args.api_key, model=args.model, threshold=args.support,
                           progress=None if quiet else (lambda it, r: print(_line(it, r), flush=True)))
    except Exception as e:  # the service is not there, or /v1/models refused
        print(f"error: cannot evaluate against {args.url}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    summary = {"qa": str(args.qa), "url": args.url, **summarise(records)}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"summary": summary, "records": [r.__dict__ for r in records]}, indent=1))
    if not quiet:
        for k, v in summary.items():
            if k not in ("qa", "url"):
                print(f"  {k:<24} {v}")
    print(json.dumps(summary))
    return 0 if not summary["errors"] else 1


def add_arguments(p) -> None:
    import os

    p.add_argument("qa", type=Path, help="QA set: JSONL of {id, question, gold_documents, answer}")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="service URL")
    p.add_argument("--api-key", default=os.environ.get("RAGRAPH_API_KEY"), help="API key (default: $RAGRAPH_API_KEY)")
    p.add_argument("--model", default=None, help="model name (default: the first of GET /v1/models)")
    p.add_argument("--support", type=float, default=0.7,
                   help="share of a sentence's content words its cited passages must hold to count as supported")
    p.add_argument("--out", type=Path, default=None, help="also write every answer and its scores here (JSON)")
    p.add_argument("--json", action="store_true", help="print only the JSON summary")
