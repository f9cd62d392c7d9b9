"""History exclusion filter, history features, and leak-free next-item training data."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from indexes import FaissIndex
from pipeline.build import BuildContext
from pipeline.config import PipelineConfig
from pipeline.data import next_item_targets
from pipeline.errors import ConfigError
from pipeline.stage import Pipeline
from pipeline.testing import CHECKS, StageCase
from stages.association import AssociationIndex, AssociationRecall
from stages.history import HISTORY_FEATURES, HistoryFeatures, HistoryFilter, next_item_training
from stages.popularity import PopularityRecall

SCHEMA = pa.schema([("query_id", pa.string()), ("history", pa.list_(pa.string())), ("item_id", pa.string()),
                    ("score", pa.float32()), ("rank", pa.int32())])


def candidates(rows):
    """rows: (query_id, history, [items]) -> long-form candidates ranked in the given order."""
    out = []
    for q, hist, items in rows:
        out += [{"query_id": q, "history": hist, "item_id": i, "score": 1.0 / r, "rank": r}
                for r, i in enumerate(items, start=1)]
    return pa.Table.from_pylist(out, schema=SCHEMA)


# -- the filter -------------------------------------------------------------------------------


def test_filter_drops_history_items_only():
    batch = candidates([("u", ["a", "b", "c"], ["a", "x", "c", "y"]), ("v", ["x"], ["a", "x"]), ("w", [], ["a"])])
    out = HistoryFilter()(batch)
    assert list(zip(out.column("query_id").to_pylist(), out.column("item_id").to_pylist())) == [
        ("u", "x"), ("u", "y"), ("v", "a"), ("w", "a")]
    recent = HistoryFilter(last_n=1)(batch)
    assert ("u", "a") in zip(recent.column("query_id").to_pylist(), recent.column("item_id").to_pylist())
    assert ("u", "c") not in zip(recent.column("query_id").to_pylist(), recent.column("item_id").to_pylist())
    assert HistoryFilter()(candidates([("w", [], ["a", "b"])])).num_rows == 2


def test_filter_handles_null_histories_and_int_ids():
    batch = pa.table({"query_id": [1, 1, 2], "history": pa.array([[7], [7], None], pa.list_(pa.int64())),
                      "item_id": pa.array([7, 8, 7], pa.int64())})
    out = HistoryFilter()(batch)
    assert out.column("item_id").to_pylist() == [8, 7]
    with pytest.raises(ConfigError, match="'last_n' parameter of stage 'filter.history' must be None or an int >= 1"):
        HistoryFilter(last_n=0).validate_params()


# -- the features -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hist_artifacts")
    logs = pa.table({"user_id": ["u1", "u2", "u3"], "items": [["a", "b", "c"], ["a", "b"], ["b", "c", "d"]]})
    pq.write_table(logs, root / "logs.parquet")
    ctx = BuildContext(PipelineConfig(stages=[], data={"logs": "logs.parquet"}, base_dir=root), progress=False,
                       log=lambda m: None)
    for stage in (AssociationRecall(index="assoc", backward=0.5, decay=0.5, beta=0.0), PopularityRecall(index="pop")):
        stage._base_dir = root
        stage.build(None, ctx)
    vectors = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    FaissIndex.build(vectors, pa.array(["a", "b", "c", "d"])).save(root / "content")
    return root


def features(root, **params):
    stage = HistoryFeatures(association="assoc", content="content", popularity="pop", recency=0.5, **params)
    stage._base_dir = root
    return stage


def test_feature_values_by_hand(artifacts):
    out = features(artifacts)(candidates([("u", ["a", "b"], ["c", "d", "zz"]), ("v", [], ["a"])])).to_pylist()
    c, d, unknown, cold = out
    index = AssociationIndex.load(artifacts / "assoc")
    m = index.matrix.toarray()
    a_, b_, c_, d_ = index.positions(["a", "b", "c", "d"])
    assert c["f_assoc_last"] == pytest.approx(m[b_, c_])
    assert c["f_assoc_prev"] == pytest.approx(m[a_, c_])
    assert c["f_assoc_sum"] == pytest.approx(m[b_, c_] + 0.5 * m[a_, c_])
    assert c["f_assoc_max"] == pytest.approx(max(m[a_, c_], m[b_, c_]))
    assert c["f_assoc_hits"] == 2 and c["f_assoc_match_pos"] == 0
    assert c["f_assoc_reverse_last"] == pytest.approx(m[c_, b_])
    assert d["f_assoc_hits"] == 1 and d["f_assoc_match_pos"] == 0          # d only co-occurs with b
    assert unknown["f_assoc_sum"] == 0 and np.isnan(unknown["f_assoc_match_pos"])
    assert c["f_sim_last"] == pytest.approx(0.8) and c["f_sim_max"] == pytest.approx(0.8)
    assert c["f_sim_mean"] == pytest.approx((0.8 + 0.5 * 0.0) / 1.5)
    assert d["f_sim_last"] == pytest.approx(0.0)
    assert np.isnan(unknown["f_sim_last"]) and np.isnan(cold["f_sim_max"])
    assert c["f_pop_count"] == pytest.approx(np.log1p(2)) and unknown["f_pop_count"] == 0
    assert c["f_history_len"] == 2 and cold["f_history_len"] == 0
    assert c["f_score"] == 1.0 and d["f_rank"] == 2
    assert cold["f_assoc_last"] == 0


def test_features_are_independent_of_row_order(artifacts):
    batch = candidates([("u", ["a", "b"], ["c", "d"]), ("v", ["c"], ["d", "a"])])
    shuffled = batch.take([3, 0, 2, 1])
    stage = features(artifacts)
    straight, mixed = stage(batch), stage(shuffled)
    for col in [f"f_{n}" for n in HISTORY_FEATURES]:
        np.testing.assert_allclose(mixed.column(col).to_numpy(zero_copy_only=False),
                                   straight.take([3, 0, 2, 1]).column(col).to_numpy(zero_copy_only=False), equal_nan=True)


def test_feature_params(artifacts):
    only_pop = HistoryFeatures(association=None, content=None, popularity="pop", features=["pop_count"], copy_columns=[])
    only_pop._base_dir = artifacts
    assert only_pop(candidates([("u", ["a"], ["b"])])).column("f_pop_count").to_pylist() == [pytest.approx(np.log1p(3))]
    with pytest.raises(ConfigError, match="'association' parameter of stage 'features.history' must be an artifact folder"):
        HistoryFeatures(association=None).validate_params()
    with pytest.raises(ConfigError, match="'features' parameter"):
        HistoryFeatures(features=["nope"]).validate_params()


@pytest.mark.parametrize("check", [c for c in CHECKS if c != "cpu_gpu_parity"])
def test_conformance(artifacts, check):
    batch = candidates([("u", ["a", "b"], ["c", "d", "zz"]), ("v", [], ["a"]), ("w", ["d"], ["a", "b"])])
    CHECKS[check](StageCase(features(artifacts), batch))
    CHECKS[check](StageCase(HistoryFilter(), batch, id="filter.history"))


# -- next-item training data ------------------------------------------------------------------


def test_next_item_targets_and_training_view_never_see_the_targets(tmp_path):
    logs = pa.table({"user_id": ["u1", "u2", "u3"], "items": [["a", "b", "c"], ["a", "b"], ["x"]]})
    queries, judgments, prior = next_item_targets(logs)
    assert queries.to_pylist() == [{"query_id": "u1", "history": ["a", "b"]}, {"query_id": "u2", "history": ["a"]}]
    assert judgments.column("item_id").to_pylist() == ["c", "b"]
    assert prior.column("items").to_pylist() == [["a", "b"], ["a"]]

    pq.write_table(logs, tmp_path / "logs.parquet")
    ctx = BuildContext(PipelineConfig(stages=[], data={"logs": "logs.parquet"}, base_dir=tmp_path), progress=False,
                       log=lambda m: None)
    serving = AssociationRecall(index="artifacts/assoc", backward=0.0)
    serving._base_dir = tmp_path
    serving.build(None, ctx)
    upstream = Pipeline([serving], inputs=pa.schema([("query_id", pa.string()), ("history", pa.list_(pa.string()))]))
    q, j, view = next_item_training(upstream, ctx, tmp_path / "ranker" / "upstream")
    assert view.stages[0].resolve_path(view.stages[0].index) == tmp_path / "ranker" / "upstream" / "artifacts" / "assoc"
    out = view(q).to_pylist()
    assert not any(r["query_id"] == "u1" and r["item_id"] == "c" for r in out)   # b -> c only exists in the target
    assert serving(q.slice(0, 1)).column("item_id").to_pylist() == ["c"]          # the serving index has it
    absolute = AssociationRecall(index=str(tmp_path / "abs"))
    absolute.build(None, ctx)
    with pytest.raises(ConfigError, match="absolute"):
        next_item_training(Pipeline([absolute], inputs=upstream.inputs), ctx, tmp_path / "r2")
