"""Item attribute lookup: join catalog columns onto candidates by item id."""

from __future__ import annotations

from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import build_key, read_manifest, sha256_file, verify_files, write_json_atomic
from pipeline.columns import ITEM_ID, QUERY_ID
from pipeline.data import read_catalog
from pipeline.schema import ANY, keep_input_types
from pipeline.stage import Stage, StageTags

__all__ = ["CatalogLookup"]

ITEMS_FILE = "items.parquet"


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
        if getattr(self, "items_", None) is not None:
            return
        folder = self.resolve_path(self.items)
        what = f"stage '{self.name}' items"
        manifest = read_manifest(folder, what=what)
        verify_files(folder, manifest, what=what)
        self.items_ = pl.from_arrow(pq.read_table(folder / ITEMS_FILE, columns=[ITEM_ID, *self.columns]))

    def invalid_rows(self, table: pa.Table) -> pa.Array | None:
        """Candidates whose item is not in the snapshot (an index and catalog out of step)."""
        import pyarrow.compute as pc

        ids = table.column(ITEM_ID)
        known = self.items_.get_column(ITEM_ID).to_arrow()
        if known.type != ids.type:
            known = known.cast(ids.type)
        missing = pc.invert(pc.is_in(ids, value_set=known))
        if not pc.any(missing).as_py():
            return None
        reason = pc.if_else(missing, f"item_id not in the catalog snapshot {self.items}", pa.scalar(None, pa.string()))
        return reason.combine_chunks() if isinstance(reason, pa.ChunkedArray) else reason

    def transform(self, table: pa.Table) -> pa.Table:
        frame = pl.from_arrow(table).drop([c for c in self.columns if c in table.column_names])
        items = self.items_
        if items.schema[ITEM_ID] != frame.schema[ITEM_ID]:
            items = items.with_columns(pl.col(ITEM_ID).cast(frame.schema[ITEM_ID]))
        out = frame.join(items, on=ITEM_ID, how="left", maintain_order="left").to_arrow()
        return keep_input_types(out, table.schema)
