"""Per-stage recall funnel: recall after each stage and which stage lost each relevant item."""

from __future__ import annotations

import json

import polars as pl
import pyarrow as pa
import pytest
from click.testing import CliRunner

from pipeline import ANY, Pipeline, Stage, StageTags, register_stage
from pipeline.cli import main
from pipeline.funnel_eval import BELOW_CUT, FILTERED, NOT_RETRIEVED, funnel_eval
from pipeline.metrics import evaluate
from stages.display import TopNDisplay
from stages.rules import RuleFilter


@register_stage
class ListRecall(Stage):
    """Test double: items 1..5 at ranks 1..5 for every query, with a ``keep`` flag per item."""

    name = "test.list_recall"
    input_schema = pa.schema([pa.field("query_id", ANY)])
    output_schema = pa.schema([pa.field("item_id", pa.int64()), pa.field("score", pa.float32()),
                               pa.field("rank", pa.int32()), pa.field("keep", pa.bool_())])
    tags = StageTags(level="query")

    def __init__(self, drop: list | None = None):
        self.drop = drop

    def transform(self, table):
        rows = [{"query_id": q, "item_id": i, "score": float(6 - i), "rank": i, "keep": i not in (self.drop or [])}
                for q in table.column("query_id").to_pylist() for i in range(1, 6)]
        return pa.Table.from_pylist(rows, schema=pa.schema([table.schema.field("query_id"), *self.output_schema]))


@register_stage
class ReverseRanker(Stage):
    """Test double for a re-ranker: reverses each query's order."""

    name = "test.reverse_ranker"
    input_schema = pa.schema([pa.field("query_id", ANY), pa.field("rank", pa.int32())])
    output_schema = pa.schema([pa.field("rank", pa.int32()), pa.field("score", pa.float32())])

    def transform(self, table):
        frame = pl.from_arrow(table)
        frame = frame.with_columns((pl.col("rank").max().over("query_id") + 1 - pl.col("rank")).cast(pl.Int32).alias("rank"))
        frame = frame.with_columns((-pl.col("rank")).cast(pl.Float32).alias("score"))
        return frame.sort(["query_id", "rank"]).to_arrow()


def _pipe():
    return Pipeline([ListRecall(drop=[2]), RuleFilter(rules=[{"column": "keep", "op": "eq", "value": True}]),
                     ReverseRanker(), TopNDisplay(n=3)])


def test_each_lost_item_is_blamed_on_the_stage_that_lost_it():
    queries = pa.table({"query_id": ["q1", "q2"], "query": ["a", "b"]})
    judgments = pa.table({"query_id": ["q1"] * 5 + ["q2"], "item_id": [1, 2, 5, 9, 3, 4],
                          "relevance": [3.0, 3.0, 2.67, 3.0, 1.0, 3.0]})
    report = funnel_eval(_pipe(), queries, judgments, ks=(2,), progress=False)
    lost = {(r["query_id"], r["item_id"]): (r["step"], r["reason"]) for r in report.lost.to_dicts()}
    assert lost == {("q1", "9"): (1, NOT_RETRIEVED),       # never returned by recall
                    ("q1", "2"): (2, FILTERED),            # in the cut after recall, removed by the rule
                    ("q1", "1"): (3, BELOW_CUT)}           # rank 1 after recall, moved to the bottom by the ranker
    recall = [s.get("recall", {}).get(2) for s in report.stages]
    assert recall == pytest.approx([(2 / 4 + 0) / 2, (1 / 4 + 0) / 2, (1 / 4 + 1) / 2, (1 / 4 + 1) / 2])
    assert report.stages[0]["lost"][2] == {NOT_RETRIEVED: 1, FILTERED: 0, BELOW_CUT: 0}
    assert report.queries_relevant == 2 and report.relevant_items == 5

    final = _pipe()(queries)
    assert evaluate(final, judgments, k_values=(2,), metrics=("recall",))["recall@2"] == pytest.approx(recall[-1])
    text = report.to_text()
    assert "test.reverse_ranker" in text and "not retr." in text
    json.dumps(report.to_dict())


def test_never_in_the_cut_is_blamed_on_the_last_scoring_stage_that_had_it():
    queries = pa.table({"query_id": [1], "query": ["a"]})
    judgments = pa.table({"query_id": [1, 1], "item_id": [3, 4], "relevance": [3.0, 3.0]})
    # item 3 stays third through recall, the (reversing) ranker and the display; item 4 is second
    # after the ranker: both below the cut at 1, blamed on the ranker, not on the display that shows them
    pipe = Pipeline([ListRecall(), ReverseRanker(), TopNDisplay(n=4)])
    report = funnel_eval(pipe, queries, judgments, ks=(1,), progress=False)
    assert {(r["item_id"], r["step"], r["reason"]) for r in report.lost.to_dicts()} == {("3", 2, BELOW_CUT),
                                                                                      ("4", 2, BELOW_CUT)}
    # without a ranker, an item cut off by the display is blamed on recall, which ranked it fourth
    report = funnel_eval(Pipeline([ListRecall(), TopNDisplay(n=3)]), queries, judgments, ks=(1,), progress=False)
    assert {(r["item_id"], r["step"]) for r in report.lost.to_dicts()} == {("3", 1), ("4", 1)}
    assert report.stages[0]["recall_all"] == 1.0 and report.stages[1]["recall_all"] == 0.5


def test_long_tail_buckets_by_rarest_term():
    queries = pa.table({"query_id": [1, 2, 3, 4], "query": ["drill", "drill bit", "hose", "zzz"]})
    judgments = pa.table({"query_id": [1, 2, 3, 4], "item_id": [1, 5, 2, 9], "relevance": [3.0] * 4})
    report = funnel_eval(Pipeline([ListRecall()]), queries, judgments, ks=(1, 5), progress=False, buckets=2,
                         catalog_texts=["cordless drill", "drill bit set", "garden hose", "drill press"])
    assert [b["queries"] for b in report.long_tail] == [2, 2]
    assert report.long_tail[0]["min_df"] == 0 and report.long_tail[1]["max_df"] == 3  # 'zzz' is rarest, 'drill' commonest
    assert report.long_tail[0]["recall_first"][5] == 0.5   # 'zzz' (item 9 never found) and 'drill bit' / 'hose'


def test_cli_funnel_on_the_demo_shop(demo_shop, tmp_path):
    ranker = demo_shop / "artifacts" / "ranker"
    args = ["eval", "--funnel", demo_shop / "pipeline.toml", "--queries", ranker / "holdout_queries.parquet",
            "--judgments", ranker / "holdout_judgments.parquet", "--k", 10, "--json", tmp_path / "f.json", "--quiet"]
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "recall.faiss" in result.output and "long tail" in result.output
    report = json.loads((tmp_path / "f.json").read_text())
    names = [s["stage"] for s in report["stages"]]
    assert names[0] == "encode.sentence_transformers" and report["stages"][0]["level"] == "query"
    assert all(0 <= s["recall"]["10"] <= 1 for s in report["stages"] if s["level"] == "candidate")
    lost = sum(sum(s["lost"]["10"].values()) for s in report["stages"] if s["level"] == "candidate")
    assert lost == len(report["lost"])
    result = CliRunner().invoke(main, ["eval", "--judgments", str(ranker / "holdout_judgments.parquet")])
    assert result.exit_code == 2 and "exactly one of --run" in result.output
