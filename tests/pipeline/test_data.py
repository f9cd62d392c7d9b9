"""pipeline.data: reading a catalog's vector column in batches."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import read_item_vectors
from pipeline.errors import DataError


def test_vectors_stream_in_batches_across_shards_with_gaps(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 6)).astype(np.float32)
    rows = [list(v) for v in vectors]
    rows[3], rows[17], rows[40] = None, [0.0] * 6, None
    folder = tmp_path / "catalog"
    folder.mkdir()
    for part, (lo, hi) in enumerate(((0, 20), (20, 50))):          # a folder of two shards
        pq.write_table(pa.table({"product_id": list(range(lo, hi)), "title": ["t"] * (hi - lo),
                                 "image": pa.array(rows[lo:hi], pa.list_(pa.float32()))}), folder / f"{part}.parquet")
    got = read_item_vectors(folder, "image", stage="s", batch_rows=7)
    keep = [i for i in range(50) if i not in (3, 17, 40)]
    assert sorted(got.ids.to_pylist()) == keep and got.missing == 2 and got.zero_norm == 1
    order = np.argsort(got.ids.to_numpy())
    np.testing.assert_array_equal(got.vectors[order], vectors[keep])
    assert got.dim == 6 and got.vectors.dtype == np.float32
    assert got.skipped() == "; 2 without a vector, 1 of norm 0 left out"


def test_vector_errors_name_column_item_expected_and_found(tmp_path):
    path = tmp_path / "items.parquet"
    pq.write_table(pa.table({"item_id": ["a", "b"], "v": pa.array([None, None], pa.list_(pa.float32()))}), path)
    with pytest.raises(DataError, match=r"column 'v' has no usable vector \(2 rows: 2 null, 0 all zeros\)"):
        read_item_vectors(path, "v", stage="recall.user_vector")
    pq.write_table(pa.table({"item_id": ["a", "b"], "v": pa.array([[1.0, None], [1.0, 2.0]], pa.list_(pa.float32()))}),
                   path)
    with pytest.raises(DataError, match=r"stage 'recall.user_vector': .*column 'v' has null values inside the vector "
                                        r"of item 'a'; expected 2 numbers"):
        read_item_vectors(path, "v", stage="recall.user_vector")
    pq.write_table(pa.table({"item_id": ["a", "a"], "v": pa.array([[1.0], [2.0]], pa.list_(pa.float32()))}), path)
    with pytest.raises(DataError, match=r"duplicate ids"):
        read_item_vectors(path, "v", stage="s")
