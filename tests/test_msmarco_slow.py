"""The dev-set targets, end to end through the CLI (slow: embeds 5,000 passages on first run)."""

import json
import subprocess
import sys

import pytest

from conftest import SHARED_DATA

DATA = SHARED_DATA / "msmarco-5k"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data/msmarco-5k")]


def run_eval(pipeline):
    out = subprocess.run([sys.executable, "-m", "cli.main", "eval", str(DATA), "--pipeline", pipeline, "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("pipeline", ["hybrid", "full"])
def test_hybrid_beats_dense_alone(pipeline):
    hybrid, dense = run_eval(pipeline), run_eval("dense")
    assert hybrid["ndcg@10"] >= 0.817, hybrid
    assert hybrid["ndcg@10"] > dense["ndcg@10"]


def test_bm25_at_least_the_reference():
    assert run_eval("bm25")["ndcg@10"] >= run_eval("bm25-reference")["ndcg@10"]
