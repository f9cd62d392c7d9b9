"""Item attribute lookup: join catalog columns onto candidates by item id."""

from __future__ import annotations

from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import build_key, read_manifest, read_verified_manifest, sha256_file, write_json_atomic
from pipeline.columns import ITEM_ID, QUERY_ID
from pipeline.data import read_catalog
from pipeline.schema import ANY
from pipeline.stage import Stage, StageTags

from .association import SortedIds

__all__ = ["CatalogLookup"]

ITEMS_FILE = "items.parquet"
_POS = "__pos"


class CatalogLookup(Stage):
    """Add item attributes (title, brand, price, ...) to each candidate row.

    ``funnel build`` snapshots the requested ``columns`` of the config's ``[data] catalog`` into
    the ``items`` artifact folder, so a run reads exactly the attributes its index was built
    with. Candidates whose item is not in the snapshot get nulls.
    """

    name = "lookup.catalog"
    input_schema = pa.schema([pa.field(QUERY_ID, ANY), pa.field(ITEM_ID, ANY)])
    tags = StageTags(requires_build=True, level="candidate")
    path_params = ("items",)

    def __init__(self, items: str = "artifacts/items", columns: list[str] | tuple[str, ...] = ("title", "brand")):
        self.items = items
        self.columns = columns

    def produced_columns(self) -> pa.Schema:
        return pa.schema([pa.field(c, ANY) for c in self.columns])

    def validate_params(self) -> None:
        super().validate_params()
        if not self.columns or not all(isinstance(c, str) for c in self.columns) or ITEM_ID in self.columns:
            raise self._bad_param("columns", f"a non-empty list of column names other than '{ITEM_ID}'")

    def build(self, upstream: Any, ctx: Any) -> str:
        """Snapshot the catalog columns; skipped when the catalog and columns are unchanged."""
        folder = self.resolve_path(self.items)
        catalog = ctx.data_path("catalog")
        key = build_key(stage=self.name, columns=list(self.columns), catalog=sha256_file(catalog))
        if not ctx.force and (folder / "manifest.json").exists() and read_manifest(folder, what="items").get("build_key") == key:
            return f"{self.name}: up to date ({folder})"
        table = read_catalog(catalog, list(self.columns))
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{ITEMS_FILE}.tmp"
        pq.write_table(table, tmp)
        tmp.replace(folder / ITEMS_FILE)
        write_json_atomic(folder / "manifest.json", {
            "kind": "items", "build_key": key, "columns": list(self.columns), "count": table.num_rows,
            "files": {ITEMS_FILE: sha256_file(folder / ITEMS_FILE)},
        })
        return f"{self.name}: wrote {table.num_rows} items to {folder}"

    def warm_up(self) -> None:
        super().warm_up()
        if getattr(self, "attributes_", None) is not None:
            return
        folder = self.resolve_path(self.items)
        what = f"stage '{self.name}' items"
        read_verified_manifest(folder, what=what)
        items = pq.read_table(folder / ITEMS_FILE, columns=[ITEM_ID, *self.columns]).combine_chunks()
        # rows of the snapshot by item id: a batch is looked up by one join on its ids, then Arrow
        # takes the attribute columns (the candidates' own columns never leave Arrow)
        self.attributes_ = items.drop_columns([ITEM_ID])
        self.positions_ = pl.from_arrow(items.select([ITEM_ID])).with_row_index(_POS)
        self.sorted_ = SortedIds.of(items.column(ITEM_ID))  # integer ids of small batches: binary search

    def _positions(self, table: pa.Table) -> pl.Series:
        """Per candidate row: its item's row in the snapshot (null when not there)."""
        sorted_ids = getattr(self, "sorted_", None)
        # binary search for a batch much smaller than the snapshot (one query: no hash table of
        # the whole catalog); Polars' threaded join is faster for a batch of its size
        small = sorted_ids is not None and table.num_rows * 8 < len(sorted_ids.keys)
        rows = sorted_ids.positions(table.column(ITEM_ID)) if small else None
        if rows is not None:
            return pl.Series(_POS, rows, dtype=pl.Int64).replace(-1, None)
        ids = pl.from_arrow(table.select([ITEM_ID]))
        index = self.positions_
        if index.schema[ITEM_ID] != ids.schema[ITEM_ID]:
            index = index.with_columns(pl.col(ITEM_ID).cast(ids.schema[ITEM_ID], strict=False))
        return ids.join(index, on=ITEM_ID, how="left", maintain_order="left", nulls_equal=False)[_POS]

    def invalid_rows(self, table: pa.Table) -> pa.Array | None:
        """Candidates whose item is not in the snapshot (an index and catalog out of step)."""
        positions = self._positions(table)
        missing = positions.is_null()
        if not missing.any():
            # the runner passes this very table on to transform when nothing is quarantined:
            # keep its positions so they are not worked out twice (about 12 ms per batch of 256)
            self._checked_ = (table, positions)
            return None
        reason = f"item_id not in the catalog snapshot {self.items}"
        return pl.select(pl.when(missing).then(pl.lit(reason))).to_series().to_arrow().cast(pa.string())

    def transform(self, table: pa.Table) -> pa.Table:
        checked, self._checked_ = getattr(self, "_checked_", None), None
        positions = checked[1] if checked is not None and checked[0] is table else self._positions(table)
        looked_up = self.attributes_.take(positions.to_arrow())
        out = table.drop_columns([c for c in self.columns if c in table.column_names])
        for name in self.columns:
            out = out.append_column(looked_up.schema.field(name), looked_up.column(name))
        return out
