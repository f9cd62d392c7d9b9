"""Metrics against values worked out by hand (Home Depot protocol: gain = relevance - 1,
relevant = relevance >= 2.67)."""

import math

import polars as pl
import pyarrow as pa
import pytest

from pipeline.errors import DataError
from pipeline.metrics import BINARY, HOME_DEPOT, ZERO_BASED, coverage, evaluate, label_scale, per_query, recall_at_k

# q1: judged a..e; the run shows b, x (unjudged), a, c, d; e is never retrieved.
# q2: judged f, g, nothing reaches 2.67 -> left out of binary metrics, kept in NDCG (f gains 1).
# q3: judged h = 3 but absent from the run -> 0 everywhere, still counted.
# q4: only an irrelevant judgment (gain 0, nothing relevant) -> left out of everything.
# q9: in the run, not judged -> ignored.
JUDGED = [
    (1, 1, 3.0),   # a  gain 2     relevant
    (1, 2, 2.33),  # b  gain 1.33
    (1, 3, 1.0),   # c  gain 0
    (1, 4, 2.67),  # d  gain 1.67  relevant
    (1, 5, 1.67),  # e  gain 0.67
    (2, 6, 2.0),   # f  gain 1
    (2, 7, 1.0),   # g  gain 0
    (3, 8, 3.0),   # h
    (4, 9, 1.0),   # i
]
RUN = [
    (1, 2, 0.9),   # rank 1: b
    (1, 99, 0.8),  # rank 2: x, unjudged
    (1, 1, 0.7),   # rank 3: a
    (1, 3, 0.6),   # rank 4: c
    (1, 4, 0.5),   # rank 5: d
    (2, 7, 0.9),   # rank 1: g
    (2, 6, 0.8),   # rank 2: f
    (9, 1, 1.0),
]

# NDCG@3, q1: DCG = 1.33/log2(2) + 0/log2(3) + 2/log2(4) = 2.33;
#             IDCG = 2/log2(2) + 1.67/log2(3) + 1.33/log2(4) (gains 2, 1.67, 1.33 in order)
NDCG3_Q1 = (1.33 + 2 / 2) / (2 + 1.67 / math.log2(3) + 1.33 / 2)
# NDCG@3, q2: DCG = 0 + 1/log2(3); IDCG = 1
NDCG3_Q2 = 1 / math.log2(3)
EXPECTED = {
    "ndcg@3": (NDCG3_Q1 + NDCG3_Q2 + 0) / 3,  # q1, q2, q3
    # binary metrics over q1 and q3; q1's relevant items a and d sit at ranks 3 and 5
    "recall@3": (1 / 2 + 0) / 2,
    "recall@5": (2 / 2 + 0) / 2,
    "mrr@3": (1 / 3 + 0) / 2,
    "map@3": ((1 / 3) / 2 + 0) / 2,  # AP@3 = P@3 / R
    "map@5": ((1 / 3 + 2 / 5) / 2 + 0) / 2,  # AP@5 = (P@3 + P@5) / R = 11/30
    "precision@3": (1 / 3 + 0) / 2,
    "precision@5": (2 / 5 + 0) / 2,
    "queries": 3,
    "queries_relevant": 2,
}
METRICS = ("ndcg", "recall", "mrr", "map", "precision")


def tables(item_type=pa.int64(), item_col="item_id"):
    cast = str if item_type == pa.string() else int
    judgments = pa.table({
        "query_id": [q for q, _, _ in JUDGED],
        item_col: pa.array([cast(d) for _, d, _ in JUDGED], type=item_type),
        "relevance": [r for _, _, r in JUDGED],
    })
    run = pa.table({
        "query_id": [q for q, _, _ in RUN],
        "item_id": pa.array([cast(d) for _, d, _ in RUN], type=item_type),
        "score": [s for _, _, s in RUN],
    })
    return run, judgments


