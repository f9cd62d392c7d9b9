"""Popularity recall: the most interacted-with items, global or recent, as a backfill source."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.artifacts import MANIFEST, build_key, read_manifest, sha256_file, verify_files, write_json_atomic
from pipeline.build import BuildContext
from pipeline.columns import HISTORY, ITEM_ID, QUERY_ID, RANK, SCORE, SOURCE
from pipeline.data import read_logs
from pipeline.errors import ArtifactError, DataError
from pipeline.schema import ANY
from pipeline.stage import Pipeline, Stage, StageTags

from .association import _is_int, _is_number, candidates_table, encode_sorted, lookup_positions

__all__ = ["PopularityRecall", "GroupPopularityRecall", "learn_popularity", "load_popularity", "build_popularity",
           "POPULARITY_FILE", "BY"]

POPULARITY_FILE = "popularity.parquet"
WHAT = "popularity table"
BY = ("count", "recent")


def learn_popularity(sequences: pa.Array | pa.ChunkedArray, recent_decay: float) -> pa.Table:
    """``item_id``, ``count`` (interactions) and ``recent`` (interactions weighted by recency).

    Logs hold each user's items in time order but no shared clock, so an interaction's recency is
    its distance to the end of its own sequence: it weighs ``recent_decay**steps`` (the user's
    last item 1, the one before ``recent_decay`` ...).
    """
    seqs = sequences.combine_chunks() if isinstance(sequences, pa.ChunkedArray) else sequences
    seqs = seqs.drop_null() if seqs.null_count else seqs
    flat = pc.list_flatten(seqs)
    if flat.null_count:
        raise DataError(f"{WHAT}: the logs hold null item ids")
    if len(flat) == 0:
        raise DataError(f"{WHAT}: the logs hold no interactions")
    lengths = pc.list_value_length(seqs).to_numpy(zero_copy_only=False).astype(np.int64)
    steps = np.repeat(np.cumsum(lengths), lengths) - 1 - np.arange(len(flat))
    ids, inverse = encode_sorted(flat)
    count = np.bincount(inverse, minlength=len(ids))
    recent = np.bincount(inverse, weights=recent_decay ** steps.astype(np.float64), minlength=len(ids))
    return pa.table({ITEM_ID: ids, "count": pa.array(count.astype(np.float32)),
                     "recent": pa.array(recent.astype(np.float32))})


def load_popularity(folder: str | Path) -> pa.Table:
    """The table :func:`learn_popularity` made, from a checked artifact folder."""
    folder = Path(folder)
    manifest = read_manifest(folder, what=WHAT)
    if manifest.get("kind") != "popularity":
        raise ArtifactError(f"{WHAT}: {folder / MANIFEST} describes a {manifest.get('kind')!r} artifact, not popularity")
    verify_files(folder, manifest, what=WHAT)
    try:
        table = pq.read_table(folder / POPULARITY_FILE)
    except (OSError, pa.ArrowException) as exc:
        raise ArtifactError(f"{WHAT} at {folder} cannot be read ({exc}); rebuild it with `funnel build`") from exc
    missing = [c for c in (ITEM_ID, *BY) if c not in table.column_names]
    if missing:
        raise ArtifactError(f"{WHAT} at {folder}: {POPULARITY_FILE} lacks {', '.join(missing)}; rebuild it with `funnel build`")
    return table


def build_popularity(folder: Path, ctx: BuildContext, recent_decay: float, *, who: str) -> str:
    """Count ``[data] logs`` with :func:`learn_popularity` into ``folder`` (``popularity.parquet``
    and a checksummed manifest); skipped when the logs and ``recent_decay`` are unchanged. Every
    stage that reads a popularity table builds through here with the same build key, so a
    folder they share is counted once."""
    logs_path = ctx.data_path("logs")
    key = build_key(stage=PopularityRecall.name, recent_decay=recent_decay, logs=sha256_file(logs_path))
    if not ctx.force and (folder / MANIFEST).exists() and read_manifest(folder, what=WHAT).get("build_key") == key:
        return f"{who}: up to date ({folder})"
    table = learn_popularity(read_logs(logs_path).column("items"), recent_decay)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{POPULARITY_FILE}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, folder / POPULARITY_FILE)
    finally:
        Path(tmp).unlink(missing_ok=True)
    write_json_atomic(folder / MANIFEST, {"kind": "popularity", "build_key": key, "recent_decay": recent_decay,
                                          "logs": str(logs_path), "items": table.num_rows,
                                          "files": {POPULARITY_FILE: sha256_file(folder / POPULARITY_FILE)}})
    return f"{who}: counted {table.num_rows} items in {folder}"


class PopularityRecall(Stage):
    """Recall the most popular items, so that every user gets candidates (cold start, backfill).

    ``by = "count"`` ranks items by their interactions in the logs, ``by = "recent"`` by
    interactions weighted towards the end of each user's sequence (see
    :func:`learn_popularity`). The score is that number. With ``exclude_history`` (and a
    ``history_column`` in the input) the user's own items are skipped, so each user gets ``k``
    new items as long as the catalogue of logged items allows.

    ``funnel build`` counts ``[data] logs`` (``user_id``, ``items``) into ``popularity.parquet``
    (``item_id``, ``count``, ``recent``) with a checksummed manifest.

    Args:
        index: artifact folder, relative to the config file's folder.
        k: items per user.
        by: ``"count"`` or ``"recent"``.
        recent_decay: weight ratio per step from the end of a sequence, in (0, 1] (build).
        history_column: list column of item ids to exclude; ``None`` for none (no history input).
        exclude_history: skip the user's own items.
        source: value of the ``source`` column.
    """

    name = "recall.popularity"
    input_schema = pa.schema([pa.field(QUERY_ID, ANY)])
    output_schema = pa.schema([pa.field(ITEM_ID, ANY), pa.field(SCORE, pa.float32()), pa.field(RANK, pa.int32()),
                               pa.field(SOURCE, pa.string())])
    tags = StageTags(requires_build=True, level="query")
    path_params = ("index",)

    def __init__(self, index: str = "artifacts/popularity", k: int = 100, by: str = "count", recent_decay: float = 0.8,
                 history_column: str | None = HISTORY, exclude_history: bool = True, source: str = "popular"):
        self.index = index
        self.k = k
        self.by = by
        self.recent_decay = recent_decay
        self.history_column = history_column
        self.exclude_history = exclude_history
        self.source = source

    def required_columns(self) -> pa.Schema:
        fields = [pa.field(QUERY_ID, ANY)]
        if self.history_column is not None and self.exclude_history:
            fields.append(pa.field(self.history_column, pa.list_(ANY)))
        return pa.schema(fields)

    def validate_params(self) -> None:
        super().validate_params()
        if not _is_int(self.k) or self.k < 1:
            raise self._bad_param("k", "an int >= 1")
        if self.by not in BY:
            raise self._bad_param("by", f"one of {BY}")
        if not _is_number(self.recent_decay) or not 0 < self.recent_decay <= 1:
            raise self._bad_param("recent_decay", "a number in (0, 1]")
        if self.history_column is not None and (not isinstance(self.history_column, str) or not self.history_column):
            raise self._bad_param("history_column", "a column name or None")
        if not isinstance(self.exclude_history, bool):
            raise self._bad_param("exclude_history", "true or false")
        if not isinstance(self.source, str) or not self.source:
            raise self._bad_param("source", "a non-empty string")

    def build(self, upstream: Pipeline | None, ctx: BuildContext) -> str:
        """Count ``[data] logs``; skipped when the logs and ``recent_decay`` are unchanged."""
        return build_popularity(self.resolve_path(self.index), ctx, self.recent_decay, who=self.name)

    def warm_up(self) -> None:
        super().warm_up()
        if getattr(self, "ranked_", None) is not None:
            return
        table = load_popularity(self.resolve_path(self.index))
        score = table.column(self.by).to_numpy()
        order = np.lexsort((np.arange(len(score)), -score))
        self.ranked_ = table.column(ITEM_ID).combine_chunks().take(pa.array(order))
        self.scores_ = score[order].astype(np.float32)

    def transform(self, table: pa.Table) -> pa.Table:
        n, k = table.num_rows, min(self.k, len(self.ranked_))
        if self.exclude_history and self.history_column is not None:
            hist = table.column(self.history_column).combine_chunks()
            lengths = pc.fill_null(pc.list_value_length(hist), 0).to_numpy(zero_copy_only=False).astype(np.int64)
            width = min(len(self.ranked_), k + int(lengths.max(initial=0)))
            seen = np.zeros((n, width), bool)
            where = lookup_positions(pc.list_flatten(hist), self.ranked_)
            hit = (where >= 0) & (where < width)
            seen[np.repeat(np.arange(n), lengths)[hit], where[hit]] = True
            rows, cols = np.nonzero(~seen)
            keep = (np.cumsum(~seen, axis=1) <= k)[rows, cols]
            rows, cols = rows[keep], cols[keep]
        else:
            rows, cols = np.repeat(np.arange(n), k), np.tile(np.arange(k), n)
        return candidates_table(table, rows, self.ranked_.take(pa.array(cols, pa.int64())), self.scores_[cols], self.source)


def _rank_within(keys: np.ndarray) -> np.ndarray:
    """0, 1, 2 ... within each run of equal values of sorted ``keys``."""
    if not len(keys):
        return np.zeros(0, np.int64)
    first = np.r_[True, keys[1:] != keys[:-1]]
    return np.arange(len(keys)) - np.maximum.accumulate(np.where(first, np.arange(len(keys)), 0))


class GroupPopularityRecall(Stage):
    """Recall the most popular items of the groups — brands, categories — the user's history is in.

    Shoppers come back to a brand: on Amazon Beauty a user's next item shares the first word of
    its title (a brand proxy) with one of their earlier items for 22% of the users, and for 31%
    of those the association, title-embedding and popularity sources together miss it. This
    source finds such items. Each history item's group weighs
    ``decay**steps`` (the last item 1, the one before ``decay`` ...); a group's share is its
    weight over the whole history's. Each of the user's ``max_groups`` largest groups offers its
    most popular items (``by``, see :func:`learn_popularity`), scored by the group's share times
    the item's popularity; the ``k`` best items the user does not have are returned.

    ``funnel build`` counts ``[data] logs`` into ``index`` exactly as ``recall.popularity`` does
    and reads each item's group from ``[data] catalog`` into ``groups`` exactly as
    ``features.history`` does (the ``group_column`` value, or its first ``group_words`` words
    lowercased), so folders shared with those stages are built once. Items without a group, or
    never logged, are not recalled by this source.

    Args:
        index: popularity folder, relative to the config file's folder.
        groups: item-groups folder.
        group_column: catalog column that holds each item's group.
        group_words: 0 to use the column's value as it is; ``n > 0`` for its first ``n`` words.
        k: items per user.
        by: ``"count"`` or ``"recent"`` popularity.
        decay: weight ratio of a history item to the one after it, in (0, 1].
        max_groups: groups per user (the largest shares); ``None`` for all.
        recent_decay: as in ``recall.popularity`` (build).
        history_column: list column of the user's item ids, oldest first.
        exclude_history: skip the user's own items.
        source: value of the ``source`` column.
    """

    name = "recall.group_popularity"
    input_schema = pa.schema([pa.field(QUERY_ID, ANY), pa.field(HISTORY, pa.list_(ANY))])
    output_schema = PopularityRecall.output_schema
    tags = StageTags(requires_build=True, level="query")
    path_params = ("index", "groups")

    def __init__(self, index: str = "artifacts/popularity", groups: str = "artifacts/groups", group_column: str = "brand",
                 group_words: int = 0, k: int = 100, by: str = "count", decay: float = 0.7, max_groups: int | None = 5,
                 recent_decay: float = 0.8, history_column: str = HISTORY, exclude_history: bool = True,
                 source: str = "group"):
        self.index = index
        self.groups = groups
        self.group_column = group_column
        self.group_words = group_words
        self.k = k
        self.by = by
        self.decay = decay
        self.max_groups = max_groups
        self.recent_decay = recent_decay
        self.history_column = history_column
        self.exclude_history = exclude_history
        self.source = source

    def required_columns(self) -> pa.Schema:
        return pa.schema([pa.field(QUERY_ID, ANY), pa.field(self.history_column, pa.list_(ANY))])

    def validate_params(self) -> None:
        super().validate_params()
        if not _is_int(self.k) or self.k < 1:
            raise self._bad_param("k", "an int >= 1")
        if self.by not in BY:
            raise self._bad_param("by", f"one of {BY}")
        for param in ("decay", "recent_decay"):
            value = getattr(self, param)
            if not _is_number(value) or not 0 < value <= 1:
                raise self._bad_param(param, "a number in (0, 1]")
        if self.max_groups is not None and (not _is_int(self.max_groups) or self.max_groups < 1):
            raise self._bad_param("max_groups", "an int >= 1 or None (all)")
        if not isinstance(self.group_column, str) or not self.group_column:
            raise self._bad_param("group_column", "a catalog column name")
        if not _is_int(self.group_words) or self.group_words < 0:
            raise self._bad_param("group_words", "an int >= 0 (0: the whole value)")
        if not isinstance(self.history_column, str) or not self.history_column:
            raise self._bad_param("history_column", "a column name")
        if not isinstance(self.exclude_history, bool):
            raise self._bad_param("exclude_history", "true or false")
        if not isinstance(self.source, str) or not self.source:
            raise self._bad_param("source", "a non-empty string")

    def build(self, upstream: Pipeline | None, ctx: BuildContext) -> str:
        """Count ``[data] logs`` into ``index`` and read the groups of ``[data] catalog`` into
        ``groups`` (each skipped when its inputs and settings are unchanged)."""
        from .history import build_groups

        return "\n".join([build_popularity(self.resolve_path(self.index), ctx, self.recent_decay, who=self.name),
                          build_groups(self.resolve_path(self.groups), ctx, self.group_column, self.group_words,
                                       who=self.name)])

    def warm_up(self) -> None:
        super().warm_up()
        if getattr(self, "items_", None) is not None:
            return
        from .history import group_codes, load_groups

        table = load_popularity(self.resolve_path(self.index))
        self.group_ids_, self.group_codes_ = load_groups(self.resolve_path(self.groups),
                                                         what=f"stage '{self.name}' groups")
        ids = table.column(ITEM_ID).combine_chunks()
        score = table.column(self.by).to_numpy().astype(np.float64)
        code = group_codes(ids, self.group_ids_, self.group_codes_)
        keep = np.flatnonzero(code >= 0)
        order = keep[np.lexsort((keep, -score[keep], code[keep]))]  # by group, most popular first
        self.items_ = ids.take(pa.array(order, pa.int64()))
        self.scores_ = score[order]
        groups = int(self.group_codes_.max(initial=-1)) + 1
        self.starts_ = np.searchsorted(code[order], np.arange(groups + 1))

    def transform(self, table: pa.Table) -> pa.Table:
        from .history import group_codes

        n, k = table.num_rows, self.k
        hist = table.column(self.history_column).combine_chunks()
        lengths = pc.fill_null(pc.list_value_length(hist), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.list_flatten(hist)
        user = np.repeat(np.arange(n), lengths)
        steps = np.repeat(np.cumsum(lengths), lengths) - 1 - np.arange(len(flat))
        weight = float(self.decay) ** steps
        total = np.bincount(user, weights=weight, minlength=n)
        group = group_codes(flat, self.group_ids_, self.group_codes_)
        grouped = group >= 0
        # one (user, group) pair per distinct group of a history, with the group's share
        groups = len(self.starts_) - 1
        pairs, inverse = np.unique(user[grouped] * groups + group[grouped], return_inverse=True)
        share = np.bincount(inverse.ravel(), weights=weight[grouped], minlength=len(pairs))
        pair_user, pair_group = pairs // max(groups, 1), pairs % max(groups, 1)
        share = share / total[pair_user] if len(pairs) else share
        order = np.lexsort((pair_group, -share, pair_user))
        pair_user, pair_group, share = pair_user[order], pair_group[order], share[order]
        if self.max_groups is not None:
            top = _rank_within(pair_user) < self.max_groups
            pair_user, pair_group, share = pair_user[top], pair_group[top], share[top]
        # each pair offers its group's most popular items: enough for k after dropping the history
        start = self.starts_[pair_group]
        size = np.minimum(self.starts_[pair_group + 1] - start, k + lengths[pair_user])
        rows = np.repeat(pair_user, size)
        item = np.repeat(start - np.cumsum(size) + size, size) + np.arange(int(size.sum()))
        score = np.repeat(share, size) * self.scores_[item]
        if self.exclude_history and len(item):
            where = lookup_positions(flat, self.items_)
            known = where >= 0
            mine = np.isin(rows * len(self.items_) + item, user[known] * len(self.items_) + where[known])
            rows, item, score = rows[~mine], item[~mine], score[~mine]
        order = np.lexsort((item, -score, rows))
        rows, item, score = rows[order], item[order], score[order]
        top = _rank_within(rows) < k
        rows, item, score = rows[top], item[top], score[top]
        return candidates_table(table, rows, self.items_.take(pa.array(item, pa.int64())), score.astype(np.float32),
                                self.source)
