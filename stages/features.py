"""Ranking features computed from candidates: the one place feature definitions live.

Each feature is a named Polars expression over the candidate rows plus two helper token-list
columns (query tokens and title tokens). Most features give one column ``f_<name>``; a few expand
into one column per recall source after ``recall.fused`` (``source_scores`` gives ``f_score_dense``,
``f_score_bm25`` ...). The ranker records the names and order of the features it was trained on;
the pipeline checks them against what this stage produces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import polars as pl
import pyarrow as pa

from pipeline.columns import QUERY, QUERY_ID, RANK, SCORE, SOURCE
from pipeline.schema import ANY, keep_input_types
from pipeline.stage import Stage, StageTags

__all__ = ["TextMatchFeatures", "FEATURES", "FEATURE_PREFIX", "DEFAULT_FEATURES", "feature_column", "per_distinct", "TITLE_CACHE_MAX"]

FEATURE_PREFIX = "f_"
_TOKEN = r"[a-z0-9]+(?:[./][0-9]+)*"
_NUMBER = r"[0-9]+(?:[./][0-9]+)*"
# helper columns, computed once per batch and only when a chosen feature reads them: query tokens,
# numbers, stems and distinct counts (once per distinct query text), the same per distinct title,
# then per row the token and stem overlaps
_Q, _T = "__q_tokens", "__t_tokens"
_QN, _TN = "__q_numbers", "__t_numbers"
_QS, _TS = "__q_stems", "__t_stems"
_QU, _TU, _QSU = "__q_distinct", "__t_distinct", "__q_distinct_stems"
_OV, _SOV = "__overlap", "__stem_overlap"
_HELPERS = (_Q, _T, _QN, _TN, _QS, _TS, _QU, _TU, _QSU, _OV, _SOV)
#: distinct titles whose tokens, numbers and stems ``features.text`` keeps between batches (a
#: catalog's titles recur across a run's batches; ``display.topn`` keeps their variant keys the
#: same way); past this many the cache starts over, so memory stays bounded whatever the catalog's
#: size (Home Depot titles, extrapolated from 37,744: ~63 MB here, ~41 MB in ``display.topn``)
TITLE_CACHE_MAX = 300_000
_CACHE_CHUNKS = 16
#: a batch with fewer distinct values than 1/8 of the cache skips it (looking up costs more)
_CACHE_MIN_SHARE = 8
#: what each helper is built from (a helper needs these computed before it)
_HELPER_NEEDS = {_QS: (_Q,), _TS: (_T,), _QU: (_Q,), _TU: (_T,), _QSU: (_QS,), _OV: (_Q, _T), _SOV: (_QS, _TS)}


def feature_column(name: str) -> str:
    return FEATURE_PREFIX + name


@dataclass(frozen=True)
class Feature:
    """A feature: the input columns it reads (via stage parameters) and its expression.

    ``expr`` returns one expression (column ``f_<name>``) or, for a feature that expands per
    recall source, a dict ``{suffix: expression}`` (columns ``f_<suffix>``); ``inputs`` then
    lists the columns it reads. ``helpers`` names the helper columns it reads (token lists,
    numbers, overlap: computed once per batch for all features). ``mention`` names the parameter
    holding an attribute column whose values are looked for in the query (the stage computes
    that match once, for text or list columns alike).
    """

    needs: tuple[str, ...]  # names of TextMatchFeatures parameters holding column names
    expr: Callable[["TextMatchFeatures"], "pl.Expr | dict[str, pl.Expr]"]
    doc: str
    inputs: Callable[["TextMatchFeatures"], list[str]] | None = None
    mention: str | None = None
    helpers: tuple[str, ...] = ()


def _tokens(col: str) -> pl.Expr:
    return pl.col(col).fill_null("").str.to_lowercase().str.extract_all(_TOKEN)


def _stems(frame: pl.DataFrame, tokens: pl.Expr) -> pl.Expr:
    """``tokens`` (a list column) with every word replaced by its Snowball (PyStemmer) stem."""
    import Stemmer

    vocab = frame.select(tokens.explode().drop_nulls().unique()).to_series().to_list()
    stems = dict(zip(vocab, Stemmer.Stemmer("english").stemWords(vocab)))
    return tokens.list.eval(pl.element().replace_strict(stems, default=pl.element(), return_dtype=pl.String))


def per_distinct(frame: pl.DataFrame, column: str, exprs: dict[str, pl.Expr], stems: dict[str, str] | None = None,
                 after: dict[str, pl.Expr] | None = None, cache: pl.DataFrame | None = None,
                 cache_max: int = 0) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """``frame`` with columns ``exprs`` (over ``column`` only) computed once per distinct value.

    ``stems`` (``{helper: token helper}``) adds the stemmed token lists, and ``after`` columns
    over all of these, still once per distinct value. With ``cache_max``, the distinct values
    and their columns are also returned as a cache for the next batch: pass it back as
    ``cache`` and only values missing from it are computed. A cache past ``cache_max`` rows is
    dropped (``None``: the next batch starts over), so memory stays bounded; one whose key type
    differs from this batch's is ignored, and a batch with far fewer distinct values than the
    cache (``_CACHE_MIN_SHARE``) computes its own and leaves the cache as it was.
    """
    if not exprs:
        return frame, None
    if cache is not None and cache.schema[column] != frame.schema[column]:
        cache = None
    distinct = frame.select(pl.col(column)).unique()
    known, given = None, cache
    if cache is not None and distinct.height * _CACHE_MIN_SHARE < cache.height:
        cache = None  # a small batch (one query): computing is cheaper than any lookup in a large cache
    if cache is not None:
        known = cache.join(distinct, on=column, how="semi", nulls_equal=True)
        distinct = distinct.join(known.select(column), on=column, how="anti", nulls_equal=True)
    distinct = distinct.with_columns(e.alias(h) for h, e in exprs.items())
    if stems:
        distinct = distinct.with_columns(_stems(distinct, pl.col(src)).alias(h) for h, src in stems.items())
    if after:
        distinct = distinct.with_columns(e.alias(h) for h, e in after.items())
    values = distinct if known is None else pl.concat([known, distinct]) if distinct.height else known
    out = frame.join(values, on=column, how="left", maintain_order="left", nulls_equal=True)
    if known is None and given is not None:
        return out, given
    if cache is not None and distinct.height:
        cache = pl.concat([cache, distinct], rechunk=cache.n_chunks() >= _CACHE_CHUNKS)
    cache = distinct if cache is None else cache
    return out, (cache if cache.height <= cache_max else None)


def _safe_div(a: pl.Expr, b: pl.Expr) -> pl.Expr:
    return pl.when(b > 0).then(a / b).otherwise(0.0)


def _numbers(col: str) -> pl.Expr:
    return pl.col(col).fill_null("").str.to_lowercase().str.extract_all(_NUMBER)


def _mentions(col: str, query_col: str) -> pl.Expr:
    """The item's (lower-cased) attribute value occurs as a substring of the query."""
    value = pl.col(col).cast(pl.String).str.to_lowercase()
    return (value.is_not_null() & (value.str.len_chars() > 0)
            & pl.col(query_col).str.to_lowercase().str.contains(value, literal=True)).fill_null(False)


