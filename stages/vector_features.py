"""Ranking features from one source of item vectors (titles, images, any per-item embedding)."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from threadpoolctl import threadpool_limits

from pipeline.columns import HISTORY, ITEM_ID, QUERY_ID, RANK
from pipeline.schema import ANY, keep_input_types
from pipeline.stage import Stage, StageTags

from .association import _is_int, _is_number
from .features import feature_column
from .history import history_similarities, query_histories

__all__ = ["VectorFeatures", "MODES"]

MODES = ("history", "results")
_NAME = r"[A-Za-z0-9_]+"


class VectorFeatures(Stage):
    """Add cosine-similarity features of each candidate's vector from one item-vector index.

    ``index`` is a FAISS index folder holding a vector per item: one that ``recall.user_vector``
    or ``recall.faiss`` builds, from titles or — with their ``vector_column`` — from a catalog
    column of precomputed vectors (image embeddings). One stage per vector source, each with
    its own ``source`` name, so the ranker learns how far to trust each:

    - ``mode = "history"`` (recommendation): ``f_sim_last_<source>``, ``f_sim_max_<source>`` and
      ``f_sim_mean_<source>``, the cosine of the candidate's vector to the user's last history
      item, the highest to any history item and the recency-weighted mean (as
      ``features.history``'s ``sim_*`` for titles).
    - ``mode = "results"`` (search, where a text query has no image vector):
      ``f_sim_top_<source>``, the cosine of the candidate's vector to the normalised mean vector
      of the query's ``top_m`` candidates by ``rank`` (pseudo-relevance feedback: what the best
      text matches look like), and ``f_sim_top1_<source>``, its cosine to the first candidate's.

    A candidate without a vector in the index gets NaN (a missing value for LightGBM).

    Args:
        index: FAISS index folder of item vectors, relative to the config file's folder.
        source: name of the vector source, the suffix of the feature columns (letters, digits, ``_``).
        mode: ``"history"`` or ``"results"``.
        history_column: list column of item ids, oldest first (``mode="history"``).
        recency: weight ratio between consecutive history items for the mean, in (0, 1].
        top_m: candidates whose mean vector the others are compared with (``mode="results"``).
    """

    name = "features.vectors"
    input_schema = pa.schema([pa.field(QUERY_ID, ANY), pa.field(ITEM_ID, ANY)])
    tags = StageTags(level="candidate")
    path_params = ("index",)

    def __init__(self, index: str = "artifacts/image", source: str = "image", mode: str = "history",
                 history_column: str = HISTORY, recency: float = 0.6, top_m: int = 10):
        self.index = index
        self.source = source
        self.mode = mode
        self.history_column = history_column
        self.recency = recency
        self.top_m = top_m

    def validate_params(self) -> None:
        super().validate_params()
        if not isinstance(self.source, str) or not re.fullmatch(_NAME, self.source):
            raise self._bad_param("source", "a name of letters, digits and '_'")
        if self.mode not in MODES:
            raise self._bad_param("mode", f"one of {MODES}")
        if not isinstance(self.index, str) or not self.index:
            raise self._bad_param("index", "an index folder")
        if not _is_number(self.recency) or not 0 < self.recency <= 1:
            raise self._bad_param("recency", "a number in (0, 1]")
        if not _is_int(self.top_m) or self.top_m < 1:
            raise self._bad_param("top_m", "an int >= 1")

    def feature_names(self) -> list[str]:
        kinds = ("sim_last", "sim_max", "sim_mean") if self.mode == "history" else ("sim_top", "sim_top1")
        return [f"{k}_{self.source}" for k in kinds]

    def required_columns(self) -> pa.Schema:
        extra = (pa.field(self.history_column, pa.list_(ANY)) if self.mode == "history" else pa.field(RANK, ANY))
        return pa.schema([pa.field(QUERY_ID, ANY), pa.field(ITEM_ID, ANY), extra])

    def produced_columns(self) -> pa.Schema:
        return pa.schema([pa.field(feature_column(n), pa.float32()) for n in self.feature_names()])

    def warm_up(self) -> None:
        super().warm_up()
        if getattr(self, "vectors_", None) is not None:
            return
        self.validate_params()
        from .user_vector import ItemVectors

        self.vectors_ = ItemVectors.load(self.resolve_path(self.index))

    def transform(self, table: pa.Table) -> pa.Table:
        items = table.column(ITEM_ID).combine_chunks()
        if self.mode == "history":
            qcodes, lengths, flat_hist = query_histories(table, self.history_column)
            values = history_similarities(self.vectors_, qcodes, lengths, flat_hist, items, self.recency)
        else:
            values = self._results(table, items)
        result = table.drop_columns([c for c in self.produced_columns().names if c in table.column_names])
        for name, v in zip(self.feature_names(), values):
            result = result.append_column(pa.field(feature_column(name), pa.float32()), pa.array(v, pa.float32()))
        return keep_input_types(result, table.schema)

    def _results(self, table: pa.Table, items: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        vectors = self.vectors_
        n = table.num_rows
        qcodes = pc.dictionary_encode(table.column(QUERY_ID).combine_chunks()).indices
        qcodes = qcodes.to_numpy(zero_copy_only=False).astype(np.int64)
        ranks = pc.fill_null(pc.cast(table.column(RANK), pa.float64()), np.inf).to_numpy(zero_copy_only=False)
        rows_in_index = vectors.rows(items)
        top, top1 = np.full(n, np.nan), np.full(n, np.nan)
        order = np.lexsort((ranks, qcodes))
        bounds = np.searchsorted(qcodes[order], np.arange(int(qcodes.max(initial=-1)) + 2))
        with threadpool_limits(1):
            for q in range(len(bounds) - 1):
                rows = order[bounds[q]:bounds[q + 1]]
                known = rows[rows_in_index[rows] >= 0]
                if not len(known):
                    continue
                mat = vectors.vectors[rows_in_index[known]]
                centre = mat[: self.top_m].mean(axis=0)
                norm = np.linalg.norm(centre)
                if norm > 0:
                    top[known] = mat @ (centre / norm)
                top1[known] = mat @ mat[0]
        return top, top1
