"""Display stage: the final top-N list per query."""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from pipeline.columns import QUERY_ID, RANK, SCORE
from pipeline.schema import ANY, keep_input_types
from pipeline.stage import Stage, StageTags

__all__ = ["TopNDisplay"]


class TopNDisplay(Stage):
    """Keep the best ``n`` candidates per query and number them 1..n.

    Candidates are ordered by their current ``rank`` (ties by higher ``score``). With
    ``cap_column`` set, at most ``cap`` items sharing a value of that column (a brand, a
    variant key) are shown per query; lower-ranked ones make room for others. Every other column
    (``source``, ``recall_score``, ``recall_rank`` ...) passes through as provenance.
    """

    name = "display.topn"
    input_schema = pa.schema([pa.field(QUERY_ID, ANY), pa.field(SCORE, pa.float32()), pa.field(RANK, pa.int32())])
    output_schema = pa.schema([pa.field(RANK, pa.int32())])
    tags = StageTags(level="candidate")
    top_param = "n"

    def __init__(self, n: int = 10, cap_column: str | None = None, cap: int | None = None):
        self.n = n
        self.cap_column = cap_column
        self.cap = cap

    def required_columns(self) -> pa.Schema:
        extra = [pa.field(self.cap_column, ANY)] if self.cap_column else []
        return pa.schema(list(self.input_schema) + extra)

    def validate_params(self) -> None:
        super().validate_params()
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise self._bad_param("n", "an int >= 1")
        if (self.cap_column is None) != (self.cap is None):
            raise self._bad_param("cap", "set together with cap_column (both or neither)")
        if self.cap is not None and (not isinstance(self.cap, int) or self.cap < 1):
            raise self._bad_param("cap", "None or an int >= 1")

    def transform(self, table: pa.Table) -> pa.Table:
        frame = (pl.from_arrow(table)
                 .with_row_index("__qpos").with_columns(pl.col("__qpos").min().over(QUERY_ID))
                 .sort(["__qpos", RANK, SCORE], descending=[False, False, True], maintain_order=True))
        if self.cap_column:
            seen = pl.int_range(pl.len()).over([QUERY_ID, self.cap_column])
            frame = frame.filter(pl.col(self.cap_column).is_null() | (seen < self.cap))
        frame = (frame.with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int32).over(QUERY_ID).alias(RANK))
                 .filter(pl.col(RANK) <= self.n).drop("__qpos"))
        return keep_input_types(frame.to_arrow(), table.schema)
