"""The hybrid's per-corpus calibration: where one retriever carries no signal, the fusion must
follow the other one (a noise embedder must not pull BM25's ranking down, and the reverse)."""

import hashlib
import random
import re

import numpy as np
import pytest

from deployments.retriever import HybridRetriever
from indexing.calibrate import choose, normalize, pseudo_queries
from indexing.store import BuildSettings, build_index

DIM = 32
SETTINGS = BuildSettings(model="fake", model_checksum="", embedder_dtype="float32", chunk_size=200,
                         chunk_overlap=20, bm25_k1=1.2, bm25_b=0.75, stemmer="english",
                         ann_threshold=100000, hnsw_m=16)


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def _seeded(text: str) -> np.ndarray:
    return np.random.default_rng(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)).standard_normal(DIM)


class FakeEmbedder:
    """``vector(text)``: anything deterministic; the retriever only needs dim, embed, warm_up."""

    model = "fake"
    dim = DIM

    def __init__(self, vector) -> None:
        self.vector = vector

    def warm_up(self) -> None:
        pass

    def embed(self, texts):
        return np.stack([self.vector(t) for t in texts]) if texts else np.zeros((0, DIM), np.float32)


def _build(tmp_path, docs: dict[str, str], embedder: FakeEmbedder) -> HybridRetriever:
    src = tmp_path / "src"
    for name, text in docs.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    build_index(src, tmp_path / "index", SETTINGS, embed=lambda t: (embedder.embed(t), "fake"), log=lambda _: None)
    r = HybridRetriever(index_dir=tmp_path / "index", embedder=embedder)
    r.warm_up()
    return r


# --- a corpus BM25 can search, with an embedder that carries no signal ---------------------------

ANIMALS = "otter falcon badger heron lynx marten osprey bison ibex walrus gecko toucan".split()
PLACES = "harbour glacier canyon marsh orchard quarry delta plateau lagoon meadow".split()
FOODS = "clams beetles acorns minnows berries mushrooms seeds crayfish".split()
CITIES = "Lisbon Oslo Quito Hanoi Dakar Perth Lima Turin Bergen Split".split()


def _lexical_corpus() -> dict[str, str]:
    rnd = random.Random(7)
    docs = {}
    for i in range(60):
        a, p, f, c = rnd.choice(ANIMALS), rnd.choice(PLACES), rnd.choice(FOODS), rnd.choice(CITIES)
        docs[f"d{i:02d}.txt"] = (f"The {a} lives near the {p} of {c}. It feeds on {f} and small {rnd.choice(FOODS)}. "
                                 f"Researchers from {rnd.choice(CITIES)} counted {i + 3} animals near the {p}.")
    return docs


def test_noise_embedder_gets_no_weight_and_hybrid_follows_bm25(tmp_path):
    r = _build(tmp_path, _lexical_corpus(), FakeEmbedder(lambda t: _unit(_seeded(t))))
    assert r.fusion["dense_weight"] <= 0.1, r.index.manifest["calibration"]
    assert r.fusion["feedback"] is False  # one side is noise: its top passages are no evidence
    for q in ["otter harbour clams", "badger canyon Lisbon", "heron marsh minnows Quito", "lynx plateau berries"]:
        lexical = [round(p.score, 4) for p in r.run(query=q, top_k=8, strategy="lexical")]
        hybrid = [round(p.scores["bm25"], 4) for p in r.run(query=q, top_k=8)]
        assert hybrid == lexical, (q, hybrid, lexical)  # BM25's order (rows tied on BM25 may swap)


def test_a_fixed_weight_still_overrides_the_calibration(tmp_path):
    r = _build(tmp_path, _lexical_corpus(), FakeEmbedder(lambda t: _unit(_seeded(t))))
    fixed = HybridRetriever(index_dir=r.index_dir, embedder=r.embedder, dense_weight=0.75)
    assert fixed.fusion["dense_weight"] == 0.75


# --- a corpus where words never repeat across sentences, with an embedder that knows the topics --

