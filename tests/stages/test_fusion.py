"""Fused recall: several sources on the same queries, RRF / weighted fusion, provenance."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline import ANY, ConfigError, Stage, StageTags, register_stage
from pipeline.testing import CHECKS, StageCase
from stages.fusion import FusedRecall, _fuse_grouped, _fuse_joined


@register_stage
class FixedRecall(Stage):
    """Returns a fixed ranked list per query (test double standing in for a real source)."""

    name = "test.fixed_recall"
    input_schema = pa.schema([pa.field("query_id", ANY)])
    output_schema = pa.schema([pa.field("item_id", ANY), pa.field("score", pa.float32()),
                               pa.field("rank", pa.int32()), pa.field("source", pa.string())])
    tags = StageTags(level="query")

    def __init__(self, items: list | None = None, scores: list | None = None):
        self.items = items
        self.scores = scores

    def transform(self, table):
        rows = []
        for q in table.column("query_id").to_pylist():
            for r, (i, s) in enumerate(zip(self.items, self.scores), start=1):
                rows.append({"query_id": q, "item_id": i, "score": s, "rank": r, "source": "x"})
        out = pa.Table.from_pylist(rows, schema=pa.schema([pa.field("query_id", table.schema.field("query_id").type),
                                                            ("item_id", pa.int64()), ("score", pa.float32()),
                                                            ("rank", pa.int32()), ("source", pa.string())]))
        return out


def _fused(method="rrf", k=10):
    return FusedRecall(method=method, k=k, sources=[
        {"name": "a", "weight": 1.0, "stages": [{"type": "test.fixed_recall", "params": {"items": [1, 2, 3], "scores": [0.9, 0.5, 0.1]}}]},
        {"name": "b", "weight": 2.0, "stages": [{"type": "test.fixed_recall", "params": {"items": [3, 4], "scores": [10.0, 5.0]}}]},
    ])


QUERIES = pa.table({"query_id": ["q1", "q2", "q3"], "query": ["x", "y", "z"]})


def test_rrf_scores_ranks_and_provenance():
    out = _fused()(QUERIES).to_pylist()
    q1 = [r for r in out if r["query_id"] == "q1"]
    assert [r["item_id"] for r in q1] == [3, 4, 1, 2]
    top = q1[0]
    assert top["source"] == "a+b" and top["rank"] == 1 and top["query"] == "x"
    assert top["score"] == pytest.approx(1 / 63 + 2 / 61)
    assert top["rank_a"] == 3 and top["rank_b"] == 1
    assert q1[2]["source"] == "a" and q1[2]["score_b"] is None


def test_weighted_fusion_and_cut():
    out = _fused(method="weighted", k=2)(QUERIES).to_pylist()
    q1 = [r for r in out if r["query_id"] == "q1"]
    assert [r["item_id"] for r in q1] == [3, 1]  # min-max: a gives 1 -> 1.0, 3 -> 0.0; b gives 3 -> 2.0, 4 -> 0.0
    assert q1[0]["score"] == pytest.approx(0.0 + 2.0)


def test_bad_sources_fail_at_build_time():
    with pytest.raises(ConfigError, match="'sources' parameter"):
        FusedRecall(sources=[]).validate_params()
    with pytest.raises(ConfigError, match="unknown stage type 'recall.nope'"):
        FusedRecall(sources=[{"name": "a", "stages": [{"type": "recall.nope"}]}]).validate_params()
    with pytest.raises(ConfigError, match="weight must be a number >= 0"):
        FusedRecall(sources=[{"name": "a", "weight": -1, "stages": [{"type": "test.fixed_recall"}]}]).validate_params()


@pytest.mark.parametrize("check", [c for c in CHECKS if c != "cpu_gpu_parity"])
def test_fused_recall_conforms(check):
    CHECKS[check](StageCase(_fused(), QUERIES))


def _random_source(rng, name, n_queries=30, n_items=40):
    """A source's candidates as the fusion reads them: each query's items ranked by a random score."""
    import polars as pl

    rows = []
    for q in range(n_queries):
        items = rng.choice(n_items, int(rng.integers(0, 15)), replace=False)
        scores = np.sort(rng.random(len(items)).astype(np.float32))[::-1]
        rows += [(f"q{q}", int(i), float(s), r) for r, (i, s) in enumerate(zip(items, scores), start=1)]
    frame = pl.DataFrame(rows, schema={"query_id": pl.String, "item_id": pl.Int64, f"score_{name}": pl.Float32,
                                       f"rank_{name}": pl.Int32}, orient="row")
    return frame.with_columns((1.5 / (60 + pl.col(f"rank_{name}").cast(pl.Float64))).alias(f"__contrib_{name}"))


def test_joined_fusion_equals_the_grouped_one():
    """The fast path (a full join per source) gives the same rows as stacking and grouping."""
    rng = np.random.default_rng(0)
    names = ["a", "b", "c"]
    parts = [_random_source(rng, n) for n in names]
    key = ["query_id", "item_id"]
    def both(n):
        grouped = _fuse_grouped(parts[:n], names[:n]).sort(key)
        return _fuse_joined(parts[:n], names[:n]).sort(key).select(grouped.columns), grouped

    joined, grouped = both(2)
    assert joined.equals(grouped)
    # with three contributions the score may differ in the last bit of a float64 (the join adds
    # them in source order, the group-by in the order it meets them)
    joined, grouped = both(3)
    assert joined.drop("score").equals(grouped.drop("score"))
    np.testing.assert_allclose(joined["score"].to_numpy(), grouped["score"].to_numpy(), rtol=1e-12)
    duplicated = [parts[0].vstack(parts[0].head(3)), *parts[1:]]
    assert _fuse_joined(duplicated, names) is None  # a source repeating an item: the grouped path


def test_a_source_repeating_an_item_still_fuses():
    fused = FusedRecall(sources=[{"name": "a", "stages": [
        {"type": "test.fixed_recall", "params": {"items": [1, 1, 2], "scores": [0.9, 0.5, 0.1]}}]}])
    q1 = [r for r in fused(QUERIES).to_pylist() if r["query_id"] == "q1"]
    assert [(r["item_id"], r["source"]) for r in q1] == [(1, "a+a"), (2, "a")]


class _Given:
    """A source that returns a given table (its stages declare no columns)."""

    def __init__(self, table):
        self.table, self.stages = table, []

    def __call__(self, _):
        return self.table


def _reference_fuse(stage, table, found):
    """The fusion written as one Polars group-by (the stage's earlier code): the reference."""
    import polars as pl

    names = [n for n, _, _ in stage._pipelines()]
    query_cols = [c for c in table.column_names if c not in ("item_id", "score", "rank", "source")]
    queries = pl.from_arrow(table.select(query_cols)).with_row_index("__qpos")
    parts = []
    for (name, weight, _), out in zip(stage._pipelines(), found):
        got = pl.from_arrow(out.select(["query_id", "item_id", "score", "rank"]))
        if stage.method == "rrf":
            contrib = weight / (stage.rrf_k + pl.col("rank").cast(pl.Float64))
        else:
            lo, hi = pl.col("score").min().over("query_id"), pl.col("score").max().over("query_id")
            contrib = weight * pl.when(hi > lo).then((pl.col("score") - lo) / (hi - lo)).otherwise(1.0)
        parts.append(got.with_columns(contrib.alias("__c"), pl.lit(name).alias("__src"))
                     .rename({"score": f"score_{name}", "rank": f"rank_{name}"}))
    fused = (pl.concat(parts, how="diagonal_relaxed").group_by(["query_id", "item_id"], maintain_order=True)
             .agg(pl.col("__c").sum().alias("score"), pl.col("__src").str.join("+").alias("source"),
                  *[pl.col(f"{c}_{n}").drop_nulls().first() for n in names for c in ("score", "rank")])
             .with_columns(pl.col("score").cast(pl.Float32))
             .sort(["query_id", "score", "item_id"], descending=[False, True, False])
             .with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int32).over("query_id").alias("rank"))
             .filter(pl.col("rank") <= stage.k))
    out = (queries.join(fused, on="query_id", how="inner").sort(["__qpos", "rank"]).drop("__qpos")
           .with_columns([pl.col(f"score_{n}").cast(pl.Float32) for n in names]
                         + [pl.col(f"rank_{n}").cast(pl.Int32) for n in names]))
    return out.select(query_cols + ["item_id", "score", "rank", "source"]
                      + [c for n in names for c in (f"score_{n}", f"rank_{n}")]).to_arrow()


