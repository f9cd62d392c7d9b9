"""`funnel eval --run` as a user types it: the label scale, the queries a run covers, bad labels."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# four judged queries, two relevant items each (item 10q+1 and 10q+2); the run covers q1 and q2 only,
# finding both relevant items of q1 at ranks 1-2 and one of q2's at rank 1
JUDGED = [(q, 10 * q + d, rel) for q in (1, 2, 3, 4) for d, rel in ((1, 1), (2, 1), (3, 0))]
RUN = [(1, 11, 0.9), (1, 12, 0.8), (1, 13, 0.7), (2, 21, 0.9), (2, 23, 0.8), (2, 99, 0.7)]


def funnel(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def files(tmp_path):
    def write(labels=None):
        rel = labels if labels is not None else [r for _, _, r in JUDGED]
        pq.write_table(pa.table({"query_id": [q for q, _, _ in JUDGED], "item_id": [d for _, d, _ in JUDGED],
                                 "relevance": rel}), tmp_path / "judgments.parquet")
        pq.write_table(pa.table({"query_id": [q for q, _, _ in RUN], "item_id": [d for _, d, _ in RUN],
                                 "score": [s for _, _, s in RUN]}), tmp_path / "run.parquet")
        return tmp_path
    return write


def test_binary_labels_and_a_partial_run_are_evaluated_and_said(files):
    folder = files()
    result = funnel("eval", "--run", "run.parquet", "-j", "judgments.parquet", "--k", 2, "--json", "m.json",
                    cwd=folder)
    assert result.returncode == 0, result.stderr
    assert "binary 0/1 labels: gain = relevance, relevant at >= 1" in result.stdout
    assert "the run covers 2 of the 4 judged queries; metrics over those 2 (--all-judged" in result.stdout
    metrics = json.loads((folder / "m.json").read_text())
    assert metrics["recall@2"] == pytest.approx((1 + 0.5) / 2)  # q1 and q2, not diluted by q3, q4
    assert metrics["queries_relevant"] == 2 and metrics["queries_judged"] == 4 and metrics["queries_in_run"] == 2

    result = funnel("eval", "--run", "run.parquet", "-j", "judgments.parquet", "--k", 2, "--all-judged",
                    "--json", "all.json", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert "metrics over all 4 judged queries" in result.stdout
    assert json.loads((folder / "all.json").read_text())["recall@2"] == pytest.approx((1 + 0.5) / 4)


def test_text_labels_are_one_clear_line(files):
    folder = files(["high", "high", "low"] * 4)
    result = funnel("eval", "--run", "run.parquet", "-j", "judgments.parquet", cwd=folder)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "funnel: error: eval: column 'relevance' of the judgments file judgments.parquet must hold numbers "
        "(0/1, or grades such as 1-3); found text such as 'high', 'low'"]


def test_an_unknown_scale_asks_for_the_options_and_runs_with_them(files):
    folder = files([5, 4, 1] * 4)  # 1-5 stars
    result = funnel("eval", "--run", "run.parquet", "-j", "judgments.parquet", cwd=folder)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "runs from 1 to 5" in result.stderr and "--gain-offset and --relevant-threshold" in result.stderr
    result = funnel("eval", "--run", "run.parquet", "-j", "judgments.parquet", "--k", 2, "--gain-offset", 1,
                    "--relevant-threshold", 4, cwd=folder)
    assert result.returncode == 0, result.stderr
    assert "given labels: gain = relevance - 1, relevant at >= 4" in result.stdout
    # a threshold nothing reaches is refused rather than printed as NaN
    result = funnel("eval", "--run", "run.parquet", "-j", "judgments.parquet", "--gain-offset", 5,
                    "--relevant-threshold", 6, cwd=folder)
    assert result.returncode == 2 and "every metric would be NaN" in result.stderr
