"""Item popularity proxies: brand depth, attribute counts, retrieval counts over a query log."""

from __future__ import annotations

import json

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import ArtifactError, ConfigError, DataError, PipelineConfig
from pipeline.build import build_artifacts
from pipeline.config import load_config
from pipeline.data import holdout_mask
from pipeline.testing import CHECKS, StageCase
from stages.item_stats import ItemStatsFeatures

CATALOG = pa.table({
    "product_id": [10, 11, 12, 13, 14, 15],
    "title": ["DEWALT 20-Volt Cordless Drill", "DEWALT Cordless Drill Kit", "Philips LED Light Bulb",
              "Copper Pipe 3/4 in.", "Garden Hose 50 ft.", "Cordless Drill Combo Kit"],
    "brand": ["DEWALT", "DEWALT", "Philips", "Everbilt", None, None],
    "colors": [["Yellow"], ["Yellow", "Black"], None, [], None, ["Red"]],
})
LOG = pa.table({"query_id": list(range(1, 9)),
                "query": ["cordless drill", "drill kit", "led bulb", "copper pipe", "garden hose", "drill",
                          "cordless drill kit", "light bulb"],
                "product_id": [10, 11, 12, 13, 14, 15, 10, 12], "relevance": [3.0] * 8})
STATS = {"stats": "artifacts/stats", "brand_column": "brand", "count_columns": ["colors"], "depth": 2}


def _shop(tmp_path, holdout_fraction=0.0, log=LOG, **params):
    pq.write_table(CATALOG, tmp_path / "catalog.parquet")
    pq.write_table(log, tmp_path / "judgments.parquet")
    cfg = PipelineConfig(stages=[
        {"type": "recall.bm25", "params": {"index": "artifacts/bm25", "k": 3, "item_text": ["title"]}},
        {"type": "features.item_stats", "params": {**STATS, "holdout_fraction": holdout_fraction, **params}},
    ], data={"catalog": "catalog.parquet", "judgments": "judgments.parquet"})
    cfg.save(tmp_path / "p.toml")
    return load_config(tmp_path / "p.toml")


