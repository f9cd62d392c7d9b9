"""The command line contract: demo, build, run, eval, errors as one line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_build_is_idempotent_and_run_writes_ranked_candidates(demo_shop, tmp_path):
    config = demo_shop / "pipeline.toml"
    result = invoke("build", config, "--quiet")
    assert result.exit_code == 0 and result.output.count("up to date") == 3, result.output
    queries = demo_shop / "data" / "queries.parquet"
    out = tmp_path / "out.parquet"
    result = invoke("run", config, "--queries", queries, "--out", out, "--top", 5, "--quiet")
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    n_queries = pq.read_metadata(queries).num_rows
    assert table.column("rank").to_pylist().count(1) == n_queries
    assert max(table.column("rank").to_pylist()) == 5
    assert "recall.faiss" in result.output


def test_run_into_a_folder_and_eval(demo_shop, tmp_path):
    config = demo_shop / "pipeline.toml"
    ranker = demo_shop / "artifacts" / "ranker"
    result = invoke("run", config, "--queries", ranker / "holdout_queries.parquet", "--out", tmp_path / "shards", "--quiet")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "shards" / "part-00000.parquet").exists()
    result = invoke("eval", "--run", tmp_path / "shards", "--judgments", ranker / "holdout_judgments.parquet",
                    "--k", 10, "--json", tmp_path / "m.json")
    assert result.exit_code == 0, result.output
    assert "ndcg@10" in result.output and (tmp_path / "m.json").exists()


@pytest.mark.parametrize("make_input, expected", [
    (lambda p: pq.write_table(pa.table({"query_id": [1]}), p), "needs column 'query'"),
    (lambda p: p.write_bytes(b"not parquet at all"), "not readable as Parquet"),
    (lambda p: None, "does not exist"),
])
def test_bad_queries_give_one_line_error_and_no_output(demo_shop, tmp_path, make_input, expected):
    queries = tmp_path / "q.parquet"
    make_input(queries)
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(main, ["run", str(demo_shop / "pipeline.toml"), "--queries", str(queries),
                                       "--out", str(out), "--quiet"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("funnel: error:") and expected in lines[-1], result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_unknown_stage_in_config_is_one_line(tmp_path):
    config = tmp_path / "p.toml"
    config.write_text('[[stages]]\ntype = "rank.xgboost"\n')
    result = CliRunner().invoke(main, ["config", "check", str(config)])
    assert result.exit_code == 2 and "unknown stage type 'rank.xgboost'; known types:" in result.output


def test_stages_list_shows_builtins():
    result = invoke("stages", "list")
    for key in ("encode.sentence_transformers", "recall.faiss", "filter.rules", "rank.lightgbm", "display.topn"):
        assert key in result.output


def test_every_command_has_help():
    for cmd in ([], ["demo"], ["build"], ["run"], ["eval"], ["train", "ranker"], ["stages", "list"], ["config", "check"]):
        result = invoke(*cmd, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output


def funnel(*args, cwd=None):
    """``funnel ARGS`` in a subprocess, as a user types it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def test_every_command_in_the_readme_exists():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme[readme.index("## Command line"):].split("\n\n")[1]
    commands = re.findall(r"^\| `funnel ([a-z ]+?)(?: [A-Z-].*?)?`", table, flags=re.M)
    assert {"demo", "build", "train ranker", "train encoder", "run", "eval", "validate", "bench", "stages list",
            "stages show", "config check"} <= set(commands)
    for command in set(commands):
        result = funnel(*command.split(), "--help")
        assert result.returncode == 0 and "Usage: " in result.stdout, (command, result.stderr)


@pytest.mark.slow
def test_the_demo_ranker_adds_recall(tmp_path):
    """The README's first command: the per-stage table shows the ranker lifting R@10 clearly, with
    scores that tell the shown items apart, and the last R@10 is the recall@10 eval reports."""
    result = funnel("demo", "--workdir", tmp_path / "d", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {m[0]: [float(v) for v in m[1:]] for m in
            re.findall(r"^\d+\s+([a-z_.]+)\s+\d+\s+\d+\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s+([\d.]+)$", result.stdout, re.M)}
    before, after = rows["features.text"][1], rows["rank.lightgbm"][1]
    assert after >= before + 0.1, result.stdout
    assert f"recall@10 {rows['display.topn'][1]:.3f}" in result.stdout and "ndcg@10" in result.stdout
    assert {"query_id", "item_id", "rank", "score", "source"} <= set(
        pq.read_schema(tmp_path / "d" / "out" / "candidates.parquet").names)
    shown = pq.read_table(tmp_path / "d" / "out" / "candidates.parquet", columns=["query_id", "score"]).to_pandas()
    assert np.mean(shown.groupby("query_id")["score"].nunique()) >= 8  # not ties in blocks


def test_rows_that_cannot_be_processed_are_quarantined_not_dropped(demo_shop, tmp_path):
    queries = tmp_path / "q.parquet"
    pq.write_table(pa.table({"query_id": [1, 2, 3], "query": ["cordless drill", None, "   "]}), queries)
    out = tmp_path / "out.parquet"
    result = invoke("run", demo_shop / "pipeline.toml", "--queries", queries, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "quarantined 2 row(s)" in result.output
    bad = pq.read_table(tmp_path / "out.quarantine.parquet").to_pylist()
    assert [(r["query_id"], r["stage"]) for r in bad] == [("2", "encode.sentence_transformers"),
                                                          ("3", "encode.sentence_transformers")]
    assert set(pq.read_table(out).column("query_id").to_pylist()) == {1}
    strict = CliRunner().invoke(main, ["run", str(demo_shop / "pipeline.toml"), "--queries", str(queries),
                                       "--out", str(tmp_path / "strict.parquet"), "--strict", "--quiet"])
    assert strict.exit_code == 2 and "null text value" in strict.output
    assert not (tmp_path / "strict.parquet").exists()


@pytest.mark.parametrize("preset, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_wait_passively_unless_the_user_says_otherwise(monkeypatch, preset, expected):
    import os

    if preset is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", preset)
    assert invoke("stages", "list").exit_code == 0
    assert os.environ["OMP_WAIT_POLICY"] == expected
