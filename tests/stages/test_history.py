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
from stages.history import (DEFAULT_HISTORY_FEATURES, HISTORY_FEATURES, HistoryFeatures, HistoryFilter, item_groups,
                            next_item_training, next_item_views)
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
    pq.write_table(pa.table({"item_id": ["a", "b", "c", "d"], "brand": ["X", "Y", "Y", None]}), root / "catalog.parquet")
    ctx = BuildContext(PipelineConfig(stages=[], data={"logs": "logs.parquet", "catalog": "catalog.parquet"},
                                      base_dir=root), progress=False, log=lambda m: None)
    for stage in (AssociationRecall(index="assoc", backward=0.5, decay=0.5, beta=0.0), PopularityRecall(index="pop"),
                  features(root)):
        stage._base_dir = root
        stage.build(None, ctx)
    vectors = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    FaissIndex.build(vectors, pa.array(["a", "b", "c", "d"])).save(root / "content")
    return root


def features(root, **params):
    stage = HistoryFeatures(association="assoc", content="content", popularity="pop", transitions="trans",
                            groups="groups", recency=0.5, **params)
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
    # transitions in the logs: a->b twice, b->c twice, c->d once; b occurs 3 times
    assert c["f_next_last"] == 2 and c["f_next_last_share"] == pytest.approx(2 / 3) and c["f_next_prev"] == 0
    assert d["f_next_last"] == 0 and unknown["f_next_last"] == 0 and cold["f_next_last"] == 0
    # brands: a X, b Y, c Y, d none
    assert c["f_group_share"] == pytest.approx(0.5) and c["f_group_last"] == 1
    assert d["f_group_share"] == 0 and d["f_group_last"] == 0 and unknown["f_group_share"] == 0
    assert cold["f_group_share"] == 0 and cold["f_group_last"] == 0


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
        HistoryFeatures(association=None, features=["assoc_last"]).validate_params()
    with pytest.raises(ConfigError, match="'groups' parameter of stage 'features.history' must be an artifact folder"):
        HistoryFeatures(features=["group_last"]).validate_params()
    # features = None: every feature whose artifact is set
    assert HistoryFeatures()._features() == list(DEFAULT_HISTORY_FEATURES)
    assert "assoc_last" not in HistoryFeatures(association=None)._features()
    assert HistoryFeatures(transitions="t", groups="g")._features() == list(HISTORY_FEATURES)
    with pytest.raises(ConfigError, match="'group_words' parameter"):
        HistoryFeatures(group_words=-1).validate_params()


def test_item_groups_from_a_column_or_its_first_words():
    catalog = pa.table({"item_id": [1, 2, 3, 4], "title": ["Philips Sonicare Brush", "philips razor", "", None],
                        "tags": [["x"], ["y"], [], None]})
    assert item_groups(catalog, "title").column("group").to_pylist() == ["Philips Sonicare Brush", "philips razor",
                                                                        None, None]
    assert item_groups(catalog, "title", 1).column("group").to_pylist() == ["philips", "philips", None, None]
    assert item_groups(catalog, "title", 2).column("group").to_pylist() == ["philips sonicare", "philips razor", None,
                                                                           None]
    assert item_groups(catalog, "item_id").column("group").to_pylist() == ["1", "2", "3", "4"]
    with pytest.raises(Exception, match="'tags' \\(group_column\\) must hold one value per item"):
        item_groups(catalog, "tags")


