"""Display stage: the final top-N list per query."""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from pipeline.columns import QUERY_ID, RANK, SCORE
from pipeline.schema import ANY, keep_input_types
from pipeline.stage import Stage, StageTags

from .features import TITLE_CACHE_MAX, per_distinct

__all__ = ["TopNDisplay", "DEFAULT_VARIANT_PATTERN", "COLOURS", "SIZE_UNITS"]

#: Colour words removed from a variant key (a product in white and in black is one product).
COLOURS = ("soft white", "bright white", "warm white", "cool white", "daylight", "white", "black", "gray", "grey", "brown", "beige", "red", "blue", "green", "yellow", "orange", "pink",
           "purple", "ivory", "almond", "bisque", "biscuit", "cream", "tan", "natural", "clear", "silver", "gold",
           "copper", "chrome", "nickel", "brushed", "satin", "polished", "oil rubbed", "oil-rubbed", "bronze", "brass",
           "stainless", "espresso", "cherry", "walnut", "mahogany", "matte", "gloss", "semi-gloss", "charcoal",
           "slate", "sand", "navy", "multi-color")
#: Units whose number is removed from a variant key ('3/4 in.', '60-Watt', '5 gal.', '2-Pack').
SIZE_UNITS = ("in", "inch", "inches", "ft", "feet", "foot", "yd", "mm", "cm", "m", "w", "watt", "watts", "v", "volt",
              "volts", "amp", "amps", "gal", "gallon", "gallons", "qt", "quart", "oz", "fl", "lb", "lbs", "pound",
              "sq", "cu", "pack", "pk", "piece", "pc", "pcs", "count", "ct", "gauge", "ga", "btu", "cfm", "mph")
#: Default ``variant_pattern``: sizes (a number, optionally ``x``-joined dimensions, with a unit)
#: and colour words. Rust regex syntax (Polars), applied to the lower-cased key.
DEFAULT_VARIANT_PATTERN = (
    r"\b\d+(?:[./-]\d+)*\s*-?\s*(?:" + "|".join(SIZE_UNITS) + r")\b\.?"
    r"|\b(?:" + "|".join(c.replace("-", r"\-") for c in COLOURS) + r")\b"
    r"|\bx\b"
)


class TopNDisplay(Stage):
    """Keep the best ``n`` candidates per query and number them 1..n.

    Candidates are ordered by their current ``rank`` (ties by higher ``score``). With
    ``cap_column`` set, at most ``cap`` items sharing a value of that column (a brand, a
    variant key) are shown per query; lower-ranked ones make room for others. Every other column
    (``source``, ``recall_score``, ``recall_rank`` ...) passes through as provenance.

    With ``variant_key`` set (``"title"``), near-duplicate variants of one product — the same
    title in another size or colour — are collapsed: the key is lower-cased, every match of
    ``variant_pattern`` is removed (by default sizes such as ``3/4 in.``, ``60-Watt``,
    ``5 gal.`` and colour words, :data:`DEFAULT_VARIANT_PATTERN`), punctuation and spacing are
    normalised, and only the best-ranked item of each resulting key is kept per query. With
    ``variant_pattern = ""`` nothing is removed: only titles identical up to case, punctuation
    and spacing collapse (the same product listed twice), sizes and colours stay apart. This
    happens before the ``cap_column`` cap, so a hidden variant does not use up its brand's
    places. Items with a null or emptied key are never collapsed.
    """

    name = "display.topn"
    input_schema = pa.schema([pa.field(QUERY_ID, ANY), pa.field(SCORE, pa.float32()), pa.field(RANK, pa.int32())])
    output_schema = pa.schema([pa.field(RANK, pa.int32())])
    tags = StageTags(level="candidate")
    top_param = "n"

    def __init__(self, n: int = 10, cap_column: str | None = None, cap: int | None = None,
                 variant_key: str | None = None, variant_pattern: str = DEFAULT_VARIANT_PATTERN):
        self.n = n
        self.cap_column = cap_column
        self.cap = cap
        self.variant_key = variant_key
        self.variant_pattern = variant_pattern

    def required_columns(self) -> pa.Schema:
        extra = [pa.field(c, ANY) for c in dict.fromkeys((self.cap_column, self.variant_key)) if c]
        return pa.schema(list(self.input_schema) + extra)

    def variant_keys(self, column: pl.Expr) -> pl.Expr:
        """The normalised variant key of a text column (null when nothing is left of it)."""
        key = column.cast(pl.String).str.to_lowercase()
        if self.variant_pattern:
            key = key.str.replace_all(self.variant_pattern, " ")
        key = key.str.replace_all(r"[^a-z0-9]+", " ").str.strip_chars()
        # not when(len > 0).then(key): that evaluates the regexes twice (2x the time on 36k titles)
        return key.replace("", None)

    def validate_params(self) -> None:
        super().validate_params()
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise self._bad_param("n", "an int >= 1")
        if (self.cap_column is None) != (self.cap is None):
            raise self._bad_param("cap", "set together with cap_column (both or neither)")
        if self.cap is not None and (not isinstance(self.cap, int) or self.cap < 1):
            raise self._bad_param("cap", "None or an int >= 1")
        if self.variant_key is not None and (not isinstance(self.variant_key, str) or not self.variant_key):
            raise self._bad_param("variant_key", "None or a column name")
        if not isinstance(self.variant_pattern, str):
            raise self._bad_param("variant_pattern", "a regular expression (Rust regex syntax), or \"\" for none")
        try:
            pl.Series([""]).str.replace_all(self.variant_pattern or "x", " ")
        except (pl.exceptions.PolarsError, TypeError):
            raise self._bad_param("variant_pattern", "a regular expression (Rust regex syntax)") from None

    def transform(self, table: pa.Table) -> pa.Table:
        # the order and the rows to keep are worked out on the few columns they need; the other
        # columns (features, titles, provenance) are taken once, in Arrow, for the kept rows only
        needed = [QUERY_ID, RANK, SCORE, *[c for c in dict.fromkeys((self.variant_key, self.cap_column)) if c]]
        frame = (pl.from_arrow(table.select(list(dict.fromkeys(needed)))).with_row_index("__row")
                 .with_columns(pl.col("__row").min().over(QUERY_ID).alias("__qpos"))
                 .sort(["__qpos", RANK, SCORE], descending=[False, False, True], maintain_order=True))
        if self.variant_key:
            # a key per distinct title (a title recurs across a batch's queries and across
            # batches: the keys are kept for the next batch, bounded), joined back
            frame, self._key_cache_ = per_distinct(frame, self.variant_key,
                                                   {"__variant": self.variant_keys(pl.col(self.variant_key))},
                                                   cache=getattr(self, "_key_cache_", None), cache_max=TITLE_CACHE_MAX)
            first = pl.struct(QUERY_ID, "__variant").is_first_distinct()  # rows are in display order
            frame = frame.filter(pl.col("__variant").is_null() | first)
        if self.cap_column:
            seen = pl.int_range(pl.len()).over([QUERY_ID, self.cap_column])
            frame = frame.filter(pl.col(self.cap_column).is_null() | (seen < self.cap))
        frame = (frame.with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int32).over(QUERY_ID).alias(RANK))
                 .filter(pl.col(RANK) <= self.n))
        out = table.take(frame["__row"].to_arrow())
        at = out.schema.get_field_index(RANK)
        out = out.set_column(at, pa.field(RANK, pa.int32()), frame[RANK].to_arrow().cast(pa.int32()))
        return keep_input_types(out, table.schema)