def _mention_column(col: str) -> str:
    return f"__mention_{col}"


def _mention_values(frame: pl.DataFrame, col: str, query_col: str) -> pl.Series:
    """Per row: the attribute (text, or any element of a list such as colours) occurs in the query.

    Worked out once per distinct (query, attribute) pair -- a query's candidates share a few
    brands and colour lists -- and joined back onto the rows.
    """
    pairs = frame.select(pl.col(query_col), pl.col(col)).unique()
    if not isinstance(frame.schema[col], pl.List):
        hits = pairs.with_columns(_mentions(col, query_col).alias("__hit"))
    else:
        long = (pairs.with_row_index("__pair")
                .select("__pair", pl.col(query_col), pl.col(col).list.eval(pl.element().cast(pl.String)).alias("__v"))
                .explode("__v"))
        hit = (long.select("__pair", _mentions("__v", query_col).alias("__hit")).group_by("__pair")
               .agg(pl.col("__hit").any()))
        hits = (pairs.with_row_index("__pair").join(hit, on="__pair", how="left", maintain_order="left")
                .drop("__pair"))
    joined = frame.select(pl.col(query_col), pl.col(col)).join(hits, on=[query_col, col], how="left",
                                                                maintain_order="left", nulls_equal=True)
    return joined["__hit"].fill_null(False)


def _per_source(s: "TextMatchFeatures", kind: str, missing: float) -> dict[str, pl.Expr]:
    return {f"{kind}_{name}": pl.col(f"{kind}_{name}").cast(pl.Float64).fill_null(missing).fill_nan(missing)
            for name in s.sources}