def test_transitions_and_groups_are_built_once_and_rebuilt_when_their_input_changes(tmp_path):
    pq.write_table(pa.table({"user_id": ["u1", "u2"], "items": [["a", "b"], ["b", "a", "b"]]}), tmp_path / "logs.parquet")
    pq.write_table(pa.table({"item_id": ["a", "b"], "brand": ["X", "Y"]}), tmp_path / "catalog.parquet")
    ctx = BuildContext(PipelineConfig(stages=[], data={"logs": "logs.parquet", "catalog": "catalog.parquet"},
                                      base_dir=tmp_path), progress=False, log=lambda m: None)
    stage = HistoryFeatures(association=None, content=None, popularity=None, transitions="t", groups="g")
    stage._base_dir = tmp_path
    first = stage.build(None, ctx)
    assert "2 (item, next item) pairs among 2 items" in first and "2 items in 2 groups ('brand')" in first
    assert stage.build(None, ctx).count("up to date") == 2
    pq.write_table(pa.table({"item_id": ["a", "b"], "brand": ["X", "X"]}), tmp_path / "catalog.parquet")
    again = stage.build(None, ctx)
    assert "transitions up to date" in again and "2 items in 1 groups" in again
    assert HistoryFeatures(association=None, content=None, popularity=None).build(None, ctx) is None


@pytest.mark.parametrize("check", [c for c in CHECKS if c != "cpu_gpu_parity"])
def test_conformance(artifacts, check):
    batch = candidates([("u", ["a", "b"], ["c", "d", "zz"]), ("v", [], ["a"]), ("w", ["d"], ["a", "b"])])
    CHECKS[check](StageCase(features(artifacts), batch))
    CHECKS[check](StageCase(HistoryFilter(), batch, id="filter.history"))


# -- next-item training data ------------------------------------------------------------------


def forward_association(logs: pa.Table, tmp_path):
    """``logs`` written to ``tmp_path``, and a forward-only association index learned from them:
    ``(build context, the recall stage, a pipeline of it over user queries)``."""
    pq.write_table(logs, tmp_path / "logs.parquet")
    ctx = BuildContext(PipelineConfig(stages=[], data={"logs": "logs.parquet"}, base_dir=tmp_path), progress=False,
                       log=lambda m: None)
    serving = AssociationRecall(index="artifacts/assoc", backward=0.0)
    serving._base_dir = tmp_path
    serving.build(None, ctx)
    upstream = Pipeline([serving], inputs=pa.schema([("query_id", pa.string()), ("history", pa.list_(pa.string()))]))
    return ctx, serving, upstream


def test_next_item_targets_and_training_view_never_see_the_targets(tmp_path):
    logs = pa.table({"user_id": ["u1", "u2", "u3"], "items": [["a", "b", "c"], ["a", "b"], ["x"]]})
    queries, judgments, prior = next_item_targets(logs)
    assert queries.to_pylist() == [{"query_id": "u1", "history": ["a", "b"]}, {"query_id": "u2", "history": ["a"]}]
    assert judgments.column("item_id").to_pylist() == ["c", "b"]
    assert prior.column("items").to_pylist() == [["a", "b"], ["a"]]

    ctx, serving, upstream = forward_association(logs, tmp_path)
    q, j, view = next_item_training(upstream, ctx, tmp_path / "ranker" / "upstream")
    assert view.stages[0].resolve_path(view.stages[0].index) == tmp_path / "ranker" / "upstream" / "artifacts" / "assoc"
    out = view(q).to_pylist()
    assert not any(r["query_id"] == "u1" and r["item_id"] == "c" for r in out)   # b -> c only exists in the target
    assert serving(q.slice(0, 1)).column("item_id").to_pylist() == ["c"]          # the serving index has it
    absolute = AssociationRecall(index=str(tmp_path / "abs"))
    absolute.build(None, ctx)
    with pytest.raises(ConfigError, match="absolute"):
        next_item_training(Pipeline([absolute], inputs=upstream.inputs), ctx, tmp_path / "r2")