TOPICS = 40
TOPIC_VECS = np.random.default_rng(3).standard_normal((TOPICS, DIM))
SYN = re.compile(r"topic(\d+)v\d+")


def _topic_vector(text: str) -> np.ndarray:
    ks = [int(k) for k in SYN.findall(text)]
    return _unit(TOPIC_VECS[ks].sum(axis=0) + 0.05 * _seeded(text)) if ks else _unit(_seeded(text))


def _semantic_corpus() -> dict[str, str]:
    """Each document: sentences naming its topic through a different synonym each time, among
    filler words shared by every document, so BM25 has nothing to go by."""
    filler = "report notes figure value record entry sample study".split()
    rnd = random.Random(11)
    docs = {}
    for k in range(TOPICS):
        sents = [f"topic{k}v{j} " + " ".join(rnd.sample(filler, 4)) + "." for j in range(3)]
        docs[f"t{k:02d}.txt"] = " ".join(sents)
    return docs


def test_bm25_without_signal_gets_no_weight_and_hybrid_follows_dense(tmp_path):
    r = _build(tmp_path, _semantic_corpus(), FakeEmbedder(_topic_vector))
    assert r.fusion["dense_weight"] >= 0.9, r.index.manifest["calibration"]
    assert r.fusion["feedback"] is False
    for k in range(0, TOPICS, 3):
        q = f"topic{k}v9 figure value"  # a synonym no document uses, and two filler words
        assert r.run(query=q, top_k=1)[0].document_id == f"t{k:02d}.txt"
        assert [p.id for p in r.run(query=q, top_k=3)][0] == r.run(query=q, top_k=1, strategy="semantic")[0].id


# --- the parts --------------------------------------------------------------------------------------

def test_pseudo_queries_leave_the_sentence_out_of_its_context():
    texts = ["One two three four. Five six seven eight. Nine ten eleven twelve.", "Too short."]
    [(row, q, ctx)] = pseudo_queries(texts, ["Title", ""], samples=5)
    assert row == 0 and q in texts[0] and q not in ctx and ctx.startswith("Title\n")


def test_choose_picks_the_smoothed_best_weight_and_the_balance():
    cal = {"version": 1, "weights": [0, 0.5, 1.0], "bm25_mrr": 0.4, "dense_mrr": 0.1,
           "fused_mrr": {"z": [0.4, 0.3, 0.1], "max": [0.4, 0.3, 0.1]}}
    assert choose(cal, "z") == (0.0, 0.25)
    assert choose({"version": 1, "queries": 3}, "z") is None  # too few pseudo-queries: no calibration


def test_normalize():
    x = np.array([1.0, 2.0, 3.0])
    assert normalize(x, "max").tolist() == pytest.approx([1 / 3, 2 / 3, 1])
    assert normalize(x, "z").mean() == pytest.approx(0) and normalize(x, "z").std() == pytest.approx(1)
    assert normalize(np.ones(3), "z").tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="normalization must be one of"):
        normalize(x, "rank")


def test_calibration_embeds_through_its_own_callable(tmp_path):
    """The index job's per-node counts (``embed_nodes``) come from what ``embed`` did: the
    calibration's pseudo-queries and passages go through ``calibration_embed`` so that they are
    not counted as chunks (a two-node job had reported 400 chunks by node for 697 embedded)."""
    src = tmp_path / "src"
    src.mkdir()
    for name, text in _lexical_corpus().items():
        (src / name).write_text(text)
    embedder = FakeEmbedder(lambda t: _unit(_seeded(t)))
    seen = {"chunks": 0, "calibration": 0}

    def counting(kind):
        def embed(texts):
            seen[kind] += len(texts)
            return embedder.embed(texts), "fake"
        return embed

    report = build_index(src, tmp_path / "index", SETTINGS, embed=counting("chunks"),
                         calibration_embed=counting("calibration"), log=lambda _: None)
    assert report.embedded > 0 and seen["chunks"] == report.embedded
    assert seen["calibration"] > 0