FEATURES: dict[str, Feature] = {
    "recall_score": Feature(("score_column",), lambda s: pl.col(s.score_column), "score given by recall"),
    "recall_rank": Feature(("rank_column",), lambda s: pl.col(s.rank_column), "rank given by recall"),
    "overlap": Feature(("query_column", "title_column"), lambda s: pl.col(_OV), "query tokens found in the title",
                       helpers=(_OV,)),
    "coverage": Feature(("query_column", "title_column"), lambda s: _safe_div(pl.col(_OV), pl.col(_Q).list.len()),
                        "share of query tokens in the title", helpers=(_OV,)),
    # |Q u T| = |Q| + |T| - |Q n T| over distinct tokens
    "jaccard": Feature(("query_column", "title_column"),
                       lambda s: _safe_div(pl.col(_OV), pl.col(_QU) + pl.col(_TU) - pl.col(_OV)),
                       "Jaccard similarity of query and title token sets", helpers=(_OV, _QU, _TU)),
    "stem_overlap": Feature(("query_column", "title_column"), lambda s: pl.col(_SOV),
                            "query words found in the title after stemming ('drills' matches 'drill')",
                            helpers=(_SOV,)),
    "stem_coverage": Feature(("query_column", "title_column"),
                             lambda s: _safe_div(pl.col(_SOV), pl.col(_QSU)),
                             "share of the query's distinct stemmed words found in the title", helpers=(_SOV, _QSU)),
    "title_len": Feature(("title_column",), lambda s: pl.col(_T).list.len(), "title length in tokens", helpers=(_T,)),
    "query_len": Feature(("query_column",), lambda s: pl.col(_Q).list.len(), "query length in tokens", helpers=(_Q,)),
    "number_match": Feature(
        ("query_column", "title_column"),
        lambda s: _safe_div(pl.col(_QN).list.set_intersection(pl.col(_TN)).list.len(), pl.col(_QN).list.len()),
        "share of the query's numbers (sizes, gauges, model numbers) found in the title", helpers=(_QN, _TN)),
    "query_has_number": Feature(("query_column",), lambda s: pl.col(_QN).list.len() > 0,
                                "the query contains a number", helpers=(_QN,)),
    "brand_match": Feature(("query_column", "brand_column"), lambda s: pl.col(_mention_column(s.brand_column)),
                           "the item's brand is mentioned in the query", mention="brand_column"),
    "color_match": Feature(("query_column", "color_column"), lambda s: pl.col(_mention_column(s.color_column)),
                           "the item's colour (any of them, for a list column) is mentioned in the query",
                           mention="color_column"),
    "material_match": Feature(("query_column", "material_column"),
                              lambda s: pl.col(_mention_column(s.material_column)),
                              "the item's material (any of them, for a list column) is mentioned in the query",
                              mention="material_column"),
    "popularity": Feature(("popularity_column",),
                          lambda s: pl.col(s.popularity_column).cast(pl.Float64).fill_null(0.0).clip(0.0).log1p(),
                          "log(1 + the item's popularity column: sales, clicks, ratings count); 0 where missing"),
    "source_scores": Feature((), lambda s: _per_source(s, "score", s.missing_score),
                             "one column f_score_<name> per recall source in `sources` (recall.fused's "
                             "score_<name>); missing_score where that source did not find the item",
                             inputs=lambda s: [f"score_{n}" for n in s.sources]),
    "source_ranks": Feature((), lambda s: _per_source(s, "rank", s.missing_rank),
                            "one column f_rank_<name> per recall source in `sources`; missing_rank where that "
                            "source did not find the item", inputs=lambda s: [f"rank_{n}" for n in s.sources]),
    "n_sources": Feature(("source_column",),
                         lambda s: pl.col(s.source_column).str.count_matches("+", literal=True).fill_null(-1) + 1,
                         "how many recall sources found the item ('dense+bm25' gives 2)"),
    "fusion_rank": Feature(("rank_column",), lambda s: pl.col(s.rank_column),
                           "rank after recall.fused (the rank column as this stage sees it; same as "
                           "recall_rank, named for configs that fuse)"),
}

DEFAULT_FEATURES = ("recall_score", "recall_rank", "overlap", "coverage", "jaccard", "title_len", "query_len",
                    "number_match", "query_has_number", "brand_match")


