from __future__ import annotations

import pyarrow as pa

from stages.display import TopNDisplay


def _cands():
    return pa.table({
        "query_id": [1, 1, 1, 1, 2, 2],
        "item_id": [10, 11, 12, 13, 20, 21],
        "brand": ["a", "a", "b", "a", None, None],
        "score": pa.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], pa.float32()),
        "rank": pa.array([1, 2, 4, 3, 2, 1], pa.int32()),
    })


def test_top_n_per_query_renumbers_ranks():
    out = TopNDisplay(n=2)(_cands())
    assert out.column("item_id").to_pylist() == [10, 11, 21, 20]
    assert out.column("rank").to_pylist() == [1, 2, 1, 2]


def test_brand_cap_makes_room_for_other_brands():
    out = TopNDisplay(n=3, cap_column="brand", cap=1)(_cands())
    assert out.filter(pa.compute.equal(out.column("query_id"), 1)).column("item_id").to_pylist() == [10, 12]
    assert out.filter(pa.compute.equal(out.column("query_id"), 2)).num_rows == 2  # nulls are not capped
