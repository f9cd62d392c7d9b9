"""The LightGBM ranker: training through the pipeline, feature checks, safe loading."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest

from pipeline import ArtifactError, ConfigError, DataError, SchemaError
from pipeline.config import load_config
from pipeline.stage import Pipeline

from stages.features import TextMatchFeatures
from stages.lightgbm import LABEL, LightGBMRanker, _group_sizes, rerank


def test_trained_model_is_lightgbm_text_with_manifest(demo_shop):
    folder = demo_shop / "artifacts" / "ranker"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (folder / "model.txt").read_text().startswith("tree")
    assert manifest["features"][0].startswith("f_") and manifest["best_iteration"] >= 1
    assert manifest["holdout_queries"] > 0 and (folder / "holdout_queries.parquet").exists()


def test_ranker_reorders_and_keeps_recall_provenance(demo_pipeline, stage_inputs):
    step = [s.name for s in demo_pipeline].index("rank.lightgbm")
    out = demo_pipeline.stages[step](stage_inputs[step])
    assert {"recall_score", "recall_rank", "score", "rank"} <= set(out.column_names)
    for q in set(out.column("query_id").to_pylist()):
        rows = [r for r in out.to_pylist() if r["query_id"] == q]
        assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
        assert all(a["score"] >= b["score"] for a, b in zip(rows, rows[1:]))


def test_features_the_model_was_trained_on_are_checked_at_composition(demo_shop):
    pipe = load_config(demo_shop / "pipeline.toml").build()
    step = [s.name for s in pipe].index("rank.lightgbm")
    stages = list(pipe.stages)
    stages[step - 1] = TextMatchFeatures(features=["overlap"])
    with pytest.raises(SchemaError, match="rank.lightgbm.*f_recall_score"):
        Pipeline(stages, inputs=pipe.inputs)


def test_corrupted_model_fails_with_a_clear_message(demo_shop, tmp_path):
    folder = tmp_path / "ranker"
    shutil.copytree(demo_shop / "artifacts" / "ranker", folder)
    with open(folder / "model.txt", "r+") as f:
        f.seek(200)
        f.write("garbage")
    ranker = LightGBMRanker(model=str(folder))
    with pytest.raises(ArtifactError, match="corrupted or was changed"):
        ranker.warm_up()


def test_missing_model_says_to_build(tmp_path):
    with pytest.raises(ArtifactError, match="funnel build"):
        LightGBMRanker(model=str(tmp_path / "none")).warm_up()


def test_rerank_and_group_sizes():
    import polars as pl

    table = pa.table({"query_id": ["b", "b", "a", "a", "a"], "item_id": [1, 2, 3, 4, 5],
                      "score": pa.array([0.1] * 5, pa.float32()), "rank": pa.array([1, 2, 1, 2, 3], pa.int32())})
    out = rerank(table, np.array([0.2, 0.9, 0.5, 0.1, 0.7]))
    assert out.column("query_id").to_pylist() == ["b", "b", "a", "a", "a"]
    assert out.column("item_id").to_pylist() == [2, 1, 5, 3, 4]
    assert out.column("recall_rank").to_pylist() == [2, 1, 3, 1, 2]
    assert _group_sizes(pl.Series(["b", "b", "a", "a", "a"])).tolist() == [2, 3]


@pytest.mark.parametrize("dictionary", [False, True])
@pytest.mark.parametrize("contiguous", [True, False])
def test_rerank_numpy_runs_match_the_general_order(contiguous, dictionary):
    """Contiguous queries take a NumPy path; it must give the order and ranks (ties in input order)
    of the general one, which split queries still take."""
    import polars as pl
    from stages.lightgbm import _query_runs

    rng = np.random.default_rng(0)
    ids = np.repeat(rng.permutation(40), rng.integers(1, 30, 40)).astype(str)
    if not contiguous:
        ids = rng.permutation(ids)
    n = len(ids)
    values = np.array([-2.5, -0.0, 0.0, 0.0, 1.5, 3.0, np.inf, -np.inf], np.float32)
    scores = values[rng.integers(0, len(values), n)]  # many ties, signed zeros, infinities
    table = pa.table({"query_id": pa.array(ids).dictionary_encode() if dictionary else ids, "item_id": np.arange(n),
                      "score": pa.array(np.zeros(n), pa.float32()),
                      "rank": pa.array(np.ones(n), pa.int32())})
    assert (_query_runs(table.column("query_id")) is not None) == contiguous
    out = rerank(table, scores)
    expect = (pl.DataFrame({"q": ids, "s": scores}).with_row_index("row")
              .with_columns(pl.col("row").min().over("q").alias("first"),
                            pl.col("s").rank("ordinal", descending=True).over("q").alias("rank"))
              .sort(["first", "rank"]))
    assert out.column("item_id").to_pylist() == expect["row"].to_list()
    assert out.column("rank").to_pylist() == expect["rank"].to_list()
    assert out.column("recall_score").to_pylist() == [0.0] * n


def test_bad_training_params_fail_at_composition():
    with pytest.raises(Exception, match="'holdout_fraction' parameter of stage 'rank.lightgbm'"):
        LightGBMRanker(holdout_fraction=1.5).validate_params()
    with pytest.raises(Exception, match="'truncation_level' parameter of stage 'rank.lightgbm'"):
        LightGBMRanker(truncation_level=0).validate_params()
    with pytest.raises(Exception, match="'max_negatives' parameter of stage 'rank.lightgbm'"):
        LightGBMRanker(max_negatives=0).validate_params()


def test_truncation_level_reaches_lightgbm(demo_shop):
    model = (demo_shop / "artifacts" / "ranker" / "model.txt").read_text()
    assert "[lambdarank_truncation_level: 30]" in model  # the default, passed on explicitly


def test_training_queries_are_sampled_by_a_stable_hash():
    from stages.lightgbm import sample_queries

    queries = pa.table({"query_id": [f"u{i}" for i in range(1000)], "history": [["a"]] * 1000})
    sample = sample_queries(queries, 250, seed=0)
    assert sample.num_rows == 250
    ids = sample.column("query_id").to_pylist()
    assert ids == sorted(ids, key=lambda q: int(q[1:]))                     # kept in their order
    reversed_input = queries.take(pa.array(np.arange(999, -1, -1)))
    assert set(sample_queries(reversed_input, 250, seed=0).column("query_id").to_pylist()) == set(ids)
    assert set(sample_queries(queries, 250, seed=1).column("query_id").to_pylist()) != set(ids)
    assert sample_queries(queries, None, seed=0) is queries and sample_queries(queries, 5000, seed=0) is queries
    with pytest.raises(Exception, match="max_train_queries"):
        LightGBMRanker(max_train_queries=0).validate_params()


@pytest.mark.parametrize("max_train_queries, queries", [(None, 6), (2, 5)])
def test_memory_estimate_counts_the_users_each_training_view_can_use(tmp_path, monkeypatch, max_train_queries, queries):
    from types import SimpleNamespace

    import pyarrow.parquet as pq

    from pipeline.build import MEMORY_ENV
    from pipeline.errors import ConfigError

    # view 1 needs 2 items (3 users), view 2 needs 3 (2 users), view 3 needs 4 (1 user)
    pq.write_table(pa.table({"user_id": ["a", "b", "c", "d"], "items": [["x", "y"], ["x", "y", "z"], ["x", "y", "z", "w"], ["x"]]}),
                   tmp_path / "logs.parquet")
    monkeypatch.setenv(MEMORY_ENV, "1KB")
    stage = LightGBMRanker(targets_per_user=3, max_train_queries=max_train_queries)
    with pytest.raises(ConfigError, match=f"training on up to {queries} queries x 10 candidates x 2 features"):
        stage._check_memory(SimpleNamespace(stages=[SimpleNamespace(k=10)]), tmp_path / "logs.parquet", ["f_a", "f_b"], views=3)


def test_sampled_negatives_keep_every_positive_and_the_query_order():
    rng = np.random.default_rng(0)
    qids = np.repeat(["q3", "q1", "q2"], [50, 3, 20])
    labels = np.zeros(len(qids), np.int32)
    labels[[0, 7, 49, 51, 60]] = [1, 2, 1, 1, 3]
    rows = pa.table({"query_id": qids, LABEL: labels, "f_a": rng.random(len(qids)).astype(np.float32)})
    out = LightGBMRanker(max_negatives=5)._sample_negatives(rows, np.random.default_rng(1))
    got = out.to_pandas().rename(columns={LABEL: "label"})
    assert list(dict.fromkeys(got["query_id"])) == ["q3", "q1", "q2"]                    # groups stay contiguous, in order
    assert (got.groupby("query_id", sort=False)["label"].apply(lambda x: (x == 0).sum()).to_dict()
            == {"q3": 5, "q1": 2, "q2": 5})                                              # q1 has only 2 negatives
    assert got["label"].sum() == labels.sum()                                           # every positive kept
    assert set(got["f_a"]) <= set(rows.column("f_a").to_pylist())
    assert np.all(np.diff([list(rows.column("f_a").to_pylist()).index(v) for v in got["f_a"]]) > 0)  # row order kept
    again = LightGBMRanker(max_negatives=5)._sample_negatives(rows, np.random.default_rng(1))
    assert again.equals(out)
    assert LightGBMRanker()._sample_negatives(rows, np.random.default_rng(1)) is rows


def test_memory_estimate_counts_sampled_negatives(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import pyarrow.parquet as pq

    import stages.lightgbm as module

    pq.write_table(pa.table({"query_id": [f"q{i}" for i in range(100)], "item_id": ["x"] * 100}), tmp_path / "j.parquet")
    seen = []
    monkeypatch.setattr(module, "check_fits", lambda stage, what, estimate, *a: seen.append(estimate))
    upstream = SimpleNamespace(stages=[SimpleNamespace(k=400)])
    for negatives in (None, 9):
        LightGBMRanker(max_negatives=negatives, valid_fraction=0.2)._check_memory(upstream, tmp_path / "j.parquet", ["f_a"])
    per_row = module.BYTES_PER_VALUE + module.BYTES_PER_ROW
    assert seen == [100 * 400 * per_row, (80 * 10 + 20 * 400) * per_row]  # validation queries (20%) keep all


def _lexical_ranker_config(folder, **ranker):
    from pipeline import PipelineConfig
    from pipeline.config import load_config
    from pipeline.demo_data import generate_demo_data

    generate_demo_data(folder / "data", n_items=300, n_queries=90, seed=3)
    cfg = PipelineConfig(stages=[
        {"type": "recall.bm25", "params": {"index": "artifacts/bm25", "k": 30, "item_text": ["title"]}},
        {"type": "lookup.catalog", "params": {"items": "artifacts/items", "columns": ["title"]}},
        {"type": "features.text", "params": {"features": ["recall_score", "coverage", "jaccard"]}},
        {"type": "rank.lightgbm", "params": {"model": "artifacts/ranker", "n_estimators": 20, **ranker}},
    ], data={"catalog": "data/catalog.parquet", "judgments": "data/judgments.parquet"})
    cfg.save(folder / "p.toml")
    return load_config(folder / "p.toml")


def test_label_gain_reaches_lightgbm_and_must_cover_every_label(tmp_path):
    from pipeline.build import build_artifacts

    gains = [0.0, 0.26, 0.59, 1.0, 1.52, 2.17, 3.0]
    build_artifacts(_lexical_ranker_config(tmp_path, label_gain=gains), progress=False, log=lambda m: None)
    model = (tmp_path / "artifacts" / "ranker" / "model.txt").read_text()
    line = next(x for x in model.splitlines() if x.startswith("[label_gain: "))
    assert [float(g) for g in line[len("[label_gain: "):-1].split(",")] == gains
    short = _lexical_ranker_config(tmp_path, label_gain=[0.0, 1.0, 2.0])
    with pytest.raises(DataError, match=r"relevance 3 becomes label 6 .* label_gain has 3 entries \(labels 0..2\)"):
        build_artifacts(short, progress=False, log=lambda m: None, force=True)
    with pytest.raises(ConfigError, match="'label_gain' parameter of stage 'rank.lightgbm'"):
        LightGBMRanker(label_gain=[1.0, 0.5]).validate_params()
