"""benchmarks/scale/generate_catalog.py: a catalog of any size recombined from Home Depot's titles."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO.parent / "shared" / "data" / "homedepot" / "catalog.parquet"


def _module():
    spec = importlib.util.spec_from_file_location("generate_catalog", REPO / "benchmarks" / "scale" / "generate_catalog.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.realdata
@pytest.mark.skipif(not SOURCE.exists(), reason=f"the Home Depot catalog {SOURCE} is absent")
def test_generates_a_seeded_catalog_and_queries_in_chunks(tmp_path):
    gen = _module()
    counts = gen.generate(500, tmp_path / "a", source=SOURCE, queries=50, chunk_rows=200)
    assert counts["products"] == 500 and counts["queries"] == 50
    catalog = pq.read_table(tmp_path / "a" / "catalog.parquet")
    assert catalog.column_names == ["product_id", "title", "brand"] and catalog.num_rows == 500
    assert catalog.column("product_id").to_pylist() == list(range(1, 501))
    titles = catalog.column("title").to_pylist()
    assert all(titles) and len(set(titles)) > 450
    real = set(pq.read_table(SOURCE, columns=["title"]).column("title").to_pylist())
    assert sum(t in real for t in titles) < 100                         # recombined, mostly not copied
    queries = pq.read_table(tmp_path / "a" / "queries.parquet")
    assert queries.column_names == ["query_id", "query"] and queries.num_rows == 50
    assert all(1 <= len(q.split()) <= 4 for q in queries.column("query").to_pylist())

    gen.generate(500, tmp_path / "b", source=SOURCE, queries=50, chunk_rows=200)   # seeded
    assert pq.read_table(tmp_path / "b" / "catalog.parquet").equals(catalog)


def test_a_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="the Home Depot catalog .* is absent; pass --source"):
        _module().generate(10, tmp_path, source=tmp_path / "nope.parquet")