def check(result):
    for name, value in EXPECTED.items():
        assert result[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_hand_computed_case():
    run, judgments = tables()
    check(evaluate(run, judgments, k_values=(3, 5), metrics=METRICS))


def test_dcg_is_unscaled_and_bad_names_are_refused():
    run, judgments = tables()
    result = evaluate(run, judgments, k_values=3, metrics="dcg")
    assert result["dcg@3"] == pytest.approx((2.33 + 1 / math.log2(3) + 0) / 3)  # q1, q2, q3
    for bad in ("ndcg_burges", "ndcg@10"):
        with pytest.raises(ValueError, match=bad):
            evaluate(run, judgments, metrics=(bad,))


def test_default_keys():
    run, judgments = tables()
    result = evaluate(run, judgments)
    assert set(result) == {f"{m}@{k}" for m in METRICS for k in (10, 100)} | {
        "queries", "queries_relevant", "queries_judged", "queries_in_run"}
    assert (result["queries_judged"], result["queries_in_run"]) == (4, 2)  # q3 and q4 are not in the run
    assert result["recall@100"] == pytest.approx(0.5)  # q1 finds both, q3 nothing


def test_string_ids_and_mixed_ids():
    run, judgments = tables(pa.string())
    check(evaluate(run, judgments, k_values=(3, 5)))
    int_run, _ = tables()
    check(evaluate(int_run, judgments, k_values=(3, 5)))  # int run against str judgments
    str_queries = judgments.set_column(0, "query_id", pa.array([str(q) for q, _, _ in JUDGED]))
    check(evaluate(run, str_queries, k_values=(3, 5)))


def test_product_id_alias_and_polars_input():
    run, judgments = tables(item_col="product_id")
    check(evaluate(run, judgments, k_values=(3, 5)))
    check(evaluate(pl.from_arrow(run), pl.from_arrow(judgments), k_values=(3, 5)))


def test_custom_column_names():
    run, judgments = tables()
    run = run.rename_columns(["qid", "doc", "s"])
    judgments = judgments.rename_columns(["qid", "doc", "label"])
    result = evaluate(run, judgments, k_values=(3, 5), query_col="qid", item_col="doc", score_col="s",
                      relevance_col="label")
    check(result)


def test_threshold_compares_two_decimals():
    # 8/3 (mean of three raters) is 2.67 on the Home Depot scale
    judgments = pa.table({"query_id": [1], "item_id": [1], "relevance": [8 / 3]})
    run = pa.table({"query_id": [1], "item_id": [1], "score": [1.0]})
    assert evaluate(run, judgments, k_values=(1,))["recall@1"] == 1.0
    assert evaluate(run, judgments, k_values=(1,), relevant_threshold=3.0)["queries_relevant"] == 0


def test_ties_keep_run_order_and_duplicates_keep_best():
    judgments = pa.table({"query_id": [1], "item_id": [2], "relevance": [3.0]})
    first = pa.table({"query_id": [1, 1], "item_id": [2, 1], "score": [0.5, 0.5]})
    second = pa.table({"query_id": [1, 1], "item_id": [1, 2], "score": [0.5, 0.5]})
    assert evaluate(first, judgments, k_values=(2,), metrics=("mrr",))["mrr@2"] == 1.0
    assert evaluate(second, judgments, k_values=(2,), metrics=("mrr",))["mrr@2"] == 0.5
    dup = pa.table({"query_id": [1, 1, 1], "item_id": [2, 1, 2], "score": [0.9, 0.5, 0.1]})
    assert evaluate(dup, judgments, k_values=(2,), metrics=("mrr",))["mrr@2"] == 1.0


def test_gain_offset_scales_out():
    # with gain = relevance (offset 0), q4's irrelevant item now gains 1 and q4 counts
    run, judgments = tables()
    result = evaluate(run, judgments, k_values=(3,), metrics=("ndcg",), gain_offset=0.0)
    assert result["queries"] == 4
    q1 = (2.33 + 3 / 2) / (3 + 2.67 / math.log2(3) + 2.33 / 2)
    q2 = (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3))
    assert result["ndcg@3"] == pytest.approx((q1 + q2 + 0 + 0) / 4, rel=1e-9)


