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


def test_a_gauge_set_before_the_ray_export_reaches_ray(monkeypatch):
    """The breaker's state is set to 0 when the ingress starts, before the replica exports to Ray's
    agent: the agent must still get it (the dashboard's ray_rag_ breaker panel was empty)."""
    from ray.util import metrics as rm

    from flow.metrics import Metrics

    sets = []

    class FakeGauge:
        def __init__(self, name, doc, tag_keys=()):
            self.name = name

        def set(self, value, tags=None):
            sets.append((self.name, value, tags))

    monkeypatch.setattr(rm, "Gauge", FakeGauge)
    monkeypatch.setattr(rm, "Counter", lambda *a, **k: None)
    monkeypatch.setattr(rm, "Histogram", lambda *a, **k: None)
    m = Metrics()
    m.breaker_state.set(2)
    m.stage_inflight.labels("retriever").set(3)
    m.export_to_ray(refresh_s=0)
    assert ("rag_generator_breaker_state", 2.0, None) in sets
    assert ("rag_stage_inflight", 3.0, {"stage": "retriever"}) in sets
    # Ray's agent drops a gauge that is not set again: the refresher sets every last value again
    sets.clear()
    m.index_version.labels("v1").set(1)
    sets.clear()
    assert m.refresh_ray_gauges() >= 3
    again = {(name, value, tuple(sorted((tags or {}).items()))) for name, value, tags in sets}
    assert ("rag_generator_breaker_state", 2.0, ()) in again
    assert ("rag_index_version_info", 1.0, (("version", "v1"),)) in again
    # a removed series (the version no longer answering) is not set again
    m.saw_version("v1")
    m.saw_version("v2")
    sets.clear()
    m.refresh_ray_gauges()
    versions = {tags["version"]: value for name, value, tags in sets if name == "rag_index_version_info"}
    assert versions == {"v2": 1.0}
