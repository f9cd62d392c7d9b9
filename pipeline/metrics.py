"""Offline evaluation of a ranked run against graded judgments, computed by ``ranx``.

A *run* is a long-form table, one row per (query, item) with a score (higher is better); a
*judgments* table gives a graded ``relevance`` per judged (query, item). The protocol is the one
used to report Home Depot results (``../shared/data/README.md``):

* **Graded metrics** (``ndcg``, ``dcg``) use the gain ``relevance - gain_offset``, so an
  irrelevant judged item (relevance 1) and every unjudged item gain 0. They are ranx's
  Järvelin-Kekäläinen forms, linear in the gain; the exponential ``ndcg_burges`` would need
  integer grades and is refused.
* **Binary metrics** (``recall``, ``mrr``, ``map``, ``precision`` and ranx's other binary ones)
  count a judged item as relevant when its relevance, rounded to two decimals, is at least
  ``relevant_threshold``: the mean of three raters 8/3 counts as 2.67.

**Label scale.** Left unset (``None``), ``gain_offset`` and ``relevant_threshold`` follow the
scale of the judgments' labels (:func:`label_scale`): 0/1 labels are binary (gain = label, relevant
= 1); labels from 1 to 3 are the Home Depot scale (gain = relevance - 1, relevant >= 2.67); other
labels starting at 0 are 0-based grades such as 0-4 (gain = grade, relevant >= 1, as trec_eval).
Any other range is refused with a :class:`~pipeline.errors.DataError` that asks for both values,
and so are labels that are not numbers ("high") and null labels.

Which queries count:

* ``queries="judged"`` (the default here): the judgments' query set. Queries of the run that
  have no judgments are ignored; judged queries missing from the run score 0 on every metric.
  ``queries="run"`` (``funnel eval``'s default): only the judged queries that appear in the run,
  for a run made on a part of the judged queries. The result says how many judged queries there
  are (``queries_judged``) and how many of them the run covers (``queries_in_run``).
* A graded metric averages over the queries with at least one judged item of positive gain; a
  binary metric over the queries with at least one relevant item. A query with nothing to find
  says nothing about the ranking, and counting it as 0 (or 1) would only shift the mean. The
  result reports both counts (``queries``, ``queries_relevant``).

Run rows are ordered by score, ties kept in the order of the run table, and a repeated
(query, item) row keeps its best position; repeated judgments are averaged. Ids may be integers
or strings (they are compared as text); a judgments table with ``product_id`` instead of
``item_id`` (the Home Depot files) is accepted as is.

How ranx is fed: ranx stores judgments as int64 (``Qrels`` truncates floats), so graded gains go
in scaled by :data:`GAIN_SCALE` and rounded, which leaves NDCG unchanged (it is a ratio of sums
linear in the gain) up to a 1e-3 rounding of each gain, and DCG is divided back; binary metrics
get their own qrels of 1s.
Run scores are replaced by ``-position`` after the tie-break above, because ranx sorts ties in
no fixed order. ranx is imported on first use (it takes ~1.5 s to import); its numba kernels
compile on the very first call (~30 s) and load from numba's disk cache in later processes (~3 s).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import polars as pl
import pyarrow as pa

from .errors import DataError

__all__ = ["GAIN_SCALE", "GRADED_METRICS", "LabelScale", "label_scale", "evaluate", "per_query", "recall_at_k",
           "coverage"]

#: Factor applied to ``relevance - gain_offset`` before ranx rounds it to an integer.
GAIN_SCALE = 1000
#: Metrics computed from graded gains; every other ranx metric is computed from binary labels.
GRADED_METRICS = frozenset({"ndcg", "dcg"})
_REFUSED = frozenset({"ndcg_burges", "dcg_burges"})
#: Alias accepted for the item column of judgments (the Home Depot files use it).
ITEM_ALIAS = "product_id"


#: Which queries a metric is averaged over: the judged ones, or the judged ones the run covers.
QUERY_SETS = ("judged", "run")


@dataclass(frozen=True)
class LabelScale:
    """How relevance labels turn into gains and relevant/not: ``gain = relevance - gain_offset``."""

    name: str
    gain_offset: float
    relevant_threshold: float

    def describe(self) -> str:
        offset = f"relevance - {self.gain_offset:g}" if self.gain_offset else "relevance"
        return f"{self.name} labels: gain = {offset}, relevant at >= {self.relevant_threshold:g}"


BINARY = LabelScale("binary 0/1", 0.0, 1.0)
HOME_DEPOT = LabelScale("1-3 graded (Home Depot)", 1.0, 2.67)
ZERO_BASED = LabelScale("0-based graded", 0.0, 1.0)
SCALE_OPTIONS = "gain_offset and relevant_threshold (funnel eval: --gain-offset and --relevant-threshold)"


def _numeric_relevance(values: pl.Series, what: str) -> pl.Series:
    """``values`` as float64, or a DataError naming what the labels should be and what they are."""
    col = values.name
    if values.dtype == pl.Boolean or values.dtype.is_numeric():
        out = values.cast(pl.Float64)
    else:
        out = values.cast(pl.Float64, strict=False) if values.dtype in (pl.String, pl.Categorical) else None
        bad = values if out is None else values.filter(out.is_null() & values.is_not_null())
        if out is None or len(bad):
            examples = ", ".join(repr(v) for v in bad.cast(pl.String).unique(maintain_order=True).head(3).to_list())
            found = "text" if values.dtype in (pl.String, pl.Categorical) else f"{values.dtype} values"
            raise DataError(f"column '{col}' of the {what} must hold numbers (0/1, or grades such as 1-3); "
                            f"found {found} such as {examples}")
    nulls = out.null_count() + int(out.is_nan().sum())
    if nulls:
        raise DataError(f"column '{col}' of the {what} must hold a number in every row; {nulls} of {len(out)} "
                        "are null or NaN")
    return out


def label_scale(relevance, what: str = "judgments") -> LabelScale:
    """The scale of ``relevance`` labels (a polars/Arrow column or a sequence); see the module docstring.

    Raises :class:`~pipeline.errors.DataError` for labels that are not numbers, nulls, and a range
    that fits no known scale.
    """
    values = _numeric_relevance(relevance if isinstance(relevance, pl.Series) else pl.Series("relevance", relevance),
                                what)
    if len(values) == 0:
        raise DataError(f"the {what} have no rows")
    low, high = float(values.min()), float(values.max())
    if values.is_in([0.0, 1.0]).all():
        return BINARY
    if low >= 1 and high <= 3:
        return HOME_DEPOT
    if low == 0:
        return ZERO_BASED
    raise DataError(f"cannot tell the label scale of the {what}: '{values.name}' runs from {low:g} to {high:g}, "
                    f"which is neither 0/1, 1-3 nor 0-based grades; give {SCALE_OPTIONS}")


def _frame(table, name: str, columns: dict[str, str]) -> pl.DataFrame:
    """``table`` (Arrow or polars) as a polars frame with ``columns`` renamed to their keys."""
    frame = table if isinstance(table, pl.DataFrame) else pl.from_arrow(table)
    for col in columns.values():
        if col not in frame.columns:
            raise DataError(f"evaluation needs column '{col}' in the {name} but it has only: {', '.join(frame.columns)}")
    return frame.select(pl.col(col).alias(key) for key, col in columns.items())


def _qrels_and_runs(run, judgments, *, gain_offset, relevant_threshold, queries, query_col, item_col, score_col,
                    relevance_col):
    """ranx inputs: graded and binary qrels as dicts, the run as a dict, the query ids by text, and
    the number of judged queries and of those the run covers."""
    if queries not in QUERY_SETS:
        raise ValueError(f"evaluate's queries must be one of {QUERY_SETS}; got {queries!r}")
    names = judgments.columns if isinstance(judgments, pl.DataFrame) else judgments.column_names
    judged_item = ITEM_ALIAS if item_col not in names and ITEM_ALIAS in names else item_col
    judged = _frame(judgments, "judgments", {"q": query_col, "d": judged_item, "rel": relevance_col})
    ranked = _frame(run, "run", {"q": query_col, "d": item_col, "s": score_col})
    rel = _numeric_relevance(judged["rel"].alias(relevance_col), "judgments")
    if gain_offset is None or relevant_threshold is None:
        scale = label_scale(rel)
        gain_offset = scale.gain_offset if gain_offset is None else gain_offset
        relevant_threshold = scale.relevant_threshold if relevant_threshold is None else relevant_threshold

    query_ids = {str(q): q for q in judged["q"].unique(maintain_order=True).to_list()}
    in_run = set(ranked["q"].cast(pl.Utf8).unique().to_list()) & set(query_ids)
    counts = (len(query_ids), len(in_run))
    if queries == "run":
        query_ids = {k: v for k, v in query_ids.items() if k in in_run}
    judged = (
        judged.with_columns(pl.col("q").cast(pl.Utf8), pl.col("d").cast(pl.Utf8), rel.alias("rel"))
        .filter(pl.col("q").is_in(list(query_ids)))
        .group_by("q", "d", maintain_order=True).agg(pl.col("rel").mean())
        .with_columns(
            gain=((pl.col("rel") - gain_offset) * GAIN_SCALE).round(0).cast(pl.Int64),
            relevant=pl.col("rel").round(2) >= relevant_threshold - 1e-9,
        )
    )
    graded: dict[str, dict[str, int]] = {}
    for q, d, g in judged.filter(pl.col("gain") > 0).select("q", "d", "gain").iter_rows():
        graded.setdefault(q, {})[d] = g
    binary: dict[str, dict[str, int]] = {}
    for q, d in judged.filter(pl.col("relevant")).select("q", "d").iter_rows():
        binary.setdefault(q, {})[d] = 1

    ranked = (
        ranked.with_columns(pl.col("q").cast(pl.Utf8), pl.col("s").cast(pl.Float64))
        .filter(pl.col("q").is_in(list(query_ids)) & pl.col("s").is_not_null() & pl.col("s").is_not_nan())
        .sort(["q", "s"], descending=[False, True], maintain_order=True)
        .unique(["q", "d"], keep="first", maintain_order=True)
        .with_columns(pl.col("d").cast(pl.Utf8))
    )
    runs: dict[str, dict[str, float]] = {}
    for q, d in ranked.select("q", "d").iter_rows():
        docs = runs.setdefault(q, {})
        docs[d] = -float(len(docs))
    return graded, binary, runs, query_ids, counts


def _ranx_scores(qrels: dict, runs: dict, metrics: list[str]) -> dict[str, dict[str, float]]:
    """Per-query ranx scores, ``{metric: {query: score}}``, over the queries of ``qrels``."""
    if not qrels or not metrics:
        return {m: {} for m in metrics}
    # judged queries missing from the run get an empty ranking (added here: ranx's own
    # ``make_comparable`` edits numba dicts from Python, which recompiles in every process)
    ranked = {q: runs.get(q, {}) for q in qrels}
    if not any(ranked.values()):
        return {m: dict.fromkeys(qrels, 0.0) for m in metrics}
    import numba
    from ranx import Qrels, Run
    from ranx import evaluate as ranx_evaluate

    threads = numba.get_num_threads()  # ranx drops numba to one thread for < 10 queries, for good
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="unsafe cast")  # raised while numba compiles ranx
            ranx_run = Run(ranked)
            # a one-metric list trips ranx 0.3 (``return_mean=False`` then looks up a stripped
            # name), so a single metric goes in twice
            names = metrics if len(metrics) > 1 else metrics * 2
            scores = ranx_evaluate(Qrels(qrels), ranx_run, names, return_mean=False, save_results_in_run=False)
    finally:
        numba.set_num_threads(threads)
    order = list(ranx_run.get_query_ids())
    out = {}
    for m, s in scores.items():
        s = np.asarray(s, dtype=np.float64) / (GAIN_SCALE if m.startswith("dcg@") else 1)
        out[m] = dict(zip(order, s.tolist()))
    return out


def _scores(run, judgments, *, k_values, metrics, gain_offset, relevant_threshold, queries, query_col, item_col,
            score_col, relevance_col):
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    ks = [k_values] if isinstance(k_values, int) else list(k_values)
    if not metrics or not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"evaluate needs at least one metric and every k >= 1; got metrics={metrics!r}, k={ks!r}")
    refused = [m for m in metrics if m in _REFUSED or "@" in m]
    if refused:
        raise ValueError(f"evaluate takes ranx metric names without '@k' and with linear gains; got {refused!r}")
    graded, binary, runs, query_ids, counts = _qrels_and_runs(
        run, judgments, gain_offset=gain_offset, relevant_threshold=relevant_threshold, queries=queries,
        query_col=query_col, item_col=item_col, score_col=score_col, relevance_col=relevance_col,
    )
    names_graded = [f"{m}@{k}" for m in metrics if m in GRADED_METRICS for k in ks]
    names_binary = [f"{m}@{k}" for m in metrics if m not in GRADED_METRICS for k in ks]
    per_metric = {**_ranx_scores(graded, runs, names_graded), **_ranx_scores(binary, runs, names_binary)}
    ordered = [f"{m}@{k}" for m in metrics for k in ks]
    return {n: per_metric[n] for n in ordered}, query_ids, len(graded), len(binary), counts


def evaluate(
    run,
    judgments,
    *,
    k_values: Iterable[int] = (10, 100),
    metrics: Iterable[str] = ("ndcg", "recall", "mrr", "map", "precision"),
    gain_offset: float | None = None,
    relevant_threshold: float | None = None,
    queries: str = "judged",
    query_col: str = "query_id",
    item_col: str = "item_id",
    score_col: str = "score",
    relevance_col: str = "relevance",
) -> dict[str, float]:
    """Mean of each ``metric@k`` over the judged queries, plus the number of queries behind them.

    ``run`` and ``judgments`` are Arrow tables (polars frames work too); ``metrics`` are ranx
    metric names. Returns ``{"ndcg@10": ..., "recall@100": ..., "queries": n, "queries_relevant": m,
    "queries_judged": j, "queries_in_run": r}`` where ``queries`` counts the queries averaged by
    graded metrics, ``queries_relevant`` those averaged by binary metrics, ``queries_judged`` the
    judged queries and ``queries_in_run`` those of them the run covers (see the module docstring
    for these and for ``gain_offset``/``relevant_threshold`` left at ``None``: taken from the label
    scale). A metric with no query to average is NaN.
    """
    scores, _, n_graded, n_binary, (n_judged, n_in_run) = _scores(
        run, judgments, k_values=k_values, metrics=metrics, gain_offset=gain_offset,
        relevant_threshold=relevant_threshold, queries=queries, query_col=query_col, item_col=item_col,
        score_col=score_col, relevance_col=relevance_col,
    )
    out = {name: float(np.mean(list(s.values()))) if s else float("nan") for name, s in scores.items()}
    out["queries"] = n_graded
    out["queries_relevant"] = n_binary
    out["queries_judged"] = n_judged
    out["queries_in_run"] = n_in_run
    return out


def per_query(
    run,
    judgments,
    *,
    k_values: Iterable[int] = (10, 100),
    metrics: Iterable[str] = ("ndcg", "recall", "mrr", "map", "precision"),
    gain_offset: float | None = None,
    relevant_threshold: float | None = None,
    queries: str = "judged",
    query_col: str = "query_id",
    item_col: str = "item_id",
    score_col: str = "score",
    relevance_col: str = "relevance",
) -> pa.Table:
    """One row per judged query (``query_col`` as in the judgments) and one column per ``metric@k``.

    A query left out of a metric's average (no positive gain, or no relevant item) has a null there;
    the column means over non-null rows equal :func:`evaluate`'s results.
    """
    scores, query_ids, _, _, _ = _scores(
        run, judgments, k_values=k_values, metrics=metrics, gain_offset=gain_offset,
        relevant_threshold=relevant_threshold, queries=queries, query_col=query_col, item_col=item_col,
        score_col=score_col, relevance_col=relevance_col,
    )
    columns = {query_col: list(query_ids.values())}
    for name, s in scores.items():
        columns[name] = pa.array([s.get(q) for q in query_ids], type=pa.float64())
    return pa.table(columns)


def recall_at_k(run, judgments, k: int = 100, **kwargs) -> float:
    """Recall@k alone; keyword arguments as for :func:`evaluate`."""
    return evaluate(run, judgments, k_values=(k,), metrics=("recall",), **kwargs)[f"recall@{k}"]


def coverage(run, catalog_size: int, *, item_col: str = "item_id") -> float:
    """Fraction of the catalog's ``catalog_size`` items that appear at least once in ``run``."""
    if catalog_size <= 0:
        raise ValueError(f"coverage needs catalog_size >= 1; got {catalog_size}")
    frame = _frame(run, "run", {"d": item_col})
    return frame["d"].drop_nulls().n_unique() / catalog_size