class TextMatchFeatures(Stage):
    """Add ``f_<name>`` float32 feature columns for the learned ranker.

    ``features`` picks from :data:`FEATURES` (see each one's ``doc``); the columns each reads
    are set by the ``*_column`` parameters. Attribute mentions (``brand_match``,
    ``color_match``, ``material_match``) accept a text column or a list column (colours as
    ``list<str>``: any element mentioned counts). After ``recall.fused``, ``sources`` names the
    recall sources whose per-source ``score_<name>``/``rank_<name>`` columns ``source_scores`` /
    ``source_ranks`` turn into features; where a source did not find an item its value is
    ``missing_score`` (below every BM25 score and cosine similarity) or ``missing_rank`` (below
    every rank), since LightGBM should see a value, not a null.
    """

    name = "features.text"
    input_schema = pa.schema([pa.field(QUERY_ID, ANY)])
    tags = StageTags(level="candidate")

    def __init__(self, features: list[str] | tuple[str, ...] = DEFAULT_FEATURES, query_column: str = QUERY,
                 title_column: str = "title", brand_column: str = "brand", color_column: str = "color",
                 material_column: str = "material", popularity_column: str = "popularity", score_column: str = SCORE, rank_column: str = RANK,
                 sources: list[str] | tuple[str, ...] = (), missing_score: float = -1.0, missing_rank: int = 1000,
                 source_column: str = SOURCE):
        self.features = features
        self.query_column = query_column
        self.title_column = title_column
        self.brand_column = brand_column
        self.color_column = color_column
        self.material_column = material_column
        self.popularity_column = popularity_column
        self.score_column = score_column
        self.rank_column = rank_column
        self.sources = sources
        self.missing_score = missing_score
        self.missing_rank = missing_rank
        self.source_column = source_column

    def validate_params(self) -> None:
        super().validate_params()
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown or not self.features:
            raise self._bad_param("features", f"a non-empty list drawn from {', '.join(FEATURES)}")
        if not isinstance(self.sources, (list, tuple)) or not all(isinstance(n, str) and n for n in self.sources):
            raise self._bad_param("sources", "a list of recall source names")
        if ({"source_scores", "source_ranks"} & set(self.features)) and not self.sources:
            raise self._bad_param("sources", "a non-empty list of recall source names when 'source_scores' or "
                                             "'source_ranks' is among the features")
        if not isinstance(self.missing_score, (int, float)) or isinstance(self.missing_score, bool):
            raise self._bad_param("missing_score", "a number")
        if not isinstance(self.missing_rank, int) or isinstance(self.missing_rank, bool):
            raise self._bad_param("missing_rank", "an int")

    def required_columns(self) -> pa.Schema:
        cols = {QUERY_ID: ANY}
        for f in self.features:
            for param in FEATURES[f].needs:
                cols[getattr(self, param)] = ANY
            for col in FEATURES[f].inputs(self) if FEATURES[f].inputs else ():
                cols[col] = ANY
        return pa.schema([pa.field(c, t) for c, t in cols.items()])

    def _exprs(self) -> dict[str, pl.Expr]:
        """``{column: expression}`` of every produced feature column, in order."""
        out: dict[str, pl.Expr] = {}
        for f in self.features:
            expr = FEATURES[f].expr(self)
            parts = expr if isinstance(expr, dict) else {f: expr}
            out.update({feature_column(n): e.cast(pl.Float32).alias(feature_column(n)) for n, e in parts.items()})
        return out

    def produced_columns(self) -> pa.Schema:
        return pa.schema([pa.field(c, pa.float32()) for c in self._exprs()])

    def _helper_columns(self) -> list[str]:
        """The helper columns the chosen features read, with what they are built from, in build order."""
        used, todo = set(), [h for f in self.features for h in FEATURES[f].helpers]
        while todo:
            h = todo.pop()
            if h not in used:
                used.add(h)
                todo += _HELPER_NEEDS.get(h, ())
        return [h for h in _HELPERS if h in used]

    def transform(self, table: pa.Table) -> pa.Table:
        frame = pl.from_arrow(table)
        helpers = self._helper_columns()
        q, t = self.query_column, self.title_column
        # a query has ~100 candidate rows and a popular item shows up for many queries: tokens,
        # numbers, stems and distinct counts are worked out once per distinct query text and once
        # per distinct title; only the overlaps are per row
        pick = (lambda pairs: {h: e for h, e in pairs if h in helpers})
        out, _ = per_distinct(frame, q, pick(((_Q, _tokens(q)), (_QN, _numbers(q)))), pick(((_QS, _Q),)),
                              pick(((_QU, pl.col(_Q).list.n_unique()), (_QSU, pl.col(_QS).list.n_unique()))))
        # titles recur from batch to batch: their columns are kept for the next one (bounded)
        out, self._title_cache_ = per_distinct(out, t, pick(((_T, _tokens(t)), (_TN, _numbers(t)))), pick(((_TS, _T),)),
                                               pick(((_TU, pl.col(_T).list.n_unique()),)),
                                               cache=getattr(self, "_title_cache_", None), cache_max=TITLE_CACHE_MAX)
        overlap = (lambda a, b: pl.col(a).list.set_intersection(pl.col(b)).list.len())
        out = out.with_columns([e.alias(h) for h, e in ((_OV, overlap(_Q, _T)), (_SOV, overlap(_QS, _TS))) if h in helpers])
        mentioned = {getattr(self, FEATURES[f].mention) for f in self.features if FEATURES[f].mention}
        out = out.with_columns(_mention_values(frame, c, q).alias(_mention_column(c)) for c in sorted(mentioned))
        out = (out.with_columns(self._exprs().values())
               .drop([*helpers, *(_mention_column(c) for c in mentioned)], strict=False))
        return keep_input_types(out.to_arrow(), table.schema)
