"""The cross-encoder reranker contract, and the label-free adaptation that builds one offline."""

import pytest

from deployments.reranker import CrossEncoderReranker
from deployments.retriever import HybridRetriever, Passage
from indexing.adapt import Pair, mine_pairs, train_cross_encoder


TOPICS = {
    "wine": "The cellar holds pinot noir from the Napa valley. Each barrel ages eighteen months in French oak. "
    "Tastings of the reserve wines are booked a week ahead.",
    "club": "Club members receive four shipments every year. A membership can be cancelled from the account page. "
    "Members also get ten percent off every order in the shop.",
    "visit": "The tasting room opens at ten in the morning on weekdays. Parking next to the barn is free for visitors. "
    "Dogs on a leash are welcome on the terrace.",
    "shop": "Corkscrews and decanters are sold in the online shop. Orders leave the warehouse within two days. "
    "Gift boxes can carry a printed card with a message.",
    "returns": "Damaged bottles are refunded within thirty days of delivery. Send a photo of the broken bottle to support. "
    "A replacement ships as soon as the photo arrives.",
    "events": "The harvest festival takes place every September in the vineyard. Live music plays until late in the evening. "
    "Tickets include a guided walk through the vines.",
}


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, provisioned, local_cfg):
    """A cross-encoder adapted for a few steps on pairs mined from a small multi-sentence corpus."""
    from conftest import write_corpus
    from indexing.jobs import index_source

    base = tmp_path_factory.mktemp("adapt")
    src = write_corpus(base / "src", {f"{k}/{k}.md": f"# {k.title()}\n\n{v}" for k, v in TOPICS.items()})
    index_source(local_cfg, src, base / "index", log=lambda _: None)
    r = HybridRetriever.from_config(local_cfg, index_dir=base / "index")
    r.warm_up()
    pairs = mine_pairs(r, n_queries=20, negatives=1, neg_from=1, log=lambda _: None)
    out = tmp_path_factory.mktemp("ce") / "reranker"
    stats = train_cross_encoder(str(provisioned["embedder"]), pairs, out, max_minutes=1, log=lambda _: None)
    return out, pairs, stats


def test_mined_pairs_have_positives_and_negatives(adapted):
    _, pairs, stats = adapted
    labels = [p.label for p in pairs]
    assert labels.count(1.0) >= 4 and labels.count(0.0) == labels.count(1.0)
    assert stats["pairs_seen"] == len(pairs)
    q = next(p for p in pairs if p.label == 1.0)
    assert q.query not in q.passage  # the sentence was taken out of its own passage


def test_reranker_orders_by_its_scores_and_copies(adapted):
    out, _, _ = adapted
    rr = CrossEncoderReranker(model=str(out), top_k=3, candidates=4)
    passages = [Passage(id=str(i), document_id=str(i), text=t, score=1.0 - i / 10) for i, t in enumerate(
        ["gift boxes ship in two days", "pinot noir aged in oak", "parking is free", "cancel membership online"])]
    got = rr.run(query="is parking free", passages=passages)
    assert len(got) == 3
    assert [p.score for p in got] == sorted((p.score for p in got), reverse=True)
    assert all("rerank" in p.scores and "retrieval" in p.scores for p in got)
    assert passages[0].score == 1.0 and passages[0].scores == {}  # inputs untouched


def test_empty_input_gives_empty_output(adapted):
    out, _, _ = adapted
    assert CrossEncoderReranker(model=str(out)).run(query="q", passages=[]) == []


def test_missing_local_model_says_how_to_build_one(tmp_path):
    rr = CrossEncoderReranker(model=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="ragraph reranker adapt"):
        rr.warm_up()


def test_bad_settings():
    with pytest.raises(ValueError, match="candidates must be >= top_k=10, got 5"):
        CrossEncoderReranker(model="x", top_k=10, candidates=5)


def test_training_needs_pairs(provisioned, tmp_path):
    with pytest.raises(ValueError, match="no training pairs were mined"):
        train_cross_encoder(str(provisioned["embedder"]), [], tmp_path, max_minutes=1)


def test_pair_is_plain_data():
    assert Pair("q", "p", 1.0).label == 1.0


def test_batched_requests_score_like_single_ones(adapted):
    out, _, _ = adapted
    rr = CrossEncoderReranker(model=str(out), top_k=2, candidates=4)
    docs = ["gift boxes ship in two days", "pinot noir aged in oak", "parking is free", "cancel membership online"]
    passages = [Passage(id=str(i), document_id=str(i), text=t, score=0.5) for i, t in enumerate(docs)]
    queries = ["is parking free", "which wine is aged in oak", "how do I cancel"]
    batched = rr.run_batch([(q, passages, None) for q in queries] + [("empty", [], 1)])
    assert batched[-1] == []
    for q, got in zip(queries, batched, strict=False):
        single = rr.run(query=q, passages=passages)
        assert [p.id for p in got] == [p.id for p in single]
        assert [p.score for p in got] == pytest.approx([p.score for p in single], abs=1e-4)