def test_empty_run_scores_zero():
    _, judgments = tables()
    empty = pa.table({"query_id": pa.array([], pa.int64()), "item_id": pa.array([], pa.int64()),
                      "score": pa.array([], pa.float64())})
    result = evaluate(empty, judgments, k_values=(3,))
    assert result["ndcg@3"] == 0.0 and result["recall@3"] == 0.0 and result["queries"] == 3


def test_per_query_and_recall_at_k():
    run, judgments = tables()
    table = per_query(run, judgments, k_values=(3, 5))
    assert table.column("query_id").to_pylist() == [1, 2, 3, 4]
    assert table.column("ndcg@3").to_pylist()[:3] == pytest.approx([NDCG3_Q1, NDCG3_Q2, 0.0])
    assert table.column("ndcg@3").to_pylist()[3] is None  # q4: nothing to gain
    assert table.column("recall@5").to_pylist() == [1.0, None, 0.0, None]
    means = evaluate(run, judgments, k_values=(3, 5))
    for name in table.column_names[1:]:
        assert pl.from_arrow(table)[name].mean() == pytest.approx(means[name])
    assert recall_at_k(run, judgments, 3) == pytest.approx(EXPECTED["recall@3"])


def test_missing_column_is_reported():
    run, judgments = tables()
    with pytest.raises(DataError, match="'relevance' in the judgments"):
        evaluate(run, judgments.drop_columns(["relevance"]))
    with pytest.raises(DataError, match="'score' in the run"):
        evaluate(run.drop_columns(["score"]), judgments)


def test_coverage():
    run, _ = tables()
    assert coverage(run, 20) == 7 / 20  # items 1, 2, 3, 4, 6, 7, 99
    with pytest.raises(ValueError, match="catalog_size"):
        coverage(run, 0)


def test_label_scale_is_detected():
    assert label_scale([0, 1, 1]) == BINARY and label_scale([1, 1]) == BINARY and label_scale([True, False]) == BINARY
    assert label_scale([1.0, 2.33, 3.0]) == HOME_DEPOT and label_scale([2, 3]) == HOME_DEPOT
    assert label_scale([0, 2, 4]) == ZERO_BASED
    for bad in ([1, 5], [-1, 1]):
        with pytest.raises(DataError, match="cannot tell the label scale .* give gain_offset and relevant_threshold"):
            label_scale(bad)
    with pytest.raises(DataError, match="must hold numbers .* found text such as 'high', 'low'"):
        label_scale(["high", "low", "3"])
    assert label_scale(["1", "3"]) == HOME_DEPOT  # numbers stored as text are read as numbers
    with pytest.raises(DataError, match="1 of 2 are null"):
        label_scale([1.0, None])


def test_binary_labels_score_with_default_options():
    run, judgments = tables()
    binary = judgments.set_column(2, "relevance", pa.array([1 if r >= 2.67 else 0 for _, _, r in JUDGED]))
    result = evaluate(run, binary, k_values=(3, 5), metrics=("recall", "ndcg"))
    assert result["recall@3"] == pytest.approx(EXPECTED["recall@3"]) and result["queries_relevant"] == 2
    assert result["queries"] == 2 and result["ndcg@5"] > 0


def test_queries_run_averages_over_the_covered_queries():
    run, judgments = tables()
    result = evaluate(run, judgments, k_values=(3, 5), queries="run")
    assert result["recall@5"] == pytest.approx(1.0)  # q1 alone: q3 (judged, not in the run) left out
    assert result["queries_relevant"] == 1 and result["queries"] == 2
    assert per_query(run, judgments, k_values=(3,), queries="run").column("query_id").to_pylist() == [1, 2]
    with pytest.raises(ValueError, match="queries must be one of"):
        evaluate(run, judgments, queries="all")
