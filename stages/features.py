"""Ranking features computed from candidates: the one place feature definitions live.

Each feature is a named Polars expression over the candidate rows plus two helper token-list
columns (query tokens and title tokens). The ranker records the names and order of the features
it was trained on; the pipeline checks them against what this stage produces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import polars as pl
import pyarrow as pa

from pipeline.columns import QUERY, QUERY_ID, RANK, SCORE
from pipeline.schema import ANY, keep_input_types
from pipeline.stage import Stage, StageTags

__all__ = ["TextMatchFeatures", "FEATURES", "FEATURE_PREFIX", "DEFAULT_FEATURES", "feature_column"]

FEATURE_PREFIX = "f_"
_TOKEN = r"[a-z0-9]+(?:[./][0-9]+)*"
_NUMBER = r"[0-9]+(?:[./][0-9]+)*"
_Q, _T = "__q_tokens", "__t_tokens"


def feature_column(name: str) -> str:
    return FEATURE_PREFIX + name


@dataclass(frozen=True)
class Feature:
    """A feature: the input columns it reads (via stage parameters) and its expression."""

    needs: tuple[str, ...]  # names of TextMatchFeatures parameters holding column names
    expr: Callable[["TextMatchFeatures"], pl.Expr]
    doc: str


def _tokens(col: str) -> pl.Expr:
    return pl.col(col).fill_null("").str.to_lowercase().str.extract_all(_TOKEN)


def _overlap() -> pl.Expr:
    return pl.col(_Q).list.set_intersection(pl.col(_T)).list.len()


def _safe_div(a: pl.Expr, b: pl.Expr) -> pl.Expr:
    return pl.when(b > 0).then(a / b).otherwise(0.0)


def _numbers(col: str) -> pl.Expr:
    return pl.col(col).fill_null("").str.to_lowercase().str.extract_all(_NUMBER)


def _mentions(col: str, query_col: str) -> pl.Expr:
    """The item's (lower-cased) attribute value occurs as a substring of the query."""
    value = pl.col(col).cast(pl.String).str.to_lowercase()
    return (value.is_not_null() & (value.str.len_chars() > 0)
            & pl.col(query_col).str.to_lowercase().str.contains(value, literal=True)).fill_null(False)


FEATURES: dict[str, Feature] = {
    "recall_score": Feature(("score_column",), lambda s: pl.col(s.score_column), "score given by recall"),
    "recall_rank": Feature(("rank_column",), lambda s: pl.col(s.rank_column), "rank given by recall"),
    "overlap": Feature(("query_column", "title_column"), lambda s: _overlap(), "query tokens found in the title"),
    "coverage": Feature(("query_column", "title_column"),
                        lambda s: _safe_div(_overlap(), pl.col(_Q).list.len()), "share of query tokens in the title"),
    "jaccard": Feature(("query_column", "title_column"),
                       lambda s: _safe_div(_overlap(), pl.col(_Q).list.concat(pl.col(_T)).list.unique().list.len()),
                       "Jaccard similarity of query and title token sets"),
    "title_len": Feature(("title_column",), lambda s: pl.col(_T).list.len(), "title length in tokens"),
    "query_len": Feature(("query_column",), lambda s: pl.col(_Q).list.len(), "query length in tokens"),
    "number_match": Feature(
        ("query_column", "title_column"),
        lambda s: _safe_div(_numbers(s.query_column).list.set_intersection(_numbers(s.title_column)).list.len(),
                            _numbers(s.query_column).list.len()),
        "share of the query's numbers (sizes, gauges, model numbers) found in the title"),
    "query_has_number": Feature(("query_column",), lambda s: _numbers(s.query_column).list.len() > 0,
                                "the query contains a number"),
    "brand_match": Feature(("query_column", "brand_column"), lambda s: _mentions(s.brand_column, s.query_column),
                           "the item's brand is mentioned in the query"),
    "color_match": Feature(("query_column", "color_column"), lambda s: _mentions(s.color_column, s.query_column),
                           "the item's colour is mentioned in the query"),
    "material_match": Feature(("query_column", "material_column"), lambda s: _mentions(s.material_column, s.query_column),
                              "the item's material is mentioned in the query"),
}

DEFAULT_FEATURES = ("recall_score", "recall_rank", "overlap", "coverage", "jaccard", "title_len", "query_len",
                    "number_match", "query_has_number", "brand_match")


class TextMatchFeatures(Stage):
    """Add ``f_<name>`` float32 feature columns for the learned ranker.

    ``features`` picks from :data:`FEATURES` (see each one's ``doc``); the columns each reads
    are set by the ``*_column`` parameters. Attribute columns that hold lists (colours,
    materials) should be joined to text before the lookup, or left out of ``features``.
    """

    name = "features.text"
    input_schema = pa.schema([pa.field(QUERY_ID, ANY)])
    tags = StageTags(level="candidate")

    def __init__(self, features: list[str] | tuple[str, ...] = DEFAULT_FEATURES, query_column: str = QUERY,
                 title_column: str = "title", brand_column: str = "brand", color_column: str = "color",
                 material_column: str = "material", score_column: str = SCORE, rank_column: str = RANK):
        self.features = features
        self.query_column = query_column
        self.title_column = title_column
        self.brand_column = brand_column
        self.color_column = color_column
        self.material_column = material_column
        self.score_column = score_column
        self.rank_column = rank_column

    def validate_params(self) -> None:
        super().validate_params()
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown or not self.features:
            raise self._bad_param("features", f"a non-empty list drawn from {', '.join(FEATURES)}")

    def required_columns(self) -> pa.Schema:
        cols = {QUERY_ID: ANY}
        for f in self.features:
            for param in FEATURES[f].needs:
                cols[getattr(self, param)] = ANY
        return pa.schema([pa.field(c, t) for c, t in cols.items()])

    def produced_columns(self) -> pa.Schema:
        return pa.schema([pa.field(feature_column(f), pa.float32()) for f in self.features])

    def transform(self, table: pa.Table) -> pa.Table:
        frame = pl.from_arrow(table)
        exprs = [FEATURES[f].expr(self).cast(pl.Float32).alias(feature_column(f)) for f in self.features]
        needs = {p for f in self.features for p in FEATURES[f].needs}
        helpers = []
        if "query_column" in needs:
            helpers.append(_tokens(self.query_column).alias(_Q))
        if "title_column" in needs:
            helpers.append(_tokens(self.title_column).alias(_T))
        out = frame.with_columns(helpers).with_columns(exprs).drop([_Q, _T], strict=False)
        return keep_input_types(out.to_arrow(), table.schema)