def _expected_retrievals(pipe, holdout_fraction, table=LOG):
    log = pl.from_arrow(table.select(["query_id", "query"]))
    log = log.filter(~pl.Series(holdout_mask(table.column("query_id"), holdout_fraction, 0)))
    cands = pl.from_arrow(pipe.stages[0](log.to_arrow())).filter(pl.col("rank") <= 2)
    return cands.group_by("item_id").len().to_dict(as_series=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("item_stats")
    cfg = _shop(root)
    logs = []
    pipe = build_artifacts(cfg, progress=False, log=logs.append)
    return root, cfg, pipe, logs


def test_catalog_proxies_and_retrieval_counts(built):
    _, _, pipe, _ = built
    stage = pipe.stages[1]
    assert stage.produced_columns().names == ["f_brand_items", "f_n_colors", "f_retrieved_by"]
    out = pl.from_arrow(pipe(pa.table({"query_id": [1], "query": ["cordless drill kit"]})))
    by_item = {r["item_id"]: r for r in out.to_dicts()}
    brands = {10: 2.0, 11: 2.0, 12: 1.0, 13: 1.0, 14: 0.0, 15: 0.0}
    colors = {10: 1.0, 11: 2.0, 12: 0.0, 13: 0.0, 14: 0.0, 15: 1.0}
    expected = _expected_retrievals(pipe, 0.0)
    counts = dict(zip(expected["item_id"], expected["len"]))
    for item, row in by_item.items():
        assert row["f_brand_items"] == brands[item] and row["f_n_colors"] == colors[item]
        assert row["f_retrieved_by"] == float(counts.get(item, 0))
    assert out.schema["f_retrieved_by"] == pl.Float32 and max(counts.values()) >= 2



def test_integer_ids_looked_up_by_binary_search_match_the_join(built):
    """Integer item ids are looked up in a sorted array; ids outside the catalog get 0, as the
    join that other id types (and nulls) take gives."""
    _, _, pipe, _ = built
    stage = pipe.stages[1]
    assert stage.sorted_ is not None
    cands = pa.table({"query_id": [1] * 6, "item_id": pa.array([15, 10, 99, 12, 10, 3], pa.int32()),
                      "f_n_colors": pa.array([9.0] * 6, pa.float32())})  # an old value is replaced
    got = stage.transform(cands)
    joined = stage.clone()
    joined.warm_up()
    joined.sorted_ = None
    assert got.equals(joined.transform(cands))
    assert got.column("f_brand_items").to_pylist() == [0.0, 2.0, 0.0, 1.0, 2.0, 0.0]
    assert got.column_names == ["query_id", "item_id", "f_brand_items", "f_n_colors", "f_retrieved_by"]

def test_holdout_queries_never_count(tmp_path):
    cfg = _shop(tmp_path, holdout_fraction=0.5)
    pipe = build_artifacts(cfg, progress=False, log=lambda m: None)
    assert any(holdout_mask(LOG.column("query_id"), 0.5, 0)) and not all(holdout_mask(LOG.column("query_id"), 0.5, 0))
    stats = pl.read_parquet(tmp_path / "artifacts" / "stats" / "item_stats.parquet")
    expected = _expected_retrievals(pipe, 0.5)
    counts = dict(zip(expected["item_id"], expected["len"]))
    assert {r["item_id"]: r["f_retrieved_by"] for r in stats.to_dicts()} == {i: float(counts.get(i, 0)) for i in range(10, 16)}
    manifest = json.loads((tmp_path / "artifacts" / "stats" / "manifest.json").read_text())
    assert manifest["log_queries"] == LOG.num_rows - sum(holdout_mask(LOG.column("query_id"), 0.5, 0))


def test_build_is_cached_and_stale_stats_are_refused(built):
    root, cfg, _, logs = built
    build_artifacts(cfg, progress=False, log=logs.append)
    assert "up to date" in logs[-1]
    other = ItemStatsFeatures(stats=str(root / "artifacts" / "stats"), count_columns=[], depth=2)
    with pytest.raises(ArtifactError, match="run `funnel build`"):
        other.warm_up()


def test_catalog_only_without_upstream_and_list_column_check(tmp_path):
    pq.write_table(CATALOG, tmp_path / "catalog.parquet")
    cfg = PipelineConfig(stages=[{"type": "features.item_stats", "params": {**STATS, "depth": 0}}],
                         data={"catalog": "catalog.parquet"})
    cfg.save(tmp_path / "p.toml")
    pipe = build_artifacts(load_config(tmp_path / "p.toml"), progress=False, log=lambda m: None)
    out = pipe(pa.table({"query_id": [1, 1], "item_id": [12, 99]})).to_pydict()
    assert out["f_brand_items"] == [1.0, 0.0] and "f_retrieved_by" not in out
    cfg = PipelineConfig(stages=[{"type": "features.item_stats", "params": {**STATS, "count_columns": ["title"],
                                                                            "depth": 0}}],
                         data={"catalog": "catalog.parquet"})
    cfg.save(tmp_path / "q.toml")
    with pytest.raises(DataError, match="count_columns column 'title' .* must be a list column"):
        build_artifacts(load_config(tmp_path / "q.toml"), progress=False, log=lambda m: None)


def test_bad_params():
    with pytest.raises(ConfigError, match="'depth' parameter of stage 'features.item_stats'"):
        ItemStatsFeatures(depth=-1).validate_params()
    with pytest.raises(ConfigError, match="'count_columns' parameter"):
        ItemStatsFeatures(count_columns="colors").validate_params()
    with pytest.raises(ConfigError, match="no feature to add"):
        ItemStatsFeatures(brand_column=None, depth=0).validate_params()


@pytest.mark.parametrize("check", [c for c in CHECKS if c != "cpu_gpu_parity"])
def test_item_stats_conform(built, check):
    stage = built[2].stages[1].clone()
    cands = pa.table({"query_id": [1, 1, 2], "item_id": [10, 14, 12], "score": pa.array([2.0, 1.0, 3.0], pa.float32()),
                      "segment": ["a", "a", "b"]})
    CHECKS[check](StageCase(stage, cands))


def test_retrieval_counts_summed_over_batches(tmp_path):
    """A query log of several build batches (256 queries each) is counted batch by batch, never
    held whole; the counts equal those of every candidate at once."""
    log = pa.table({"query_id": list(range(1, 601)), "query": LOG.column("query").to_pylist() * 75,
                    "product_id": LOG.column("product_id").to_pylist() * 75, "relevance": [3.0] * 600})
    pipe = build_artifacts(_shop(tmp_path, log=log), progress=False, log=lambda m: None)
    expected = _expected_retrievals(pipe, 0.0, log)
    stats = pl.read_parquet(tmp_path / "artifacts" / "stats" / "item_stats.parquet")
    counts = dict(zip(expected["item_id"], expected["len"]))
    assert {r["item_id"]: r["f_retrieved_by"] for r in stats.to_dicts()} == {i: float(counts.get(i, 0)) for i in range(10, 16)}
    assert max(counts.values()) > 256
