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
from .schema import compatible

__all__ = ["read_parquet", "read_catalog", "read_judgments", "holdout_mask", "open_dataset", "read_logs",
           "next_item_targets", "LOG_USER", "LOG_ITEMS", "read_item_vectors", "ItemVectorColumn"]

ITEM_ID_ALIASES = ("product_id",)


def open_dataset(path: str | Path, *, what: str = "input") -> ds.Dataset:
    """A Parquet file or a folder of Parquet shards, opened lazily; ``what`` names it in errors."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} {path} does not exist")
    try:
        return ds.dataset(path, format="parquet")
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{what} {path} is not readable as Parquet: {exc}") from exc


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
    if table.num_rows == 0:
        raise DataError(f"catalog file {path} has no rows; a catalog needs at least one item")
    ids = table.column(ITEM_ID)
    if ids.null_count:
        raise DataError(f"catalog file {path}: column {ITEM_ID} has {ids.null_count} null id(s)")
    if len(ids.unique()) != len(ids):
        raise DataError(f"catalog file {path}: column {ITEM_ID} has duplicate ids ({len(ids) - len(ids.unique())} repeats)")
    return table


def read_judgments(path: str | Path) -> pa.Table:
    """Graded judgments: ``query_id``, ``query``, ``item_id`` (or ``product_id``), ``relevance``."""
    table = read_parquet(path, what="judgments", columns=[QUERY_ID, QUERY, ITEM_ID, RELEVANCE])
    for column, expected in ((QUERY, pa.string()), (RELEVANCE, pa.float64())):
        found = table.schema.field(column).type
        if not compatible(expected, found):
            raise DataError(f"judgments file {path}: column '{column}' must be {expected}; found {found}")
    if table.num_rows == 0:
        raise DataError(f"judgments file {path} has no rows; training and evaluation need judged queries")
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


#: Columns of an interaction log: one row per user, the items in time order (oldest first).
LOG_USER, LOG_ITEMS = "user_id", "items"


def read_logs(path: str | Path) -> pa.Table:
    """Interaction logs: ``user_id`` and ``items`` (a list of item ids, oldest first)."""
    table = read_parquet(path, what="logs", columns=[LOG_USER, LOG_ITEMS])
    items_type = table.schema.field(LOG_ITEMS).type
    if not (pa.types.is_list(items_type) or pa.types.is_large_list(items_type)):
        raise DataError(f"logs file {path}: column '{LOG_ITEMS}' must be a list of item ids in time order; found {items_type}")
    if table.num_rows == 0:
        raise DataError(f"logs file {path} has no rows; learning from logs needs at least one user")
    return table


def next_item_targets(logs: pa.Table) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Leave-last-out: each user's last item is the target, the items before it the history.

    Returns ``(queries, judgments, prior_logs)``: ``queries`` has ``query_id`` (the user) and
    ``history`` (items before the last, oldest first), ``judgments`` has ``query_id``,
    ``item_id`` (the last item) and ``relevance`` 1.0, and ``prior_logs`` is the logs without
    each user's last item — what a model may learn from without seeing the targets. Users with
    fewer than two items give no query.
    """
    import numpy as np
    import pyarrow.compute as pc

    from .columns import HISTORY

    items = logs.column(LOG_ITEMS).combine_chunks()
    usable = pc.greater_equal(pc.fill_null(pc.list_value_length(items), 0), 2)
    users, seqs = logs.column(LOG_USER).filter(usable), items.filter(usable)
    offsets = seqs.offsets.to_numpy().astype(np.int64)
    lengths = np.diff(offsets)
    last = offsets[1:] - offsets[0] - 1
    flat = pc.list_flatten(seqs)
    keep = np.ones(len(flat), bool)
    keep[last] = False
    prior = pa.ListArray.from_arrays(pa.array(np.r_[0, np.cumsum(lengths - 1)], pa.int32()), flat.filter(pa.array(keep)))
    queries = pa.table({QUERY_ID: users, HISTORY: prior})
    judgments = pa.table({QUERY_ID: users, ITEM_ID: flat.take(pa.array(last)),
                          RELEVANCE: pa.array(np.ones(len(last)), pa.float64())})
    return queries, judgments, pa.table({LOG_USER: users, LOG_ITEMS: prior})


class ItemVectorColumn:
    """A catalog's per-item vectors read by :func:`read_item_vectors`: ids, an (n, d) float32
    matrix (rows in catalog order, items without a usable vector left out) and what was left out."""

    def __init__(self, ids: pa.Array, vectors, *, column: str, missing: int, zero_norm: int):
        self.ids = ids
        self.vectors = vectors
        self.column = column
        self.missing = missing
        self.zero_norm = zero_norm

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def skipped(self) -> str:
        """``"; 3 without a vector, 1 of norm 0 left out"`` or ``""``."""
        parts = [f"{self.missing} without a vector" if self.missing else "",
                 f"{self.zero_norm} of norm 0" if self.zero_norm else ""]
        parts = [p for p in parts if p]
        return f"; {', '.join(parts)} left out" if parts else ""