@pytest.mark.parametrize("method,k,ids", [("rrf", 500, "int"), ("rrf", 7, "str"), ("weighted", 12, "int"),
                                          ("weighted", 500, "str")])
def test_fusion_equals_the_group_by_reference(method, k, ids):
    """The fusion gives exactly the table of one Polars group-by: scores, ranks, ties
    (broken by item id), provenance, per-source columns, queries a source misses, queries no source finds."""
    rng = np.random.default_rng(7)
    queries = pa.table({"query_id": pa.array([5, 3, 9, 4, 8, 1], pa.int64()), "query": list("abcdef")})
    found = []
    for n_hits in (40, 25, 10):
        rows = {"query_id": [], "item_id": [], "score": [], "rank": []}
        for q in (5, 3, 9, 8, 1):
            if rng.random() < 0.2:
                continue  # this source finds nothing for q
            items = rng.choice(60, size=n_hits, replace=False)
            scores = np.sort(np.round(rng.random(n_hits), 1))[::-1]  # rounded: many equal scores
            rows["query_id"] += [q] * n_hits
            rows["item_id"] += [f"i{i:02d}" if ids == "str" else int(i) for i in items]
            rows["score"] += scores.tolist()
            rows["rank"] += list(range(1, n_hits + 1))
        found.append(pa.table({"query_id": pa.array(rows["query_id"], pa.int64()), "item_id": rows["item_id"],
                               "score": pa.array(rows["score"], pa.float32()), "rank": pa.array(rows["rank"], pa.int32())}))
    stage = FusedRecall(method=method, k=k, sources=[
        {"name": n, "weight": w, "stages": [{"type": "test.fixed_recall", "params": {"items": [1], "scores": [1.0]}}]}
        for n, w in (("dense", 1.0), ("bm25", 0.7), ("base", 0.3))])
    want = _reference_fuse(stage, queries, found)
    stage._built = [(n, w, _Given(t)) for (n, w, _), t in zip(stage._pipelines(), found)]
    got = stage.transform(queries)
    assert got.column_names == want.column_names
    for name in want.column_names:
        if name == "score":  # three float contributions summed in another order: the last float32 bit may differ
            np.testing.assert_allclose(got.column(name).to_numpy(), want.column(name).to_numpy(), rtol=1e-6)
        else:
            assert got.column(name).to_pylist() == want.column(name).to_pylist(), name
