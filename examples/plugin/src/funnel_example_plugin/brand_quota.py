"""``filter.brand_quota``: at most N candidates of one brand per query."""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from pipeline import ANY, QUERY_ID, RANK, Stage, StageTags

__all__ = ["BrandQuotaFilter"]

_ROW = "__row"


class BrandQuotaFilter(Stage):
    """Keep at most ``per_brand`` candidates of each brand per query: the best-ranked ones.

    Candidates are compared by ``rank`` (lower is better; rows with a null rank come last, ties
    keep their input order). Rows whose brand is null are never counted against a quota and are
    always kept. Kept rows stay in their input order with every column unchanged; ``rank`` is
    not renumbered (the display stage does that), so its gaps show where candidates were removed.

    Put it after the ranker and before display, so the quota applies to the final order::

        [[stages]]
        type = "filter.brand_quota"
        params = { per_brand = 2 }

    Args:
        per_brand: candidates kept per (query, brand); an int >= 1.
        brand_column: the column holding the brand (any type; a null brand is not counted);
            must not be ``query_id`` or ``rank``.
    """

    name = "filter.brand_quota"
    input_schema = pa.schema([pa.field(QUERY_ID, ANY), pa.field(RANK, pa.int32()), pa.field("brand", ANY)])
    tags = StageTags(devices=("cpu",), level="candidate")

    def __init__(self, per_brand: int = 2, brand_column: str = "brand"):
        self.per_brand = per_brand
        self.brand_column = brand_column

    def validate_params(self) -> None:
        super().validate_params()
        if not isinstance(self.per_brand, int) or isinstance(self.per_brand, bool) or self.per_brand < 1:
            raise self._bad_param("per_brand", "an int >= 1")
        if not isinstance(self.brand_column, str) or self.brand_column in ("", QUERY_ID, RANK, _ROW):
            raise self._bad_param("brand_column", f"a column name other than '{QUERY_ID}' and '{RANK}'")

    def required_columns(self) -> pa.Schema:
        return pa.schema([pa.field(QUERY_ID, ANY), pa.field(RANK, pa.int32()), pa.field(self.brand_column, ANY)])

    def transform(self, table: pa.Table) -> pa.Table:
        frame = pl.from_arrow(table.select([QUERY_ID, RANK, self.brand_column])).with_row_index(_ROW)
        seen = pl.int_range(pl.len()).over([QUERY_ID, self.brand_column])
        kept = (frame.sort(RANK, nulls_last=True, maintain_order=True)
                .filter(pl.col(self.brand_column).is_null() | (seen < self.per_brand)))
        if kept.height == table.num_rows:
            return table
        return table.take(kept.get_column(_ROW).sort().to_arrow())