def read_item_vectors(path: str | Path, column: str, *, stage: str, batch_rows: int = 65536) -> ItemVectorColumn:
    """The vectors of catalog ``column`` (a list or fixed-size list of floats per item).

    The file is streamed ``batch_rows`` rows at a time into one preallocated float32 matrix, so
    memory holds the matrix and one batch, never the catalog's other columns. Items whose
    vector is null or all zeros (an item without an image) are left out and counted; a vector
    of another dimension than the first one, null values inside a vector, NaN or infinity are
    errors naming the column, the item, the expected and the found value.
    """
    import numpy as np
    import pyarrow.compute as pc

    path = Path(path)
    if not path.exists():
        raise DataError(f"catalog file {path} does not exist")
    dataset = open_dataset(path)
    names = dataset.schema.names
    id_col = ITEM_ID if ITEM_ID in names else next((a for a in ITEM_ID_ALIASES if a in names), None)
    where = f"stage '{stage}': catalog file {path}"
    if id_col is None or column not in names:
        lacking = ", ".join(c for c, ok in ((ITEM_ID, id_col is not None), (column, column in names)) if not ok)
        raise DataError(f"{where} lacks column(s) {lacking}; it has: {', '.join(names)}")
    vtype = dataset.schema.field(column).type
    if not ((pa.types.is_list(vtype) or pa.types.is_large_list(vtype) or pa.types.is_fixed_size_list(vtype))
            and (pa.types.is_floating(vtype.value_type) or pa.types.is_integer(vtype.value_type))):
        raise DataError(f"{where}: column '{column}' must hold one vector per item (list<float32> or "
                        f"fixed_size_list<float32>[d]); found {vtype}")
    total = dataset.count_rows()
    dim = vtype.list_size if pa.types.is_fixed_size_list(vtype) else None
    matrix = None
    ids: list[pa.Array] = []
    kept = missing = zero = 0
    for batch in dataset.to_batches(columns=[id_col, column], batch_size=batch_rows):
        if batch.num_rows == 0:
            continue
        arr, bid = batch.column(1), batch.column(0)
        present = ~arr.is_null().to_numpy(zero_copy_only=False)
        missing += int((~present).sum())
        arr, bid = arr.filter(pa.array(present)), bid.filter(pa.array(present))
        if len(arr) == 0:
            continue
        lengths = (np.full(len(arr), vtype.list_size) if pa.types.is_fixed_size_list(vtype)
                   else pc.list_value_length(arr).to_numpy(zero_copy_only=False))
        if dim is None:
            dim = int(lengths[0])
        bad = np.flatnonzero(lengths != dim)
        if len(bad):
            raise DataError(f"{where}: column '{column}' has vectors of dimension {dim} but item "
                            f"{bid[int(bad[0])].as_py()!r} has {int(lengths[bad[0]])}; every vector needs one dimension")
        if dim == 0:
            raise DataError(f"{where}: column '{column}' holds empty vectors; expected a dimension >= 1")
        values = pc.list_flatten(arr)
        if values.null_count:
            row = int(np.flatnonzero(np.bincount(pc.list_parent_indices(arr).to_numpy(zero_copy_only=False),
                                                 weights=values.is_null().to_numpy(zero_copy_only=False),
                                                 minlength=len(arr)))[0])
            raise DataError(f"{where}: column '{column}' has null values inside the vector of item "
                            f"{bid[row].as_py()!r}; expected {dim} numbers")
        block = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(arr), dim)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            row = int(np.argmin(finite))
            raise DataError(f"{where}: column '{column}' has NaN or infinite values in the vector of item "
                            f"{bid[row].as_py()!r}; expected finite numbers")
        nonzero = np.any(block != 0, axis=1)
        zero += int((~nonzero).sum())
        block, bid = block[nonzero], bid.filter(pa.array(nonzero))
        if matrix is None:
            matrix = np.empty((total, dim), np.float32)
        matrix[kept:kept + len(block)] = block
        kept += len(block)
        ids.append(bid)
    if kept == 0:
        raise DataError(f"{where}: column '{column}' has no usable vector ({total} rows: {missing} null, {zero} all "
                        "zeros); expected at least one")
    id_array = pa.chunked_array(ids).combine_chunks()
    if id_array.null_count:
        raise DataError(f"{where}: column {id_col} has {id_array.null_count} null id(s)")
    if len(pc.unique(id_array)) != len(id_array):
        raise DataError(f"{where}: column {id_col} has duplicate ids ({len(id_array) - len(pc.unique(id_array))} "
                        "repeats)")
    return ItemVectorColumn(id_array, matrix[:kept], column=column, missing=missing, zero_norm=zero)
