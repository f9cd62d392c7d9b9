"""Catalog lookup: snapshot at build, join at run, unknown items quarantined."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import ArtifactError, Pipeline
from pipeline.build import BuildContext
from pipeline.config import PipelineConfig


@pytest.fixture()
def lookup(tmp_path):
    pq.write_table(pa.table({"product_id": [1, 2], "title": ["drill", "hose"], "brand": ["x", None]}),
                   tmp_path / "catalog.parquet")
    cfg = PipelineConfig(stages=[{"type": "lookup.catalog"}], data={"catalog": "catalog.parquet"}, base_dir=tmp_path)
    stage = cfg.build().stages[0]
    assert "wrote 2 items" in stage.build(None, BuildContext(cfg, progress=False))
    assert "up to date" in stage.build(None, BuildContext(cfg, progress=False))
    return stage


def test_join_keeps_order_and_types(lookup):
    out = lookup(pa.table({"query_id": [7, 7], "item_id": [2, 1]}))
    assert out.to_pylist() == [{"query_id": 7, "item_id": 2, "title": "hose", "brand": None},
                               {"query_id": 7, "item_id": 1, "title": "drill", "brand": "x"}]



def test_integer_ids_by_binary_search_equal_the_join(lookup):
    """A batch much smaller than the snapshot finds integer ids by binary search
    (stages.association.SortedIds); larger batches, string ids and ids with nulls take the join.
    Both give the same rows, an unknown id a row of nulls."""
    import numpy as np

    from stages.association import SortedIds

    batch = pa.table({"query_id": [7, 7, 7], "item_id": pa.array([2, 99, 1], pa.int32())})
    lookup.warm_up()
    assert lookup.sorted_ is not None
    lookup.sorted_ = SortedIds(np.array([1, 2] + list(range(100, 130)), np.int64))  # a snapshot of 32 ids
    searched = []
    lookup.sorted_.positions = (lambda values, f=lookup.sorted_.positions: searched.append(1) or f(values))
    fast = lookup.transform(batch)
    assert searched
    lookup.sorted_ = None
    assert fast.equals(lookup.transform(batch))
    assert fast.column("title").to_pylist() == ["hose", None, "drill"]

def test_unknown_items_go_to_quarantine(lookup):
    rejected = []
    out = Pipeline([lookup]).run(pa.table({"query_id": [1, 1], "item_id": [1, 99]}), quarantine=rejected)
    assert out.column("item_id").to_pylist() == [1]
    assert rejected[0].column("reason").to_pylist() == ["item_id not in the catalog snapshot artifacts/items"]


def test_tampered_snapshot_is_refused(lookup):
    path = lookup.resolve_path(lookup.items) / "items.parquet"
    path.write_bytes(path.read_bytes()[:-10])
    fresh = lookup.clone()
    with pytest.raises(ArtifactError, match="corrupted or was changed"):
        fresh.warm_up()


def test_quarantine_check_and_lookup_share_positions(lookup):
    """Under a quarantine the runner asks invalid_rows first, then transforms the same table when
    nothing was rejected: the positions are worked out once, and a different table is looked up
    afresh."""
    calls = []
    lookup.warm_up()
    lookup._positions = (lambda table, f=lookup._positions: calls.append(table.num_rows) or f(table))
    batch = pa.table({"query_id": [1, 1], "item_id": [2, 1]})
    out = Pipeline([lookup]).run(batch, quarantine=[])
    assert calls == [2]
    assert out.column("title").to_pylist() == ["hose", "drill"]
    other = pa.table({"query_id": [3], "item_id": [1]})
    assert lookup.invalid_rows(batch) is None
    assert lookup.transform(other).column("title").to_pylist() == ["drill"]
    assert calls == [2, 2, 1]
    assert lookup._checked_ is None
