"""Popularity within the user's groups (recall.group_popularity), on small hand-made logs and catalogs.

``recall.popularity`` itself is tested with the association index in test_association.py."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.build import BuildContext
from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError
from pipeline.testing import CHECKS, StageCase
from stages.history import HistoryFeatures
from stages.popularity import GroupPopularityRecall, PopularityRecall

# bought: a 1, b 2, c 3, d 4 times, e once; brands X = {a, b, c}, Y = {d, e}, f has none
LOGS = pa.table({"user_id": ["u1", "u2", "u3", "u4"],
                 "items": [["a", "b", "c", "d"], ["b", "c", "d"], ["c", "d", "e"], ["d", "f"]]})
CATALOG = pa.table({"item_id": ["a", "b", "c", "d", "e", "f"], "brand": ["X", "X", "X", "Y", "Y", None]})


def context(root) -> BuildContext:
    pq.write_table(LOGS, root / "logs.parquet")
    pq.write_table(CATALOG, root / "catalog.parquet")
    return BuildContext(PipelineConfig(stages=[], data={"logs": "logs.parquet", "catalog": "catalog.parquet"},
                                       base_dir=root), progress=False, log=lambda m: None)


def stage(root, **params) -> GroupPopularityRecall:
    s = GroupPopularityRecall(index="pop", groups="groups", **params)
    s._base_dir = root
    return s


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("group_pop")
    stage(root).build(None, context(root))
    return root


def users(rows):
    return pa.table({"query_id": [r[0] for r in rows], "history": [r[1] for r in rows]},
                    schema=pa.schema([("query_id", pa.string()), ("history", pa.list_(pa.string()))]))


def test_items_of_the_users_groups_by_share_times_popularity(root):
    out = stage(root, k=10, decay=0.25)(users([("u", ["a", "d"]), ("v", ["f"]), ("w", []), ("x", ["zz", "e"])]))
    got = {}
    for r in out.to_pylist():
        got.setdefault(r["query_id"], []).append((r["item_id"], pytest.approx(r["score"]), r["rank"], r["source"]))
    # u: d (last) weighs 1, a 0.25 -> Y's share 0.8, X's 0.2; its own a and d are skipped
    assert got["u"] == [("e", 0.8 * 1, 1, "group"), ("c", 0.2 * 3, 2, "group"), ("b", 0.2 * 2, 3, "group")]
    # x: e is in Y, the unknown zz weighs 0.25 of the history: Y's share 0.8; f's user has no group
    assert got["x"] == [("d", 0.8 * 4, 1, "group")]
    assert "v" not in got and "w" not in got


def test_k_max_groups_and_keeping_the_history(root):
    hist = users([("u", ["a", "d"])])
    assert stage(root, k=1)(hist).column("item_id").to_pylist() == ["c"]
    assert stage(root, max_groups=1)(hist).column("item_id").to_pylist() == ["e"]   # Y only, d is owned
    kept = stage(root, exclude_history=False, decay=0.25)(hist).column("item_id").to_pylist()
    assert kept == ["d", "e", "c", "b", "a"]


def test_popularity_by_recent(root):
    # recent (0.8 per step from the end of each sequence): c 0.8 + 0.8 + 0.64 beats b 0.64 + 0.64; f has no group
    out = stage(root, by="recent")(users([("u", ["f", "a"])])).column("item_id").to_pylist()
    assert out == ["c", "b"]


def test_shared_folders_are_built_once(tmp_path):
    ctx = context(tmp_path)
    for other in (PopularityRecall(index="pop"),
                  HistoryFeatures(association=None, content=None, popularity=None, groups="groups")):
        other._base_dir = tmp_path
        other.build(None, ctx)
    assert stage(tmp_path).build(None, ctx).count("up to date") == 2
    words = stage(tmp_path, group_column="item_id", group_words=1).build(None, ctx)
    assert words.count("up to date") == 1 and "6 items in 6 groups ('item_id')" in words


def test_bad_parameters_name_the_parameter():
    for params, name in (({"k": 0}, "k"), ({"by": "sales"}, "by"), ({"decay": 0}, "decay"),
                         ({"max_groups": 0}, "max_groups"), ({"group_words": -1}, "group_words"),
                         ({"group_column": ""}, "group_column")):
        with pytest.raises(ConfigError, match=f"'{name}' parameter of stage 'recall.group_popularity'"):
            GroupPopularityRecall(**params).validate_params()


@pytest.mark.parametrize("check", [c for c in CHECKS if c != "cpu_gpu_parity"])
def test_conformance(root, check):
    batch = users([("u", ["a", "d"]), ("v", ["f"]), ("w", []), ("x", ["e", "zz"]), ("y", ["b", "c"])])
    CHECKS[check](StageCase(stage(root, k=3), batch))
