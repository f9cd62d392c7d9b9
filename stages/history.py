"""Recommendation from a user's history: the exclusion filter and the ranking features."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits

from pipeline.artifacts import MANIFEST, build_key, read_manifest, sha256_file, verify_files, write_json_atomic
from pipeline.build import BuildContext, check_fits
from pipeline.columns import HISTORY, ITEM_ID, QUERY_ID, RANK, SCORE
from pipeline.errors import ArtifactError, DataError
from pipeline.schema import ANY, keep_input_types
from pipeline.stage import Pipeline, Stage, StageTags

from .association import (AssociationIndex, _is_int, _is_number, association_memory, history_weights,
                          lookup_positions)
from .features import feature_column

__all__ = ["HistoryFilter", "HistoryFeatures", "HISTORY_FEATURES", "DEFAULT_HISTORY_FEATURES", "next_item_training",
           "next_item_views", "history_similarities", "query_histories", "item_groups", "build_groups",
           "load_groups", "group_codes"]


class HistoryFilter(Stage):
    """Drop candidates the user already has: items in the query's ``history`` list.

    With ``last_n`` set only the ``last_n`` most recent history items are excluded, for shops
    where people buy again (groceries, consumables) and an old purchase may be recommended
    anew. Recall stages that read the history usually skip those items already
    (``exclude_history``); this filter makes it hold for every source, e.g. one that knows
    nothing about histories.

    Args:
        history_column: list column of item ids, oldest first.
        last_n: exclude only the most recent ``last_n`` items; ``None`` excludes all.
    """

    name = "filter.history"
    input_schema = pa.schema([pa.field(QUERY_ID, ANY), pa.field(ITEM_ID, ANY), pa.field(HISTORY, pa.list_(ANY))])
    tags = StageTags(level="candidate")

    def __init__(self, history_column: str = HISTORY, last_n: int | None = None):
        self.history_column = history_column
        self.last_n = last_n

    def required_columns(self) -> pa.Schema:
        return pa.schema([pa.field(QUERY_ID, ANY), pa.field(ITEM_ID, ANY), pa.field(self.history_column, pa.list_(ANY))])

    def validate_params(self) -> None:
        super().validate_params()
        if not isinstance(self.history_column, str) or not self.history_column:
            raise self._bad_param("history_column", "a column name")
        if self.last_n is not None and (not _is_int(self.last_n) or self.last_n < 1):
            raise self._bad_param("last_n", "None or an int >= 1")

    def transform(self, table: pa.Table) -> pa.Table:
        if table.num_rows == 0:
            return table
        frame = pl.from_arrow(table.select([ITEM_ID, self.history_column]))
        hist = pl.col(self.history_column)
        if self.last_n is not None:
            hist = hist.list.tail(self.last_n)
        seen = frame.select(hist.list.contains(pl.col(ITEM_ID).cast(frame.schema[self.history_column].inner))
                            .fill_null(False)).to_series()
        if not seen.any():
            return table
        return table.filter(pa.array((~seen).to_numpy()))


@dataclass(frozen=True)
class HistoryFeature:
    """One feature of a candidate given the user's history; ``doc`` says what it measures."""

    needs: str  # "association", "content", "popularity" or "" (the artifact it reads)
    doc: str


HISTORY_FEATURES: dict[str, HistoryFeature] = {
    "assoc_last": HistoryFeature("association", "association score from the last history item to the candidate"),
    "assoc_prev": HistoryFeature("association", "association score from the second-to-last history item"),
    "assoc_sum": HistoryFeature("association", "recency-weighted sum of association scores over the history"),
    "assoc_max": HistoryFeature("association", "largest association score from any history item"),
    "assoc_hits": HistoryFeature("association", "history items associated with the candidate at all"),
    "assoc_match_pos": HistoryFeature("association",
                                      "steps back from the last history item to the best-associated one (NaN: none)"),
    "assoc_reverse_last": HistoryFeature("association", "association score from the candidate to the last history item"),
    "sim_last": HistoryFeature("content", "cosine similarity of the candidate's embedding to the last history item's"),
    "sim_max": HistoryFeature("content", "highest cosine similarity to any history item"),
    "sim_mean": HistoryFeature("content", "recency-weighted mean cosine similarity to the history items"),
    "pop_count": HistoryFeature("popularity", "log(1 + interactions) of the candidate in the logs"),
    "pop_recent": HistoryFeature("popularity", "recency-weighted interactions of the candidate (see recall.popularity)"),
    "history_len": HistoryFeature("", "number of items in the user's history"),
    "next_last": HistoryFeature("transitions", "times the candidate came right after the last history item in the logs"),
    "next_last_share": HistoryFeature("transitions",
                                      "next_last over all interactions with the last history item: P(next | last)"),
    "next_prev": HistoryFeature("transitions", "times the candidate came right after the second-to-last history item"),
    "group_share": HistoryFeature("groups", "share of the history in the candidate's group (its brand, say)"),
    "group_last": HistoryFeature("groups", "1 when the candidate is in the last history item's group, else 0"),
}
#: The features of the three artifacts every recommendation pipeline here has (what
#: ``features = None`` gives when ``transitions`` and ``groups`` are not set).
DEFAULT_HISTORY_FEATURES = tuple(f for f, spec in HISTORY_FEATURES.items()
                                 if spec.needs in ("association", "content", "popularity", ""))
