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
