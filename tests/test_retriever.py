"""The hybrid retriever over a real index of a few real sentences."""

import pytest

from deployments.retriever import Filters, HybridRetriever
from indexing.embedding import Embedder


@pytest.fixture(scope="module")
def retriever(built_index, local_cfg):
    _, root = built_index
    r = HybridRetriever.from_config(local_cfg, index_dir=root)
    r.warm_up()
    return r


@pytest.mark.parametrize("strategy", ["hybrid", "lexical", "semantic"])
@pytest.mark.parametrize(
    "query, best",
    [
        ("When is the tasting room open?", "visiting/hours.md"),
        ("pinot noir cabernet", "wine/reds.md"),
        ("how do I get my money back for a broken bottle", "merchandise/returns.md"),
    ],
)
def test_obvious_match_first(retriever, strategy, query, best):
    if strategy == "lexical" and "money back" in query:
        pytest.skip("no shared words: a lexical retriever cannot be expected to find it")
    assert retriever.run(query=query, strategy=strategy)[0].document_id == best


def test_hybrid_passages_carry_both_scores_and_metadata(retriever):
    [p] = retriever.run(query="corkscrew decanter gift box", top_k=1)
    assert p.document_id == "merchandise/shop.md" and p.domain == "merchandise"
    assert p.heading_path == "Shop" and p.title == "Shop"
    assert set(p.scores) == {"dense", "bm25"} and p.scores["bm25"] > 0
    assert p.score is not None and p.score > 0


def test_domain_filter(retriever):
    got = retriever.run(query="wine shipments", top_k=5, filters=Filters(domains=("club",)))
    assert got and {p.domain for p in got} == {"club"}


def test_date_filter_excludes_everything_in_the_future(retriever):
    assert retriever.run(query="wine", filters=Filters(updated_after="2999-01-01")) == []
    assert retriever.run(query="wine", filters=Filters(updated_before="2999-01-01"))


def test_top_k_is_respected_and_checked(retriever):
    assert len(retriever.run(query="wine", top_k=2)) == 2
    with pytest.raises(ValueError, match="top_k must be > 0, got 0"):
        retriever.run(query="wine", top_k=0)


def test_empty_query_gives_nothing(retriever):
    assert retriever.run(query="   ") == []


def test_unknown_strategy_lists_the_known(retriever):
    with pytest.raises(ValueError, match=r"strategy must be one of \['hybrid', 'lexical', 'semantic'\], got 'fuzzy'"):
        retriever.run(query="wine", strategy="fuzzy")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"top_k": 0}, "top_k must be > 0, got 0"),
        ({"top_k": 10, "candidates": 5}, "candidates must be >= top_k=10, got 5"),
        ({"dense_weight": 1.5}, r"dense_weight must be in \[0, 1\] or 'auto', got 1.5"),
        ({"normalization": "rank"}, r"normalization must be one of \['max', 'z'\], got 'rank'"),
    ],
)
def test_bad_settings_fail_at_construction(tmp_path, kw, msg):
    with pytest.raises(ValueError, match=msg):
        HybridRetriever(index_dir=tmp_path, embedder=Embedder(model="unused"), **kw)


def test_bad_filter_date_is_named():
    with pytest.raises(ValueError, match=r"filters.updated_after must be an ISO 8601 date, got 'yesterday'"):
        Filters(updated_after="yesterday")