_ARTIFACT_PARAMS = ("association", "content", "popularity", "transitions", "groups")
#: Next items kept per item in the ``transitions`` artifact (the largest counts)
TRANSITIONS_TOP_M = 1000
GROUPS_FILE = "groups.parquet"
GROUP = "group"


class HistoryFeatures(Stage):
    """Add ``f_<name>`` float32 ranking features that relate each candidate to the user's history.

    ``features`` picks from :data:`HISTORY_FEATURES` (each entry's ``doc`` says what it
    measures); ``None`` (the default) takes every feature whose artifact is set. They are:
    association scores between the history items and the candidate (from the ``association``
    index, with the position of the best-matching history item), content similarity of title
    embeddings to the last and to all history items (from the ``content`` FAISS index folder),
    the candidate's popularity (from the ``popularity`` table), the history length, and two
    optional families:

    * ``transitions`` — raw next-item counts: how often the candidate came *right after* the
      user's last (``next_last``) and second-to-last (``next_prev``) item in the logs, and
      ``next_last_share``, that count over the last item's interactions (an estimate of
      P(next = candidate | last item)). The association index blends pairs up to ``window``
      steps apart in both directions with popularity discounts; these plain counts tell the
      ranker how much of that is the immediate next step.
    * ``groups`` — the candidate's group (a brand, a category: the catalog's ``group_column``,
      or its first ``group_words`` words, e.g. a title's first word as a brand) against the
      history: ``group_share`` is the share of the history in that group, ``group_last`` whether
      it is the last item's. People who buy a brand tend to buy it again.

    ``features.vectors`` adds the same similarities for any other item-vector source, image
    embeddings included. ``association``, ``content`` and ``popularity`` are read from the
    artifacts of the recall stages of the same name; ``transitions`` and ``groups`` are built by
    this stage's own ``funnel build`` (from ``[data] logs`` and ``[data] catalog``; skipped when
    those and the settings are unchanged). An artifact parameter may be ``None`` when no chosen
    feature needs it. ``copy_columns`` are passed to the ranker as ``f_<column>`` too —
    typically the fused ``score``/``rank`` and each source's ``score_<name>``/``rank_<name>``
    (nulls stay missing values, which LightGBM handles).

    Args:
        association: association index folder (``recall.association``).
        content: FAISS index folder of item embeddings (``recall.user_vector``).
        popularity: popularity folder (``recall.popularity``).
        transitions: folder of next-item counts this stage builds from ``[data] logs``; ``None``: off.
        groups: folder of item groups this stage builds from ``[data] catalog``; ``None``: off.
        group_column: catalog column that holds each item's group.
        group_words: 0 to use the column's value as it is; ``n > 0`` to use its first ``n``
            words, lowercased (a brand from a title that starts with it).
        history_column: list column of item ids, oldest first.
        recency: history weight ratio used by ``assoc_sum`` and ``sim_mean``, in (0, 1].
        features: names from :data:`HISTORY_FEATURES`, or ``None`` for all that the set artifacts give.
        copy_columns: numeric columns copied as ``f_<column>``.
    """

    name = "features.history"
    input_schema = pa.schema([pa.field(QUERY_ID, ANY), pa.field(ITEM_ID, ANY), pa.field(HISTORY, pa.list_(ANY))])
    tags = StageTags(level="candidate")
    path_params = _ARTIFACT_PARAMS

    def __init__(self, association: str | None = "artifacts/association", content: str | None = "artifacts/content",
                 popularity: str | None = "artifacts/popularity", transitions: str | None = None,
                 groups: str | None = None, group_column: str = "brand", group_words: int = 0,
                 history_column: str = HISTORY, recency: float = 0.6,
                 features: list[str] | tuple[str, ...] | None = None,
                 copy_columns: list[str] | tuple[str, ...] = (SCORE, RANK)):
        self.association = association
        self.content = content
        self.popularity = popularity
        self.transitions = transitions
        self.groups = groups
        self.group_column = group_column
        self.group_words = group_words
        self.history_column = history_column
        self.recency = recency
        self.features = features
        self.copy_columns = copy_columns

    def _features(self) -> list[str]:
        """The chosen feature names: ``features``, or every feature whose artifact is set."""
        if self.features is not None:
            return list(self.features)
        return [f for f, spec in HISTORY_FEATURES.items() if not spec.needs or getattr(self, spec.needs)]

    def _needs(self) -> set[str]:
        return {HISTORY_FEATURES[f].needs for f in self._features() if f in HISTORY_FEATURES} - {""}

    def validate_params(self) -> None:
        super().validate_params()
        if self.features is not None and not isinstance(self.features, (list, tuple)):
            raise self._bad_param("features", f"None or a list drawn from {', '.join(HISTORY_FEATURES)}")
        unknown = [f for f in self._features() if f not in HISTORY_FEATURES]
        if unknown:
            raise self._bad_param("features", f"None or a list drawn from {', '.join(HISTORY_FEATURES)}")
        for param in _ARTIFACT_PARAMS:
            if param in self._needs() and not getattr(self, param):
                raise self._bad_param(param, "an artifact folder (a chosen feature reads it)")
        if not _is_number(self.recency) or not 0 < self.recency <= 1:
            raise self._bad_param("recency", "a number in (0, 1]")
        if not isinstance(self.group_column, str) or not self.group_column:
            raise self._bad_param("group_column", "a catalog column name")
        if not _is_int(self.group_words) or self.group_words < 0:
            raise self._bad_param("group_words", "an int >= 0 (0: the whole value)")
        if not isinstance(self.copy_columns, (list, tuple)) or not all(isinstance(c, str) for c in self.copy_columns):
            raise self._bad_param("copy_columns", "a list of column names")
        if not self._features() and not self.copy_columns:
            raise self._bad_param("features", "a non-empty list (or some copy_columns)")

    def required_columns(self) -> pa.Schema:
        fields = [pa.field(QUERY_ID, ANY), pa.field(ITEM_ID, ANY), pa.field(self.history_column, pa.list_(ANY))]
        return pa.schema(fields + [pa.field(c, ANY) for c in self.copy_columns])

    def produced_columns(self) -> pa.Schema:
        names = [feature_column(f) for f in self._features()] + [feature_column(c) for c in self.copy_columns]
        return pa.schema([pa.field(n, pa.float32()) for n in names])

    def build(self, upstream: Pipeline | None, ctx: BuildContext) -> str | None:
        """Count next-item transitions from ``[data] logs`` into ``transitions`` and read the item
        groups from ``[data] catalog`` into ``groups`` (each when a chosen feature needs it, and
        skipped when its inputs and settings are unchanged)."""
        lines = []
        if "transitions" in self._needs():
            lines.append(self._build_transitions(ctx))
        if "groups" in self._needs():
            lines.append(self._build_groups(ctx))
        return "\n".join(lines) or None

    def _build_transitions(self, ctx: BuildContext) -> str:
        from pipeline.data import read_logs

        folder = self.resolve_path(self.transitions)
        logs_path = ctx.data_path("logs")
        key = build_key(stage=self.name, artifact="transitions", top_m=TRANSITIONS_TOP_M, logs=sha256_file(logs_path))
        what = f"stage '{self.name}' transitions"
        if not ctx.force and (folder / MANIFEST).exists() and read_manifest(folder, what=what).get("build_key") == key:
            return f"{self.name}: transitions up to date ({folder})"
        logs = read_logs(logs_path)
        items = logs.column("items").combine_chunks()
        lengths = pc.fill_null(pc.list_value_length(items), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        check_fits(self.name, f"counting next-item transitions in {logs.num_rows} users' logs",
                   association_memory(lengths, len(pc.unique(pc.list_flatten(items))), 1), "transitions", self.transitions)
        # window 1, forward only, no discounts: C[a, b] = times b came right after a
        index = AssociationIndex.learn(items, window=1, forward=1.0, backward=0.0, decay=1.0, alpha=0.0, beta=0.0,
                                       top_m=TRANSITIONS_TOP_M, progress=ctx.progress)
        index.save(folder, extra={"build_key": key, "logs": str(logs_path), "users": logs.num_rows})
        return f"{self.name}: {index.matrix.nnz} (item, next item) pairs among {len(index)} items in {folder}"

    def _build_groups(self, ctx: BuildContext) -> str:
        return build_groups(self.resolve_path(self.groups), ctx, self.group_column, self.group_words, who=self.name)

    def warm_up(self) -> None:
        super().warm_up()
        if getattr(self, "loaded_", False):
            return
        from .popularity import load_popularity
        from .user_vector import ItemVectors

        needs = self._needs()
        self.assoc_ = AssociationIndex.load(self.resolve_path(self.association)) if "association" in needs else None
        self.vectors_ = ItemVectors.load(self.resolve_path(self.content)) if "content" in needs else None
        self.popularity_ = None
        if "popularity" in needs:
            pop = load_popularity(self.resolve_path(self.popularity))
            self.popularity_ = {
                "ids": pop.column(ITEM_ID).combine_chunks(),
                "count": np.log1p(pop.column("count").to_numpy().astype(np.float32)),
                "recent": pop.column("recent").to_numpy().astype(np.float32),
            }
        self.transitions_ = AssociationIndex.load(self.resolve_path(self.transitions)) if "transitions" in needs else None
        self.groups_ = load_groups(self.resolve_path(self.groups), what=f"stage '{self.name}' groups") \
            if "groups" in needs else None
        self.loaded_ = True

    def transform(self, table: pa.Table) -> pa.Table:
        qcodes, lengths, flat_hist = query_histories(table, self.history_column)
        items = table.column(ITEM_ID).combine_chunks()
        out: dict[str, np.ndarray] = {}
        if self.assoc_ is not None:
            out.update(self._assoc(qcodes, lengths, flat_hist, items))
        if self.vectors_ is not None:
            out.update(self._content(qcodes, lengths, flat_hist, items))
        if self.popularity_ is not None:
            rows = lookup_positions(items, self.popularity_["ids"])
            for name in ("count", "recent"):
                values = self.popularity_[name][np.maximum(rows, 0)] if len(rows) else np.zeros(0, np.float32)
                out[f"pop_{name}"] = np.where(rows >= 0, values, 0.0)
        if self.transitions_ is not None:
            out.update(self._transitions(qcodes, lengths, flat_hist, items))
        if self.groups_ is not None:
            out.update(self._groups(qcodes, lengths, flat_hist, items))
        out["history_len"] = lengths[qcodes].astype(np.float32)
        result = table.drop_columns([c for c in self.produced_columns().names if c in table.column_names])
        for f in self._features():
            result = result.append_column(pa.field(feature_column(f), pa.float32()), pa.array(out[f], pa.float32()))
        for c in self.copy_columns:
            values = pc.cast(table.column(c), pa.float32())
            result = result.append_column(pa.field(feature_column(c), pa.float32()), values)
        return keep_input_types(result, table.schema)

    def _pairs(self, qcodes: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every (candidate row, history slot) pair: row, flat history index, steps before the last item."""
        starts = np.r_[0, np.cumsum(lengths)[:-1]] if len(lengths) else np.zeros(0, np.int64)
        per_row = lengths[qcodes]
        rows = np.repeat(np.arange(len(qcodes)), per_row)
        offset = np.arange(len(rows)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
        slot = np.repeat(starts[qcodes], per_row) + offset
        back = np.repeat(per_row, per_row) - 1 - offset
        return rows, slot, back

    def _assoc(self, qcodes, lengths, flat_hist, items) -> dict[str, np.ndarray]:
        index: AssociationIndex = self.assoc_
        n = len(qcodes)
        hist_pos, item_pos = index.positions(flat_hist), index.positions(items)
        rows, slot, back = self._pairs(qcodes, lengths)
        score = index.pair_scores(hist_pos[slot], item_pos[rows])
        weighted = score * (self.recency ** np.arange(lengths.max(initial=0), dtype=np.float64))[back]
        total = np.bincount(rows, weights=weighted, minlength=n)
        # ``rows`` is sorted: each candidate's history slots are one segment, reduced at once
        per_row = lengths[qcodes]
        has = per_row > 0
        seg = (np.cumsum(per_row) - per_row)[has]
        best = np.zeros(n)
        match_back = np.full(n, np.inf)
        if len(seg):
            best[has] = np.maximum(np.maximum.reduceat(score, seg), 0)
            is_best = (score > 0) & (score == best[rows])
            match_back[has] = np.minimum.reduceat(np.where(is_best, back, np.inf), seg)
        hits = np.bincount(rows, weights=score > 0, minlength=n)
        last, prev = np.zeros(n), np.zeros(n)
        last[rows[back == 0]] = score[back == 0]
        prev[rows[back == 1]] = score[back == 1]
        last_slot = np.cumsum(lengths) - 1
        last_item = np.where(lengths[qcodes] > 0, hist_pos[np.maximum(last_slot[qcodes], 0)] if len(hist_pos) else -1, -1)
        reverse = index.pair_scores(item_pos, last_item)
        return {"assoc_last": last, "assoc_prev": prev, "assoc_sum": total, "assoc_max": best, "assoc_hits": hits,
                "assoc_match_pos": np.where(np.isfinite(match_back), match_back, np.nan),
                "assoc_reverse_last": reverse}

    def _content(self, qcodes, lengths, flat_hist, items) -> dict[str, np.ndarray]:
        last, best, mean = history_similarities(self.vectors_, qcodes, lengths, flat_hist, items, self.recency)
        return {"sim_last": last, "sim_max": best, "sim_mean": mean}

    def _transitions(self, qcodes, lengths, flat_hist, items) -> dict[str, np.ndarray]:
        index: AssociationIndex = self.transitions_
        hist_pos, item_pos = index.positions(flat_hist), index.positions(items)
        ends = np.cumsum(lengths)
        per_row = lengths[qcodes]

        def back(steps: int) -> np.ndarray:  # each row's history item ``steps`` before the last (-1: none)
            ok = per_row > steps
            at = np.where(ok, ends[qcodes] - 1 - steps, 0)
            return np.where(ok, hist_pos[at] if len(hist_pos) else -1, -1)

        last = back(0)
        next_last = index.pair_scores(last, item_pos)
        seen = np.where(last >= 0, index.counts[np.maximum(last, 0)], 0) if len(index.counts) else np.zeros(len(last))
        return {"next_last": next_last, "next_last_share": next_last / np.maximum(seen, 1),
                "next_prev": index.pair_scores(back(1), item_pos)}

    def _groups(self, qcodes, lengths, flat_hist, items) -> dict[str, np.ndarray]:
        ids, codes = self.groups_
        hist_group = group_codes(flat_hist, ids, codes)
        item_group = group_codes(items, ids, codes)
        rows, slot, back = self._pairs(qcodes, lengths)
        same = (hist_group[slot] == item_group[rows]) & (item_group[rows] >= 0)
        n = len(qcodes)
        share = np.bincount(rows, weights=same, minlength=n) / np.maximum(lengths[qcodes], 1)
        last = np.zeros(n)
        last[rows[back == 0]] = same[back == 0]
        return {"group_share": share, "group_last": last}


def group_codes(values: pa.Array, ids: pa.Array, codes: np.ndarray) -> np.ndarray:
    """The group code of each item id (-1: unknown item or no group)."""
    at = lookup_positions(values, ids)
    return np.where(at >= 0, codes[np.maximum(at, 0)] if len(codes) else -1, -1)


def item_groups(catalog: pa.Table, column: str, words: int = 0) -> pa.Table:
    """``item_id`` and ``group``: the catalog's ``column`` as a string, or its first ``words``
    words lowercased when ``words > 0`` (null where the item has no value or no word)."""
    values = catalog.column(column)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        if pa.types.is_nested(values.type):
            raise DataError(f"catalog column '{column}' (group_column) must hold one value per item; found {values.type}")
        values = pc.cast(values, pa.string())
    series = pl.from_arrow(values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values)
    if words:
        series = series.str.to_lowercase().str.extract_all(r"\w+").list.head(words).list.join(" ")
    series = series.replace("", None)
    return pa.table({ITEM_ID: catalog.column(ITEM_ID), GROUP: series.to_arrow().cast(pa.string())})


def build_groups(folder: Path, ctx: BuildContext, column: str, words: int = 0, *, who: str) -> str:
    """Write :func:`item_groups` of ``[data] catalog`` into ``folder`` (``groups.parquet`` and a
    checksummed manifest); skipped when the catalog, ``column`` and ``words`` are unchanged.

    Every stage that groups items (``features.history``, ``recall.group_popularity``) builds
    through here with the same build key, so a folder they share is built once.
    """
    from pipeline.data import read_catalog
    from pipeline.runner import write_parquet_atomic

    catalog_path = ctx.data_path("catalog")
    # the key names features.history, the first stage to build groups: folders built before stay up to date
    key = build_key(stage=HistoryFeatures.name, artifact="groups", column=column, words=words,
                    catalog=sha256_file(catalog_path))
    what = f"stage '{who}' groups"
    if not ctx.force and (folder / MANIFEST).exists() and read_manifest(folder, what=what).get("build_key") == key:
        return f"{who}: groups up to date ({folder})"
    table = item_groups(read_catalog(catalog_path, [column]), column, words)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    write_parquet_atomic(table, folder / GROUPS_FILE)
    groups = len(table.column(GROUP).drop_null().unique())
    write_json_atomic(folder / MANIFEST, {"kind": "item-groups", "build_key": key, "column": column, "words": words,
                                          "catalog": str(catalog_path), "items": table.num_rows, "groups": groups,
                                          "files": {GROUPS_FILE: sha256_file(folder / GROUPS_FILE)}})
    return f"{who}: {table.num_rows} items in {groups} groups ('{column}') in {folder}"


def load_groups(folder: Path, *, what: str) -> tuple[pa.Array, np.ndarray]:
    """``(item ids, group code per item)`` from an :func:`item_groups` artifact folder (code -1: no group)."""
    manifest = read_manifest(folder, what=what)
    if manifest.get("kind") != "item-groups":
        raise ArtifactError(f"{what}: {folder / MANIFEST} describes a {manifest.get('kind')!r} artifact, not item groups")
    verify_files(folder, manifest, what=what)
    try:
        table = pq.read_table(folder / GROUPS_FILE, columns=[ITEM_ID, GROUP])
    except (OSError, KeyError, pa.ArrowException) as exc:
        raise ArtifactError(f"{what} at {folder} cannot be read ({exc}); rebuild it with `funnel build`") from exc
    encoded = pc.dictionary_encode(table.column(GROUP).combine_chunks())
    codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    return table.column(ITEM_ID).combine_chunks(), codes


def query_histories(table: pa.Table, history_column: str) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """``(query code per row, history length per query, flat history items)``: each query's
    history read once, from its first row."""
    n = table.num_rows
    qcodes = pc.dictionary_encode(table.column(QUERY_ID).combine_chunks()).indices
    qcodes = qcodes.to_numpy(zero_copy_only=False).astype(np.int64)
    first = np.full(int(qcodes.max(initial=-1)) + 1, -1, np.int64)
    first[qcodes[::-1]] = np.arange(n)[::-1]
    hist = table.column(history_column).combine_chunks().take(pa.array(first))
    lengths = pc.fill_null(pc.list_value_length(hist), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return qcodes, lengths, pc.list_flatten(hist)


def history_similarities(vectors, qcodes: np.ndarray, lengths: np.ndarray, flat_hist: pa.Array, items: pa.Array,
                         recency: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cosine of each candidate's vector to its query's history items: ``(last, max, mean)``.

    ``vectors`` is an :class:`stages.user_vector.ItemVectors` (normalised rows); ``mean`` is
    weighted by recency (:func:`stages.association.history_weights`). NaN where the candidate
    or every history item (the last one, for ``last``) has no vector.
    """
    n = len(qcodes)
    hist_rows, item_rows = vectors.rows(flat_hist), vectors.rows(items)
    last, best, mean = (np.full(n, np.nan) for _ in range(3))
    order = np.argsort(qcodes, kind="stable")
    bounds = np.searchsorted(qcodes[order], np.arange(len(lengths) + 1))
    starts = np.r_[0, np.cumsum(lengths)]
    with threadpool_limits(1):  # thousands of tiny products: BLAS threads would only contend
        for q in range(len(lengths)):
            rows = order[bounds[q]:bounds[q + 1]]
            rows = rows[item_rows[rows] >= 0]
            hist = hist_rows[starts[q]:starts[q + 1]]
            known = hist >= 0
            if not len(rows) or not known.any():
                continue
            sims = vectors.vectors[item_rows[rows]] @ vectors.vectors[hist[known]].T
            weights = history_weights(len(hist), recency)[known]
            best[rows] = sims.max(axis=1)
            mean[rows] = sims @ weights / weights.sum()
            if known[-1]:
                last[rows] = sims[:, -1]
    return last, best, mean


def _artifact_folders(stage: Stage) -> list:
    """The resolved artifact folders of a stage and of the sub-pipelines it runs (fused recall)."""
    folders = [stage.resolve_path(getattr(stage, p)) for p in stage.path_params if getattr(stage, p, None)]
    for _, _, sub in getattr(stage, "_pipelines", lambda: [])():
        for inner in sub.stages:
            folders += _artifact_folders(inner)
    return folders


def next_item_training(upstream: Pipeline, ctx: BuildContext, folder: Path) -> tuple[pa.Table, pa.Table, Pipeline]:
    """What a ranker learns next-item recommendation from, without ever seeing its targets.

    From ``[data] logs`` every user's last item becomes the target and the items before it the
    history (:func:`pipeline.data.next_item_targets`). Candidates and features for those
    queries must come from artifacts learned *without* the targets — otherwise the association
    between a user's last two items would contain that very pair and the ranker would learn to
    trust it too much. So the upstream stages are cloned with their artifact folders re-rooted
    under ``folder`` and built there from the logs minus each user's last item (``folder`` /
    ``prior_logs.parquet``). The serving artifacts are copied in first, so a build that does
    not depend on the logs (the item embeddings) is found up to date instead of redone.

    Returns ``(queries, judgments, training upstream)``. Artifact paths must be relative (to
    the config's folder) for the re-rooting to apply.
    """
    import dataclasses
    import shutil

    import pyarrow.parquet as pq

    from pipeline.data import next_item_targets, read_logs
    from pipeline.errors import ConfigError

    queries, judgments, prior = next_item_targets(read_logs(ctx.data_path("logs")))
    folder.mkdir(parents=True, exist_ok=True)
    logs_file = folder / "prior_logs.parquet"
    pq.write_table(prior, logs_file)
    stages = []
    for stage in upstream.stages:
        clone = stage.clone()
        clone._base_dir = folder
        for src, dst in zip(_artifact_folders(stage), _artifact_folders(clone)):
            if folder.resolve() not in dst.parents:
                raise ConfigError(f"stage '{stage.name}': artifact path {src} is absolute; next-item ranker training "
                                  "rebuilds upstream artifacts in its own folder and needs paths relative to the config")
            if src.exists() and not dst.exists():
                shutil.copytree(src, dst)
        stages.append(clone)
    sub_ctx = BuildContext(dataclasses.replace(ctx.config, data={**ctx.config.data, "logs": str(logs_file)}),
                      force=ctx.force, progress=ctx.progress, log=ctx.log)
    for i, stage in enumerate(stages):
        if hasattr(stage, "build"):
            before = Pipeline(stages[:i], inputs=upstream.inputs) if i else None
            if (line := stage.build(before, sub_ctx)) is not None:
                ctx.log("  (ranker training view, logs without each user's last item) " + line)
    return queries, judgments, Pipeline(stages, inputs=upstream.inputs)


def next_item_views(upstream: Pipeline, ctx: BuildContext, folder: Path, views: int = 1):
    """:func:`next_item_training` ``views`` times, one step further back each time: view 1's targets
    are each user's last item (artifacts under ``folder``), view ``v``'s the item ``v - 1`` steps
    before it, with artifacts rebuilt under ``folder-v`` from the logs before it, so no view's
    artifacts ever saw its own targets. Yields ``(queries, judgments, training upstream)`` per
    view; the views end early once no user has two items left (a history and a target)."""
    import dataclasses

    view_ctx = ctx
    for v in range(1, views + 1):
        view_folder = folder if v == 1 else folder.with_name(f"{folder.name}-{v}")
        queries, judgments, view = next_item_training(upstream, view_ctx, view_folder)
        yield queries, judgments, view
        # the next view learns from this one's prior logs: its queries' histories
        longest = pc.max(pc.list_value_length(queries.column(HISTORY))).as_py()
        if longest is None or longest < 2:
            return
        view_ctx = dataclasses.replace(view_ctx, config=dataclasses.replace(
            view_ctx.config, data={**view_ctx.config.data, "logs": str(view_folder / "prior_logs.parquet")}))
