"""Reading the files Funnel learns from and runs on, with errors that name file and column.

Catalogs and judgments may call the item id ``item_id`` or ``product_id`` (Home Depot's name);
both are read as ``item_id``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .columns import ITEM_ID, QUERY, QUERY_ID, RELEVANCE
from .errors import DataError
from .schema import ANY, check_columns

__all__ = ["read_parquet", "read_catalog", "read_judgments", "holdout_mask", "open_dataset"]

ITEM_ID_ALIASES = ("product_id",)


def open_dataset(path: str | Path) -> ds.Dataset:
    """A Parquet file or a folder of Parquet shards, opened lazily."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"input {path} does not exist")
    try:
        return ds.dataset(path, format="parquet")
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"input {path} is not readable as Parquet: {exc}") from exc


def read_parquet(path: str | Path, *, what: str, columns: list[str] | None = None) -> pa.Table:
    """Read a whole Parquet file; ``what`` says what the file is for in errors."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} file {path} does not exist")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{what} file {path} is not readable as Parquet: {exc}") from exc
    table = _alias_item_id(table)
    if columns is not None:
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise DataError(
                f"{what} file {path} lacks column(s) {', '.join(missing)}; it has: {', '.join(table.column_names)}"
            )
        table = table.select(columns)
    return table


def _alias_item_id(table: pa.Table) -> pa.Table:
    if ITEM_ID in table.column_names:
        return table
    for alias in ITEM_ID_ALIASES:
        if alias in table.column_names:
            names = [ITEM_ID if n == alias else n for n in table.column_names]
            return table.rename_columns(names)
    return table


def read_catalog(path: str | Path, columns: list[str] | tuple[str, ...] = ()) -> pa.Table:
    """A product catalog with ``item_id`` (or ``product_id``) and the requested columns."""
    table = read_parquet(path, what="catalog", columns=[ITEM_ID, *[c for c in columns if c != ITEM_ID]])
    ids = table.column(ITEM_ID)
    if ids.null_count:
        raise DataError(f"catalog file {path}: column {ITEM_ID} has {ids.null_count} null id(s)")
    if len(ids.unique()) != len(ids):
        raise DataError(f"catalog file {path}: column {ITEM_ID} has duplicate ids ({len(ids) - len(ids.unique())} repeats)")
    return table


def read_judgments(path: str | Path) -> pa.Table:
    """Graded judgments: ``query_id``, ``query``, ``item_id`` (or ``product_id``), ``relevance``."""
    table = read_parquet(path, what="judgments", columns=[QUERY_ID, QUERY, ITEM_ID, RELEVANCE])
    need = pa.schema([pa.field(QUERY_ID, ANY), pa.field(QUERY, pa.string()), pa.field(ITEM_ID, ANY),
                      pa.field(RELEVANCE, pa.float64())])
    check_columns(need, table.schema, stage="judgments", where=f"file {path}")
    return table


def holdout_mask(query_ids: pa.Array | pa.ChunkedArray, fraction: float, seed: int = 0) -> list[bool]:
    """Deterministic split by query: True for the ``fraction`` of query ids held out.

    Hash-based, so the same query id lands on the same side on every machine and in every
    command (training, evaluation), whatever the row order.
    """
    out = []
    for qid in query_ids.to_pylist():
        h = hashlib.blake2b(f"{seed}:{qid}".encode(), digest_size=8).digest()
        out.append(int.from_bytes(h, "big") / 2**64 < fraction)
    return out
