"""The synthetic demo data set: deterministic, well-formed, and a usable ranking signal."""

import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.demo_data import generate_demo_data

CATALOG = pa.schema([
    ("item_id", pa.int64()), ("title", pa.string()), ("brand", pa.string()), ("category", pa.string()),
    ("color", pa.string()), ("material", pa.string()), ("price", pa.float64()), ("in_stock", pa.bool_()),
    ("popularity", pa.float64()),
])
QUERIES = pa.schema([("query_id", pa.int64()), ("query", pa.string())])
JUDGMENTS = pa.schema([("query_id", pa.int64()), ("query", pa.string()), ("item_id", pa.int64()),
                       ("relevance", pa.float64())])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    start = time.perf_counter()
    paths = generate_demo_data(folder)
    elapsed = time.perf_counter() - start
    return paths, {name: pq.read_table(path) for name, path in paths.items()}, elapsed


def test_fast(demo):
    assert demo[2] < 5.0


def test_same_seed_same_bytes(demo, tmp_path):
    paths, _, _ = demo
    again = generate_demo_data(tmp_path / "again")
    assert set(again) == {"catalog", "queries", "judgments"}
    for name in paths:
        assert again[name].read_bytes() == paths[name].read_bytes(), name
    other = generate_demo_data(tmp_path / "other", seed=1)
    assert other["catalog"].read_bytes() != paths["catalog"].read_bytes()


def test_schemas_and_sizes(demo):
    _, t, _ = demo
    assert t["catalog"].schema.remove_metadata() == CATALOG
    assert t["queries"].schema.remove_metadata() == QUERIES
    assert t["judgments"].schema.remove_metadata() == JUDGMENTS
    assert t["catalog"].num_rows == 3000 and t["queries"].num_rows == 400
    catalog = t["catalog"]
    assert len(set(catalog["item_id"].to_pylist())) == 3000
    assert catalog["title"].null_count == 0 and catalog["category"].null_count == 0
    assert 0.1 < catalog["brand"].null_count / 3000 < 0.3
    assert 0.8 < np.mean(catalog["in_stock"].to_numpy(zero_copy_only=False)) < 0.97
    assert catalog["color"].null_count > 0 and catalog["material"].null_count > 0
    assert len(set(catalog["category"].to_pylist())) == 8
    assert (catalog["price"].to_numpy() > 0).all() and (catalog["popularity"].to_numpy() > 0).all()
    # variants of one product differ in colour or size only; a few generic titles repeat exactly
    titles = catalog["title"].to_pylist()
    assert 2700 < len(set(titles)) < 3000
    models = [t.rsplit("(Model ", 1)[1] for t in titles if "(Model " in t]
    assert len(set(models)) < 0.6 * len(models)  # many models come in several variants
    queries = t["queries"]["query"].to_pylist()
    assert len(set(queries)) == 400 and all(q.strip() for q in queries)


def test_judgments(demo):
    _, t, _ = demo
    j, catalog, queries = t["judgments"], t["catalog"], t["queries"]
    assert set(j["item_id"].to_pylist()) <= set(catalog["item_id"].to_pylist())
    assert set(j["query_id"].to_pylist()) == set(queries["query_id"].to_pylist())
    text = dict(zip(queries["query_id"].to_pylist(), queries["query"].to_pylist()))
    assert all(text[q] == s for q, s in zip(j["query_id"].to_pylist(), j["query"].to_pylist()))
    rel = j["relevance"].to_numpy()
    assert rel.min() >= 1.0 and rel.max() <= 3.0
    assert set(np.round(rel * 3).tolist()) <= set(range(3, 10))  # thirds: means of three raters
    counts = np.bincount(j["query_id"].to_numpy())[1:]
    assert counts.min() >= 5 and counts.max() <= 10
    pairs = list(zip(j["query_id"].to_pylist(), j["item_id"].to_pylist()))
    assert len(set(pairs)) == len(pairs)
    best = {}
    for q, r in zip(j["query_id"].to_pylist(), rel):
        best[q] = max(best.get(q, 0), r)
    assert min(best.values()) == 3.0  # every query has an exact match
    assert 0.2 < np.mean(rel == 3.0) < 0.7 and np.mean(rel <= 1.34) > 0.1  # graded, not all-or-nothing


def test_relevance_follows_words(demo):
    """Items sharing a query word are judged better on average: a learnable, imperfect signal."""
    _, t, _ = demo
    j, catalog = t["judgments"], t["catalog"]
    title = dict(zip(catalog["item_id"].to_pylist(), catalog["title"].to_pylist()))
    overlap = np.array([bool(set(q.split()) & set(title[i].lower().split()))
                        for q, i in zip(j["query"].to_pylist(), j["item_id"].to_pylist())])
    rel = j["relevance"].to_numpy()
    assert rel[overlap].mean() > rel[~overlap].mean() + 0.5
    assert np.mean(rel[~overlap] >= 2.67) > 0.05  # some good items need more than word overlap


def test_small_sizes(tmp_path):
    paths = generate_demo_data(tmp_path, n_items=50, n_queries=10, seed=3)
    assert pq.read_table(paths["catalog"]).num_rows == 50
    assert pq.read_table(paths["queries"]).num_rows == 10
    with pytest.raises(ValueError, match="n_items"):
        generate_demo_data(tmp_path, n_items=5)


def test_judged_items_lean_to_popular_ones(demo):
    """Raters grade what an engine showed: among equally good items the judged ones are the popular
    ones, which a ranker's popularity feature can learn (the demo's ranker then adds to recall)."""
    _, t, _ = demo
    j, catalog = t["judgments"], t["catalog"]
    popularity = dict(zip(catalog["item_id"].to_pylist(), catalog["popularity"].to_pylist()))
    judged = np.array([popularity[i] for i in j["item_id"].to_pylist()])
    assert np.median(judged) > 2 * np.median(catalog["popularity"].to_numpy())
