"""Item-to-item association learned from interaction logs, and recall from a user's history."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

from pipeline.artifacts import MANIFEST, build_key, read_manifest, sha256_file, verify_files, write_json_atomic
from pipeline.build import BuildContext, check_fits
from pipeline.columns import HISTORY, ITEM_ID, QUERY_ID, RANK, SCORE, SOURCE
from pipeline.data import read_logs
from pipeline.errors import ArtifactError, DataError
from pipeline.schema import ANY
from pipeline.stage import Pipeline, Stage, StageTags

__all__ = ["AssociationIndex", "AssociationRecall", "history_weights", "histories_to_matrix", "split_histories",
           "lookup_positions", "SortedIds"]

ITEMS_FILE = "items.parquet"
NEIGHBOURS_FILE = "neighbours.parquet"
WHAT = "association index"


class AssociationIndex:
    """Sparse item-to-item association scores: for every item, its ``top_m`` best neighbours.

    Learned from interaction sequences (each user's items, oldest first). Every ordered pair of
    items at most ``window`` steps apart in a sequence adds ``forward * decay**(d - 1)`` to
    ``C[a, b]`` when ``b`` comes ``d`` steps after ``a``, and ``backward * decay**(d - 1)`` to
    ``C[b, a]`` — transitions count more than co-occurrence in reverse, near pairs more than
    far ones. ``log_recency`` < 1 further weights each pair by ``log_recency**s``, ``s`` the
    steps from the pair's later item to the end of its sequence, so recent behaviour counts
    more. The score is ``C[a, b] / (count[a]**alpha * count[b]**beta)``: ``beta`` discounts
    popular targets (``beta = 0.5`` with ``alpha = 0.5`` is cosine-like), ``alpha`` balances
    how much each history item contributes when a user's scores are summed.

    A user's scores are ``sum_p w_p * score[h_p, :]`` over the history, with
    :func:`history_weights` (the most recent item weighs 1, each older one ``recency`` times
    less).

    On disk an index is a folder: ``items.parquet`` (``item_id`` and its ``count`` in the logs;
    row ``i`` is item position ``i``), ``neighbours.parquet`` (``item``, ``neighbour`` positions
    as int32 and ``score`` float32, the sparse top-M matrix in long form) and ``manifest.json``
    (settings and the SHA-256 of both files, written last). No pickle anywhere.
    """

    def __init__(self, ids: pa.Array, counts: np.ndarray, matrix: sp.csr_matrix, *, params: dict[str, Any],
                 location: str = "memory"):
        if matrix.shape != (len(ids), len(ids)) or len(counts) != len(ids):
            raise ArtifactError(f"{WHAT} at {location}: {len(ids)} items but a {matrix.shape} matrix and {len(counts)} counts")
        self.ids = ids
        self.counts = counts
        self.matrix = matrix
        self.params = params
        self.location = location

    # -- learning -----------------------------------------------------------------------------

    @classmethod
    def learn(cls, sequences: pa.Array | pa.ChunkedArray, *, window: int = 20, forward: float = 1.0,
              backward: float = 0.3, decay: float = 0.9, log_recency: float = 1.0, alpha: float = 0.0,
              beta: float = 0.4, top_m: int = 200, progress: bool = False) -> "AssociationIndex":
        """Learn the index from a list column of item ids (one sequence per user, oldest first);
        ``progress`` shows a bar over the users (pairs kept so far, memory in use)."""
        from tqdm.auto import tqdm

        from pipeline.build import memory_postfix

        seqs = sequences.combine_chunks() if isinstance(sequences, pa.ChunkedArray) else sequences
        seqs = seqs.drop_null() if seqs.null_count else seqs
        flat_ids = pc.list_flatten(seqs)
        if flat_ids.null_count:
            raise DataError(f"{WHAT}: the logs hold {flat_ids.null_count} null item id(s)")
        lengths = pc.list_value_length(seqs).to_numpy(zero_copy_only=False).astype(np.int64)
        ids, flat = encode_sorted(flat_ids)
        n = len(ids)
        if n == 0:
            raise DataError(f"{WHAT}: the logs hold no interactions")
        co = sp.csr_matrix((n, n))
        ends = np.cumsum(lengths)
        # Users in chunks of about PAIRS_PER_CHUNK pair entries, each chunk's pairs summed into
        # ``co``: memory follows the distinct pairs, not the length of the logs.
        per_user = 2 * window_pairs(lengths, window)
        bounds = np.searchsorted(np.cumsum(per_user), np.arange(PAIRS_PER_CHUNK, per_user.sum(), PAIRS_PER_CHUNK))
        with tqdm(total=len(lengths), desc="association pairs", unit="user", disable=not progress) as bar:
            for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(lengths)]):
                if hi > lo:
                    start = ends[lo - 1] if lo else 0
                    co = co + _pair_counts(flat[start:ends[hi - 1]], lengths[lo:hi], n, window=window,
                                           forward=forward, backward=backward, decay=decay, log_recency=log_recency)
                    bar.update(hi - lo)
                    bar.set_postfix(memory_postfix(co.nnz), refresh=False)
        counts = np.bincount(flat, minlength=n).astype(np.float64)
        co = sp.diags(1.0 / counts**alpha) @ co @ sp.diags(1.0 / counts**beta)
        matrix = _top_per_row(co.tocsr(), top_m)
        params = dict(window=window, forward=forward, backward=backward, decay=decay, log_recency=log_recency,
                      alpha=alpha, beta=beta, top_m=top_m)
        return cls(ids, counts.astype(np.float32), matrix, params=params)

    # -- files --------------------------------------------------------------------------------

    def save(self, folder: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
        """Write the index folder (files replaced atomically, the manifest last)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)
        coo = self.matrix.tocoo()
        order = np.lexsort((-coo.data, coo.row))
        tables = {
            ITEMS_FILE: pa.table({ITEM_ID: self.ids, "count": pa.array(self.counts, pa.float32())}),
            NEIGHBOURS_FILE: pa.table({"item": pa.array(coo.row[order], pa.int32()),
                                       "neighbour": pa.array(coo.col[order], pa.int32()),
                                       "score": pa.array(coo.data[order], pa.float32())}),
        }
        for name, table in tables.items():
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
            os.close(fd)
            try:
                pq.write_table(table, tmp)
                os.replace(tmp, folder / name)
            finally:
                Path(tmp).unlink(missing_ok=True)
        write_json_atomic(folder / MANIFEST, {
            **(extra or {}), "kind": "association", "params": self.params, "items": len(self.ids),
            "pairs": int(self.matrix.nnz), "files": {name: sha256_file(folder / name) for name in tables},
        })
        self.location = str(folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "AssociationIndex":
        """Open an index folder, checking its manifest and checksums."""
        folder = Path(folder)
        manifest = read_manifest(folder, what=WHAT)
        if manifest.get("kind") != "association":
            raise ArtifactError(f"{WHAT}: {folder / MANIFEST} describes a {manifest.get('kind')!r} artifact, not an association index")
        verify_files(folder, manifest, what=WHAT)
        try:
            items = pq.read_table(folder / ITEMS_FILE)
            pairs = pq.read_table(folder / NEIGHBOURS_FILE)
            ids, counts = items.column(ITEM_ID).combine_chunks(), items.column("count").to_numpy()
            row, col = (pairs.column(c).to_numpy().astype(np.int64) for c in ("item", "neighbour"))
            score = pairs.column("score").to_numpy().astype(np.float32)
        except (OSError, KeyError, pa.ArrowException) as exc:
            raise ArtifactError(f"{WHAT} at {folder} cannot be read ({exc}); rebuild it with `funnel build`") from exc
        n = len(ids)
        if len(row) and (row.max() >= n or col.max() >= n or min(row.min(), col.min()) < 0):
            raise ArtifactError(f"{WHAT} at {folder}: {NEIGHBOURS_FILE} refers to items beyond the {n} in {ITEMS_FILE}")
        matrix = sp.csr_matrix((score, (row, col)), shape=(n, n))
        return cls(ids, counts, matrix, params=manifest.get("params", {}), location=str(folder))

    # -- lookups ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, ids: pa.Array | list) -> np.ndarray:
        """Item position of each id, -1 for ids the index does not know."""
        return lookup_positions(ids, self.ids)

    def pair_scores(self, items: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
        """``score[items[i], neighbours[i]]`` for every i (0 where absent or a position is -1).

        A binary search in each item's row of the CSR matrix (at most ``top_m`` sorted
        columns), not over every pair of the index: the cost follows the lookups, not the index.
        """
        items, neighbours = np.asarray(items, np.int64), np.asarray(neighbours, np.int64)
        out = np.zeros(len(items), np.float32)
        ok = (items >= 0) & (neighbours >= 0)
        if not ok.any() or self.matrix.nnz == 0:
            return out
        if not self.matrix.has_canonical_format:
            self.matrix.sum_duplicates()  # sorted columns per row, for the binary search
        if ok.all():
            out[:] = np.asarray(self.matrix[items, neighbours]).ravel()
        else:
            out[ok] = np.asarray(self.matrix[items[ok], neighbours[ok]]).ravel()
        return out

    def user_scores(self, histories: list[np.ndarray], recency: float) -> sp.csr_matrix:
        """Sparse (users, items) scores: each history's weighted sum of its items' rows."""
        return (histories_to_matrix(histories, len(self.ids), recency) @ self.matrix).tocsr()


#: Pair entries counted at once when learning an association index (about 24 bytes each).
PAIRS_PER_CHUNK = 8_000_000
#: Bytes an association build holds per item pair it may keep (sparse sums, their sum with a
#: chunk, the top-M sort), for the estimate checked before it starts.
BYTES_PER_PAIR = 50


def window_pairs(lengths: np.ndarray, window: int) -> np.ndarray:
    """Per sequence, the pairs of items at most ``window`` steps apart (one direction)."""
    m = np.minimum(window, np.maximum(lengths - 1, 0))
    return m * lengths - m * (m + 1) // 2


def association_memory(lengths: np.ndarray, n_items: int, window: int) -> int:
    """Bytes :meth:`AssociationIndex.learn` may hold: every distinct pair it can meet, plus a chunk."""
    pairs = 2 * int(window_pairs(lengths, window).sum())
    return min(pairs, n_items * n_items) * BYTES_PER_PAIR + min(pairs, PAIRS_PER_CHUNK) * 24 * 3


def _pair_counts(flat: np.ndarray, lengths: np.ndarray, n: int, *, window: int, forward: float, backward: float,
                 decay: float, log_recency: float) -> sp.csr_matrix:
    """The weighted pair counts of some whole sequences (``flat`` item positions, ``lengths``)."""
    seq_of = np.repeat(np.arange(len(lengths)), lengths)
    steps_to_end = np.repeat(np.cumsum(lengths), lengths) - 1 - np.arange(len(flat))
    rows, cols, vals = [], [], []
    for d in range(1, window + 1):
        same = seq_of[:-d] == seq_of[d:] if d < len(flat) else np.zeros(0, bool)
        if not same.any():
            break
        first, later = np.flatnonzero(same), np.flatnonzero(same) + d
        w = decay ** (d - 1) * log_recency ** steps_to_end[later].astype(np.float64)
        rows += [flat[first], flat[later]]
        cols += [flat[later], flat[first]]
        vals += [forward * w, backward * w]
    if not rows:
        return sp.csr_matrix((n, n))
    co = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    co.sum_duplicates()
    return co


def encode_sorted(values: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """``(sorted distinct values, position of each value among them)``, as ``np.unique`` with
    ``return_inverse`` but in Arrow, without a Python object per value."""
    if len(values) == 0:
        return values, np.zeros(0, np.int64)
    encoded = pc.dictionary_encode(values)
    order = pc.sort_indices(encoded.dictionary).to_numpy()
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return encoded.dictionary.take(pa.array(order)), rank[encoded.indices.to_numpy(zero_copy_only=False)]


def lookup_positions(values: pa.Array | pa.ChunkedArray | list, ids: pa.Array) -> np.ndarray:
    """Position of each value in ``ids`` (a hash lookup in Arrow), -1 where absent or of another type."""
    if not isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = pa.array(values, type=ids.type) if len(values) else pa.array([], ids.type)
    if len(values) == 0:
        return np.zeros(0, np.int64)
    if values.type != ids.type:
        try:
            values = values.cast(ids.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            return np.full(len(values), -1, np.int64)
    found = pc.index_in(values, value_set=ids)
    return pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)


class SortedIds:
    """Integer item ids sorted once, looked up by binary search.

    :func:`lookup_positions` hashes its ``ids`` on every call, which a batch of one query pays
    for in full against a whole catalog; this costs ``O(n log m)`` per batch of ``n`` and nothing
    per call beyond it. :meth:`of` gives ``None`` for ids that are not integers or hold nulls, and
    :meth:`positions` gives ``None`` for such values: callers keep their general path for those.
    """

    def __init__(self, ids: np.ndarray):
        self.order = np.argsort(ids, kind="stable")
        self.keys = ids[self.order]

    @classmethod
    def of(cls, ids: pa.Array | pa.ChunkedArray) -> "SortedIds | None":
        if not pa.types.is_integer(ids.type) or ids.null_count:
            return None
        return cls(ids.to_numpy())

    def positions(self, values: pa.Array | pa.ChunkedArray) -> np.ndarray | None:
        """Row of each value in the ids given at construction, -1 where absent."""
        if not pa.types.is_integer(values.type) or values.null_count:
            return None
        values = values.to_numpy()
        if not len(self.keys):
            return np.full(len(values), -1, np.int64)
        at = np.minimum(np.searchsorted(self.keys, values), len(self.keys) - 1)
        return np.where(self.keys[at] == values, self.order[at], -1).astype(np.int64)


def history_weights(length: int, recency: float) -> np.ndarray:
    """Weights of a history of ``length`` items, oldest first: ``recency**(steps before the last)``."""
    return recency ** np.arange(length - 1, -1, -1, dtype=np.float64)


def histories_to_matrix(histories: list[np.ndarray], n_items: int, recency: float) -> sp.csr_matrix:
    """A sparse (users, items) matrix of history weights; positions -1 (unknown items) are skipped."""
    lengths = np.array([len(h) for h in histories], np.int64)
    if lengths.sum() == 0:
        return sp.csr_matrix((len(histories), n_items))
    pos = np.concatenate([np.asarray(h, np.int64) for h in histories])
    ends = np.cumsum(lengths)
    steps = np.repeat(ends, lengths) - 1 - np.arange(len(pos))  # steps before each history's last item
    keep = pos >= 0
    row_of = np.repeat(np.arange(len(histories)), lengths)
    indptr = np.r_[0, np.cumsum(np.bincount(row_of[keep], minlength=len(histories)))]
    matrix = sp.csr_matrix((recency ** steps[keep].astype(np.float64), pos[keep], indptr),
                           shape=(len(histories), n_items))
    matrix.sum_duplicates()  # an item twice in a history: one entry, the weights summed
    return matrix


def _top_per_row(matrix: sp.csr_matrix, m: int) -> sp.csr_matrix:
    """Keep the ``m`` largest entries of each row."""
    coo = matrix.tocoo()
    frame = (pl.DataFrame({"r": coo.row, "c": coo.col, "v": coo.data})
             .filter(pl.col("v") > 0)
             .sort(["r", "v", "c"], descending=[False, True, False])
             .filter(pl.int_range(pl.len()).over("r") < m))
    return sp.csr_matrix((frame["v"].to_numpy().astype(np.float32), (frame["r"].to_numpy(), frame["c"].to_numpy())),
                         shape=matrix.shape)


def split_histories(histories: pa.ChunkedArray | pa.Array, lookup) -> list[np.ndarray]:
    """Each row's history mapped through ``lookup`` (ids -> int positions; a null history is empty)."""
    arr = histories.combine_chunks() if isinstance(histories, pa.ChunkedArray) else histories
    if len(arr) == 0:
        return []
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = lookup(pc.list_flatten(arr))
    return np.split(flat, np.cumsum(lengths)[:-1])


def top_k_rows(scores: sp.csr_matrix, k: int, exclude: list[np.ndarray] | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row the ``k`` best positive entries: ``(row, column, score)`` arrays, rows in order, best
    first, ties broken by the lower column; ``exclude`` lists columns never returned, per row.

    One sort of all the entries by (row, score, column), no loop over the rows.
    """
    n_rows, n_cols = scores.shape
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(scores.indptr))
    cols, vals = scores.indices.astype(np.int64), scores.data
    keep = vals > 0
    if exclude is not None and len(exclude):
        # membership by a binary search in each row of a sparse (rows, columns) indicator
        excluded = histories_to_matrix(exclude, n_cols, 1.0)
        if excluded.nnz:
            keep &= np.asarray(excluded[rows, cols]).ravel() == 0
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    keep = vals >= _kth_largest(rows, vals, n_rows, k)[rows]  # about k entries per row left to sort
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    order = np.lexsort((cols, -vals, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    first = np.searchsorted(rows, rows)  # each entry's row start, rows being sorted
    top = np.arange(len(rows)) - first < k
    return rows[top], cols[top], vals[top].astype(np.float32)


def _kth_largest(rows: np.ndarray, vals: np.ndarray, n_rows: int, k: int) -> np.ndarray:
    """Per row the ``k``-th largest of its values (``-inf`` for a row of ``k`` or fewer); ``rows``
    sorted. Rows are padded into 2-D blocks of similar lengths (within a factor of two, so the
    padding at most doubles the memory) and partitioned a block at a time."""
    counts = np.bincount(rows, minlength=n_rows)
    out = np.full(n_rows, -np.inf)
    starts = np.cumsum(counts) - counts
    long = np.flatnonzero(counts > k)
    if not len(long):
        return out
    classes = np.ceil(np.log2(counts[long])).astype(np.int64)
    for c in np.unique(classes):
        sel = long[classes == c]
        width = int(counts[sel].max())
        block = np.full((len(sel), width), -np.inf)
        local = np.repeat(np.arange(len(sel)), counts[sel])
        at = np.repeat(starts[sel], counts[sel])
        pos = np.arange(len(at)) - np.repeat(np.cumsum(counts[sel]) - counts[sel], counts[sel])
        block[local, pos] = vals[at + pos]
        out[sel] = np.partition(block, width - k, axis=1)[:, width - k]
    return out


def candidates_table(table: pa.Table, rows: np.ndarray, item_ids: pa.Array, scores: np.ndarray,
                     source: str, drop: tuple[str, ...] = ()) -> pa.Table:
    """Long-form recall output: the query columns repeated per hit, plus item_id/score/rank/source."""
    kept = [c for c in table.column_names if c not in {ITEM_ID, SCORE, RANK, SOURCE, *drop}]
    out = table.select(kept).take(pa.array(rows, pa.int64()))
    if len(rows):
        starts = np.r_[True, rows[1:] != rows[:-1]]
        group_start = np.maximum.accumulate(np.where(starts, np.arange(len(rows)), 0))
        ranks = np.arange(len(rows)) - group_start + 1
    else:
        ranks = np.zeros(0, np.int64)
    return (out.append_column(ITEM_ID, item_ids)
            .append_column(pa.field(SCORE, pa.float32()), pa.array(scores, pa.float32()))
            .append_column(pa.field(RANK, pa.int32()), pa.array(ranks, pa.int32()))
            .append_column(pa.field(SOURCE, pa.string()), pa.repeat(pa.scalar(source, pa.string()), len(rows))))


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


class AssociationRecall(Stage):
    """Recall the items most associated with a user's history (item-to-item, from the logs).

    Input is one row per user with a ``history`` list of item ids, oldest first. Each history
    item's neighbours in an :class:`AssociationIndex` are summed with recency weights (the
    last item weighs 1, each older one ``recency`` times less) and the ``k`` best items are
    returned, long form like every recall stage: the query's columns, ``item_id``, ``score``,
    ``rank`` and ``source``. With ``exclude_history`` the user's own items are never returned
    (they would otherwise take places in the top ``k``). A user whose history holds no item the
    index knows gets no rows.

    ``funnel build`` learns the index from ``[data] logs`` (Parquet with ``user_id`` and
    ``items``, a list of item ids in time order; see :class:`AssociationIndex` for the
    weighting): ``window``, ``forward``, ``backward``, ``decay``, ``log_recency``, ``alpha``,
    ``beta`` and ``top_m`` are its settings. The build is skipped when the logs and settings
    are unchanged.

    Args:
        index: folder of the index, relative to the config file's folder.
        k: items per user.
        history_column: list column of item ids, oldest first.
        recency: weight ratio between consecutive history items, in (0, 1].
        exclude_history: never return an item of the user's history.
        source: value of the ``source`` column.
        window: largest distance in a sequence between two items that still counts as a pair.
        forward: weight of a pair in time order (``b`` after ``a``).
        backward: weight of a pair against time order.
        decay: weight ratio per extra step between the two items of a pair, in (0, 1].
        log_recency: weight ratio per step between a pair and the end of its sequence, in (0, 1].
        alpha: popularity discount of the history item (exponent of its count).
        beta: popularity discount of the recalled item (exponent of its count).
        top_m: neighbours kept per item.
    """

    name = "recall.association"
    input_schema = pa.schema([pa.field(QUERY_ID, ANY), pa.field(HISTORY, pa.list_(ANY))])
    output_schema = pa.schema([pa.field(ITEM_ID, ANY), pa.field(SCORE, pa.float32()), pa.field(RANK, pa.int32()),
                               pa.field(SOURCE, pa.string())])
    tags = StageTags(requires_build=True, level="query")
    path_params = ("index",)

    def __init__(self, index: str = "artifacts/association", k: int = 100, history_column: str = HISTORY,
                 recency: float = 0.6, exclude_history: bool = True, source: str = "assoc", window: int = 20,
                 forward: float = 1.0, backward: float = 0.3, decay: float = 0.9, log_recency: float = 1.0,
                 alpha: float = 0.0, beta: float = 0.4, top_m: int = 200):
        self.index = index
        self.k = k
        self.history_column = history_column
        self.recency = recency
        self.exclude_history = exclude_history
        self.source = source
        self.window = window
        self.forward = forward
        self.backward = backward
        self.decay = decay
        self.log_recency = log_recency
        self.alpha = alpha
        self.beta = beta
        self.top_m = top_m

    def required_columns(self) -> pa.Schema:
        return pa.schema([pa.field(QUERY_ID, ANY), pa.field(self.history_column, pa.list_(ANY))])

    def validate_params(self) -> None:
        super().validate_params()
        for p in ("k", "window", "top_m"):
            if not _is_int(getattr(self, p)) or getattr(self, p) < 1:
                raise self._bad_param(p, "an int >= 1")
        for p in ("recency", "decay", "log_recency"):
            if not _is_number(getattr(self, p)) or not 0 < getattr(self, p) <= 1:
                raise self._bad_param(p, "a number in (0, 1]")
        for p in ("forward", "backward", "alpha", "beta"):
            if not _is_number(getattr(self, p)) or getattr(self, p) < 0:
                raise self._bad_param(p, "a number >= 0")
        if not isinstance(self.exclude_history, bool):
            raise self._bad_param("exclude_history", "true or false")
        if not isinstance(self.source, str) or not self.source:
            raise self._bad_param("source", "a non-empty string")

    def _learn_params(self) -> dict[str, Any]:
        return {p: getattr(self, p) for p in ("window", "forward", "backward", "decay", "log_recency", "alpha", "beta", "top_m")}

    def build(self, upstream: Pipeline | None, ctx: BuildContext) -> str:
        """Learn the index from ``[data] logs``; skipped when logs and settings are unchanged."""
        folder = self.resolve_path(self.index)
        logs_path = ctx.data_path("logs")
        key = build_key(stage=self.name, params=self._learn_params(), logs=sha256_file(logs_path))
        if not ctx.force and (folder / MANIFEST).exists() and read_manifest(folder, what=WHAT).get("build_key") == key:
            return f"{self.name}: up to date ({folder})"
        logs = read_logs(logs_path)
        items = logs.column("items").combine_chunks()
        lengths = pc.fill_null(pc.list_value_length(items), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        n_items = len(pc.unique(pc.list_flatten(items)))
        check_fits(self.name, f"counting item pairs up to {self.window} steps apart in {logs.num_rows} users' logs",
                   association_memory(lengths, n_items, self.window), "window", self.window)
        index = AssociationIndex.learn(logs.column("items"), **self._learn_params(), progress=ctx.progress)
        index.save(folder, extra={"build_key": key, "logs": str(logs_path), "users": logs.num_rows})
        return f"{self.name}: {index.matrix.nnz} associations between {len(index)} items from {logs.num_rows} users in {folder}"

    def warm_up(self) -> None:
        super().warm_up()
        if getattr(self, "index_", None) is None:
            self.index_ = AssociationIndex.load(self.resolve_path(self.index))

    def transform(self, table: pa.Table) -> pa.Table:
        index: AssociationIndex = self.index_
        histories = split_histories(table.column(self.history_column), index.positions)
        scores = index.user_scores(histories, self.recency)
        rows, cols, vals = top_k_rows(scores, self.k, histories if self.exclude_history else None)
        return candidates_table(table, rows, index.ids.take(pa.array(cols)), vals, self.source)
