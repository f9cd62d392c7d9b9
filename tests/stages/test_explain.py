"""Ranker explanations (``explain``): TreeSHAP contributions that add up to each item's score."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline import ConfigError
from pipeline.cli import main
from pipeline.testing import CHECKS, StageCase
from stages.lightgbm import EXPLANATION, REST, LightGBMRanker


def _ranker(demo_pipeline, **params):
    step = next(i for i, s in enumerate(demo_pipeline.stages) if isinstance(s, LightGBMRanker))
    return step, demo_pipeline.stages[step].clone(**params)


def test_all_contributions_plus_bias_equal_the_raw_score(demo_pipeline, stage_inputs):
    step, ranker = _ranker(demo_pipeline, explain=100)
    out = ranker(stage_inputs[step])
    n_features = len(ranker.features_)
    for row in out.to_pylist():
        entries = row[EXPLANATION]
        assert len(entries) == n_features + 1 and entries[-1]["feature"] == REST
        assert sum(e["contribution"] for e in entries) == pytest.approx(row["score"], abs=1e-4)
    bias = ranker.booster_.predict(ranker.feature_matrix(stage_inputs[step]), pred_contrib=True)[:, -1]
    assert {round(e[-1]["contribution"], 4) for e in out.column(EXPLANATION).to_pylist()} == set(np.round(bias, 4))


def test_top_contributions_are_the_largest_and_the_rest_keeps_the_sum(demo_pipeline, stage_inputs):
    step, ranker = _ranker(demo_pipeline, explain=2)
    out = ranker(stage_inputs[step])
    plain = demo_pipeline.stages[step](stage_inputs[step])
    assert out.column("score").to_pylist() == plain.column("score").to_pylist()
    assert EXPLANATION not in plain.column_names
    for row in out.to_pylist():
        shown, rest = row[EXPLANATION][:2], row[EXPLANATION][2]
        assert len(row[EXPLANATION]) == 3 and rest["feature"] == REST
        assert abs(shown[0]["contribution"]) >= abs(shown[1]["contribution"])
        assert all(e["feature"].startswith("f_") for e in shown)
        assert shown[0]["contribution"] + shown[1]["contribution"] + rest["contribution"] == pytest.approx(row["score"], abs=1e-4)


def test_explain_must_be_a_non_negative_int():
    with pytest.raises(ConfigError, match="'explain' parameter"):
        LightGBMRanker(explain=-1).validate_params()


@pytest.mark.parametrize("check", [c for c in CHECKS if c != "cpu_gpu_parity"])
def test_explaining_ranker_conforms(demo_pipeline, stage_inputs, check):
    step, ranker = _ranker(demo_pipeline, explain=3)
    CHECKS[check](StageCase(ranker, stage_inputs[step]))


def test_run_explain_flag_adds_the_column_to_the_shown_rows(demo_shop, tmp_path):
    out = tmp_path / "out.parquet"
    args = ["run", demo_shop / "pipeline.toml", "--queries", demo_shop / "artifacts" / "ranker" / "holdout_queries.parquet", "--out", out,
            "--top", 3, "--explain", 4, "--quiet"]
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert max(table.column("rank").to_pylist()) == 3
    assert all(len(e) == 5 for e in table.column(EXPLANATION).to_pylist())
