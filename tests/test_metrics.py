import math

import pytest

from indexing.metrics import evaluate_run, mrr_at, ndcg_at, recall_at


def test_ndcg_linear_gain_by_hand():
    judged = {"a": 3, "b": 1, "c": 2}
    ranked = ["b", "x", "a"]
    dcg = 1 / math.log2(2) + 3 / math.log2(4)
    idcg = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at(ranked, judged, 10) == pytest.approx(dcg / idcg)
    assert ndcg_at(["a", "c", "b"], judged, 10) == pytest.approx(1.0)


def test_recall_and_mrr():
    judged = {"a": 1, "b": 2, "z": 0}
    assert recall_at(["x", "b"], judged, 100) == 0.5
    assert recall_at(["x", "b"], judged, 1) == 0.0
    assert mrr_at(["x", "z", "b"], judged, 10) == pytest.approx(1 / 3)


def test_queries_without_positive_judgment_are_skipped():
    m = evaluate_run({"q1": ["a"], "q2": ["b"]}, {"q1": {"a": 1}, "q2": {"b": 0}})
    assert m["queries"] == 1 and m["ndcg@10"] == 1.0


def test_no_positive_judgment_at_all_is_an_error():
    with pytest.raises(ValueError, match="no positive judgment"):
        evaluate_run({}, {"q": {"a": 0}})