def test_next_item_views_go_one_target_further_back_each_never_seen_by_their_artifacts(tmp_path):
    logs = pa.table({"user_id": ["u1", "u2", "u3"], "items": [["a", "b", "c", "d"], ["a", "b", "c"], ["x", "y"]]})
    ctx, serving, upstream = forward_association(logs, tmp_path)
    views = list(next_item_views(upstream, ctx, tmp_path / "ranker" / "upstream", views=5))
    assert len(views) == 3                                       # then no user has two items left
    targets = [dict(zip(j.column("query_id").to_pylist(), j.column("item_id").to_pylist())) for _, j, _ in views]
    assert targets == [{"u1": "d", "u2": "c", "u3": "y"}, {"u1": "c", "u2": "b"}, {"u1": "b"}]
    q2, _, view2 = views[1]
    assert q2.column("history").to_pylist() == [["a", "b"], ["a"]]
    assert view2.stages[0].resolve_path(view2.stages[0].index) == tmp_path / "ranker" / "upstream-2" / "artifacts" / "assoc"
    assert "c" not in view2(q2.slice(0, 1)).column("item_id").to_pylist()   # b -> c only exists in view 2's targets
    assert "c" in views[0][2](q2.slice(0, 1)).column("item_id").to_pylist()  # view 1's artifacts have it


def test_association_features_match_a_per_row_reference(tmp_path):
    """The vectorised features (segment reductions over every candidate x history item) equal a
    plain loop over the rows, on generated logs with empty histories and unknown items."""
    rng = np.random.default_rng(1)
    items = [f"i{i}" for i in range(50)]
    logs = pa.table({"user_id": [f"u{u}" for u in range(300)],
                     "items": [list(rng.choice(items, int(rng.integers(2, 9)), replace=False)) for _ in range(300)]})
    pq.write_table(logs, tmp_path / "logs.parquet")
    ctx = BuildContext(PipelineConfig(stages=[], data={"logs": "logs.parquet"}, base_dir=tmp_path), progress=False,
                       log=lambda m: None)
    recall = AssociationRecall(index="assoc", window=3, top_m=10)
    recall._base_dir = tmp_path
    recall.build(None, ctx)
    rows = []
    for q in range(40):
        hist = [] if q % 13 == 0 else list(rng.choice(items + ["unknown"], int(rng.integers(1, 12))))
        rows.append((f"q{q}", hist, list(rng.choice(items + ["new"], int(rng.integers(1, 20)), replace=False))))
    batch = candidates(rows)
    stage = HistoryFeatures(association="assoc", content=None, popularity=None, recency=0.7,
                            features=[f for f, spec in HISTORY_FEATURES.items() if spec.needs in ("association", "")],
                            copy_columns=[])
    stage._base_dir = tmp_path
    out = stage(batch)
    index = AssociationIndex.load(tmp_path / "assoc")
    m = np.vstack([index.matrix.toarray(), np.zeros(len(index))])  # row/column -1: unknown item, score 0
    m = np.hstack([m, np.zeros((len(m), 1))])
    expected = {f: [] for f in stage.features}
    for _, hist, cands in rows:
        h = index.positions(hist) if hist else np.zeros(0, np.int64)
        for c in index.positions(cands):
            s = m[h, c].astype(np.float32)
            back = np.arange(len(h))[::-1]
            best = max(s.max(initial=0), 0)
            expected["assoc_last"].append(s[-1] if len(s) else 0)
            expected["assoc_prev"].append(s[-2] if len(s) > 1 else 0)
            expected["assoc_sum"].append(sum(float(v) * 0.7 ** b for v, b in zip(s, back)))
            expected["assoc_max"].append(best)
            expected["assoc_hits"].append((s > 0).sum())
            expected["assoc_match_pos"].append(back[(s > 0) & (s == best)].min() if best > 0 else np.nan)
            expected["assoc_reverse_last"].append(m[c, h[-1]] if len(h) else 0)
            expected["history_len"].append(len(h))
    for f, values in expected.items():
        np.testing.assert_allclose(out.column(f"f_{f}").to_numpy(zero_copy_only=False), np.array(values, np.float32),
                                   rtol=1e-6, err_msg=f)
