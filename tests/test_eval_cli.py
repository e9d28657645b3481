"""`ragraph eval` on a small BEIR folder made here: one JSON object on the last line of stdout."""

import json
import subprocess
import sys

import pytest

from conftest import CORPUS
from indexing.evaluate import DatasetError, load_beir

KEYS = {"ndcg@10", "recall@100", "mrr@10", "queries", "ms_per_query"}


@pytest.fixture(scope="module")
def beir(tmp_path_factory):
    d = tmp_path_factory.mktemp("beir")
    (d / "qrels").mkdir()
    with (d / "corpus.jsonl").open("w") as f:
        for i, (rel, text) in enumerate(CORPUS.items()):
            f.write(json.dumps({"_id": f"d{i}", "title": rel, "text": text.split("\n\n", 1)[1]}) + "\n")
    (d / "queries.jsonl").write_text(
        '{"_id": "q1", "text": "When is the tasting room open?"}\n'
        '{"_id": "q2", "text": "refund for a damaged bottle"}\n'
        '{"_id": "q3", "text": "unjudged query"}\n'
    )
    (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td3\t2\nq2\td5\t1\n")
    return d


def run_eval(beir, tmp_path, pipeline):
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "eval", str(beir), "--pipeline", pipeline, "--json", "--cache-dir", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("pipeline", ["bm25", "bm25-reference", "dense", "hybrid", "full"])
def test_eval_prints_metrics_json(beir, tmp_path_factory, pipeline):
    result = run_eval(beir, tmp_path_factory.getbasetemp() / "evalcache", pipeline)
    assert KEYS <= set(result)
    assert result["queries"] == 2 and result["pipeline"] == pipeline
    assert result["ndcg@10"] == 1.0, result  # both answers are unmistakable in this corpus
    assert result["ms_per_query"] > 0


def test_second_eval_reuses_the_cached_index(beir, tmp_path):
    first = run_eval(beir, tmp_path, "bm25")
    second = run_eval(beir, tmp_path, "dense")
    assert first["index_version"] == second["index_version"]


def test_missing_qrels_is_named(tmp_path):
    (tmp_path / "corpus.jsonl").write_text("")
    (tmp_path / "queries.jsonl").write_text("")
    with pytest.raises(DatasetError, match=r"qrels/test.tsv: missing"):
        load_beir(tmp_path)


def test_bad_grade_is_named(beir, tmp_path):
    import shutil

    shutil.copytree(beir, tmp_path / "b")
    (tmp_path / "b" / "qrels" / "test.tsv").write_text("q1\td3\thigh\n")
    with pytest.raises(DatasetError, match=r"test.tsv:1: grade 'high' is not an integer"):
        load_beir(tmp_path / "b")
