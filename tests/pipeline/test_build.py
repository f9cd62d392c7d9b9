"""``funnel build`` at scale: memory estimates checked before a step starts, sampled training queries."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.build import MEMORY_ENV, available_memory, format_bytes, parse_bytes
from pipeline.cli import main
from pipeline.errors import ConfigError

CONFIG = """
[pipeline]
name = "tiny-shop"
inputs = { query_id = "string", history = "list<string>" }

[data]
logs = "logs.parquet"

[[stages]]
type = "recall.fused"
[stages.params]
method = "rrf"
k = 40
sources = [
  { name = "assoc", stages = [ { type = "recall.association", params = { index = "artifacts/assoc", k = 30 } } ] },
  { name = "popular", weight = 0.2, stages = [ { type = "recall.popularity", params = { index = "artifacts/pop", k = 10 } } ] },
]

[[stages]]
type = "filter.history"

[[stages]]
type = "features.history"
[stages.params]
association = "artifacts/assoc"
content = ""
popularity = "artifacts/pop"
features = ["assoc_last", "assoc_sum", "pop_count", "history_len"]
copy_columns = ["score", "rank"]

[[stages]]
type = "rank.lightgbm"
params = { model = "artifacts/ranker", holdout_fraction = 0.0, n_estimators = 5, min_data_in_leaf = 5, max_train_queries = MAXQ }
"""


def write_shop(folder, max_train_queries="300", users=400, items=60, seed=0):
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(users):
        start = int(rng.integers(items))
        seqs.append([f"i{(start + j + int(rng.integers(2))) % items}" for j in range(int(rng.integers(3, 8)))])
    pq.write_table(pa.table({"user_id": [f"u{i}" for i in range(users)], "items": seqs}), folder / "logs.parquet")
    (folder / "pipeline.toml").write_text(CONFIG.replace("MAXQ", max_train_queries))
    return folder / "pipeline.toml"


def build(config, monkeypatch, limit=None):
    if limit is None:
        monkeypatch.delenv(MEMORY_ENV, raising=False)
    else:
        monkeypatch.setenv(MEMORY_ENV, limit)
    return CliRunner().invoke(main, ["build", str(config), "--quiet"])


def error_lines(result):
    return [line for line in result.output.splitlines() if line.startswith("funnel: error:")]


def test_a_build_that_cannot_fit_stops_before_it_starts_naming_the_parameter(tmp_path, monkeypatch):
    config = write_shop(tmp_path)
    result = build(config, monkeypatch, limit="1MB")
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result)
    assert "stage 'recall.association'" in line and "lower 'window' (now 20)" in line
    assert "would hold about " in line and f"but only 0 B is left under {MEMORY_ENV}=1MB" in line
    assert not (tmp_path / "artifacts" / "assoc" / "manifest.json").exists()


def test_ranker_training_is_estimated_and_samples_max_train_queries(tmp_path, monkeypatch):
    config = write_shop(tmp_path)
    result = build(config, monkeypatch)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "artifacts" / "ranker" / "manifest.json").read_text())
    assert manifest["train_queries"] == 300                      # 400 users sampled down to max_train_queries
    assert not (tmp_path / "artifacts" / "ranker" / ".training").exists()   # the shards are removed

    write_shop(tmp_path, max_train_queries="200")                # association and popularity stay up to date
    result = build(config, monkeypatch, limit="1MB")
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result)
    assert "stage 'rank.lightgbm'" in line and "200 queries x 40 candidates x 6 features" in line
    assert "lower 'max_train_queries' (now 200)" in line


def test_ranker_trains_on_several_targets_per_user_each_view_with_its_own_artifacts(tmp_path, monkeypatch):
    config = write_shop(tmp_path, max_train_queries="None")
    text = config.read_text().replace("None", "1000")
    config.write_text(text.replace("max_train_queries = 1000", "max_train_queries = 1000, targets_per_user = 1"))
    assert build(config, monkeypatch).exit_code == 0
    one = json.loads((tmp_path / "artifacts" / "ranker" / "manifest.json").read_text())
    config.write_text(text)                                      # targets_per_user = 1 is the default: same model
    result = CliRunner().invoke(main, ["build", str(config)])
    assert "rank.lightgbm: up to date" in result.output, result.output
    config.write_text(text.replace("max_train_queries = 1000", "max_train_queries = 1000, targets_per_user = 3"))
    result = CliRunner().invoke(main, ["build", str(config)])
    assert result.exit_code == 0, result.output
    three = json.loads((tmp_path / "artifacts" / "ranker" / "manifest.json").read_text())
    assert one["views"] == 1 and three["views"] == 3
    assert three["train_queries"] > 2 * one["train_queries"] and three["train_rows"] > 2 * one["train_rows"]
    for view in ("upstream", "upstream-2", "upstream-3"):
        assert (tmp_path / "artifacts" / "ranker" / view / "artifacts" / "assoc" / "manifest.json").exists()
    assert "view 3: targets 2 step(s) before the last" in result.output
    # sampled negatives: every training query keeps its target and at most 3 other candidates
    config.write_text(text.replace("max_train_queries = 1000", "max_train_queries = 1000, targets_per_user = 3, max_negatives = 3"))
    result = CliRunner().invoke(main, ["build", str(config)])
    assert result.exit_code == 0 and "rank.lightgbm: trained" in result.output, result.output
    sampled = json.loads((tmp_path / "artifacts" / "ranker" / "manifest.json").read_text())
    assert sampled["train_queries"] == three["train_queries"] and sampled["train_rows"] <= 4 * sampled["train_queries"]
    assert sampled["train_rows"] < three["train_rows"]


def test_memory_figures():
    assert parse_bytes("8GB") == 8 << 30 and parse_bytes("1.5g") == 3 << 29 and parse_bytes("512 MiB") == 512 << 20
    assert parse_bytes("100") == 100
    assert format_bytes(3 << 29) == "1.5 GB" and format_bytes(10) == "10 B"
    assert available_memory() > 0
    with pytest.raises(ConfigError, match=f"{MEMORY_ENV}='lots' is not a size"):
        parse_bytes("lots")
