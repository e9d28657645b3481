"""The answer-evaluation metrics (cli/eval_answers.py): pure functions on real sentences from docs/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.eval_answers import (
    QAItem,
    groundedness,
    is_abstention,
    judge_sentences,
    load_qa,
    score,
    split_sentences,
    summarise,
    token_f1,
)

REPO = Path(__file__).resolve().parent.parent

BREAKER = ("http.breaker: failure_threshold (5 consecutive generator failures open it), reset_timeout_s "
           "(30: then one trial request).")
TORCH = ("transformers fails to import because a CUDA build of torchvision sits beside the CPU torch. Fix: "
         ".venv/bin/pip uninstall -y torchvision torchaudio torchcodec.")
PASSAGES = {1: BREAKER, 2: TORCH}


# -- groundedness ------------------------------------------------------------------------------


def test_supported_sentence_citing_its_passage_is_grounded():
    assert groundedness("Five consecutive generator failures open the breaker [1].", PASSAGES) == 1.0


def test_unsupported_sentence_lowers_groundedness():
    good = "Five consecutive generator failures open the breaker [1]."
    bad = "The breaker sends an email to the administrator every night [1]."
    assert groundedness(good, PASSAGES) == 1.0
    assert groundedness(f"{good} {bad}", PASSAGES) == 0.5
    judged = judge_sentences(f"{good} {bad}", PASSAGES)
    assert [j.supported for j in judged] == [True, False]


def test_citing_the_wrong_passage_is_not_support():
    # true per passage 1, but it cites passage 2
    assert groundedness("Five consecutive generator failures open the breaker [2].", PASSAGES) == 0.0


def test_answer_citing_nothing_is_unsupported():
    assert groundedness("Five consecutive generator failures open the breaker.", PASSAGES) == 0.0


def test_citation_of_unknown_number_supports_nothing():
    assert groundedness("Five consecutive generator failures open the breaker [7].", PASSAGES) == 0.0


def test_uncited_sentence_takes_the_next_citation():
    # the service appends attributed markers at the end of an answer
    answer = "Uninstall torchvision, torchaudio and torchcodec. They are CUDA builds beside the CPU torch [2]."
    judged = judge_sentences(answer, PASSAGES)
    assert [j.cites for j in judged] == [(2,), (2,)]
    assert groundedness(answer, PASSAGES) == 1.0


def test_trailing_citation_stays_with_its_sentence():
    assert split_sentences("Run ragraph models --force. [1]") == ["Run ragraph models --force. [1]"]


def test_sentences_without_claims_are_not_judged():
    assert groundedness("See [1].", PASSAGES) is None


def test_support_threshold_is_applied():
    half = "Generator failures open the breaker and page the on-call engineer by telephone [1]."
    j = judge_sentences(half, PASSAGES)[0]
    assert 0.3 < j.support < 0.7
    assert groundedness(half, PASSAGES, threshold=0.7) == 0.0
    assert groundedness(half, PASSAGES, threshold=0.3) == 1.0


# -- token F1, abstention ------------------------------------------------------------------------


def test_token_f1_ignores_case_articles_punctuation_and_markers():
    assert token_f1("Run `ragraph config --show` [1].", "run ragraph config --show") == (1.0, 1.0, 1.0)


def test_token_f1_partial_and_disjoint():
    p, r, f = token_f1("ragraph models", "rebuild it with ragraph models --force")
    assert (p, round(r, 3)) == (1.0, round(2 / 6, 3))  # rebuild it with ragraph models force
    assert f == pytest.approx(2 * p * r / (p + r))
    assert token_f1("Paris", "ragraph models --force") == (0.0, 0.0, 0.0)
    assert token_f1("", "anything") == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("text", [
    "I don't know.", "I do not know: the context does not say.", "The documents do not contain the answer.",
    "I cannot answer that from these sources.",
])
def test_abstention_phrases(text):
    assert is_abstention(text)


@pytest.mark.parametrize("text", ["Run ragraph models --force [1].", "The answer is [2].", "It is not known to fail."])
def test_answers_are_not_abstentions(text):
    assert not is_abstention(text)


def test_service_flag_wins_over_phrases():
    assert is_abstention("Run ragraph models.", {"answer": {"mode": "abstain"}})
    assert not is_abstention("I don't know the rest, but run ragraph models.", {"answer": {"mode": "extractive"}})


# -- one response, the summary ---------------------------------------------------------------------


def _body(text: str, sources: list[tuple[str, bool]], **meta) -> dict:
    return {
        "choices": [{"message": {"role": "assistant", "content": text}}],
        "rag": {"sources": [{"index": i, "document_id": d, "chunk_id": f"{d}#{i}", "cited": c, "excerpt": ""}
                            for i, (d, c) in enumerate(sources, 1)], "metadata": {"status": "ok", **meta}},
    }


def test_score_and_summarise():
    q1 = QAItem("a", "What opens the breaker?", ("configuration.md",), "5 consecutive generator failures open it")
    q2 = QAItem("b", "How do I fix torchvision::nms?", ("troubleshooting.md",), "uninstall torchvision")
    q3 = QAItem("u", "Who won the 1998 World Cup?", ())
    r1 = score(q1, _body("Five consecutive generator failures open the breaker [1].",
                         [("configuration.md", True), ("api.md", True)]), seconds=2.0, passages=PASSAGES)
    r2 = score(q2, _body("Paris is nice [2].", [("api.md", False), ("troubleshooting.md", True)]),
               seconds=4.0, passages=PASSAGES)
    r3 = score(q3, _body("I don't know.", [("api.md", False)]), seconds=3.0, passages=PASSAGES)
    assert (r1.gold_in_sources, r1.cites_gold, r1.groundedness) == (True, True, 1.0)
    assert (r2.gold_in_sources, r2.cites_gold, r2.groundedness) == (True, True, 0.0)
    assert r3.abstained and r3.gold_in_sources is None
    s = summarise([r1, r2, r3])
    assert s["questions"] == 3 and s["answerable"] == 2 and s["unanswerable"] == 1
    assert s["citation_recall"] == 1.0
    assert s["citation_precision"] == round(2 / 3, 4)  # api.md cited once, not gold
    assert s["groundedness"] == 0.5  # 1 of 2 judged sentences; the abstention is not judged
    assert s["abstained_unanswerable"] == 1 and s["abstention_rate"] == 1.0 and s["false_abstention_rate"] == 0.0
    assert s["gold_in_sources"] == 1.0
    assert s["seconds_per_question"] == 3.0


def test_unanswered_unanswerable_counts_as_not_declined():
    q = QAItem("u", "Who won the 1998 World Cup?", ())
    r = score(q, _body("France won it [1].", [("api.md", True)]), seconds=1.0, passages={1: BREAKER})
    s = summarise([r])
    assert s["abstention_rate"] == 0.0 and s["citation_recall"] is None


# -- the QA set ------------------------------------------------------------------------------------


def test_load_qa_reports_every_bad_line(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text("\n".join([
        json.dumps({"id": "a", "question": "q?", "gold_documents": ["x.md"]}),
        "not json",
        json.dumps({"id": "a", "question": "", "gold_documents": "x.md"}),
        json.dumps({"id": "c", "question": "q?", "gold_documents": [], "extra": 1}),
    ]))
    with pytest.raises(ValueError) as e:
        load_qa(p)
    msg = str(e.value)
    assert "5 problem(s)" in msg  # line 3 has three and "qa.jsonl:2: not JSON" in msg
    assert "duplicate id 'a'" in msg and "unknown keys ['extra']" in msg


def test_dev_set_is_valid_and_names_indexed_documents():
    items = load_qa(REPO / "load_tests/qa/docs_dev.jsonl")
    assert len(items) >= 30
    assert sum(not i.answerable for i in items) >= 3
    docs = {p.name for p in (REPO / "docs").glob("*.md")}
    for it in items:
        assert set(it.gold_documents) <= docs, it.id
        assert not it.answerable or it.answer, f"{it.id}: an answerable question needs a reference answer"
