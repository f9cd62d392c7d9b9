"""Display stage: diversified top-N by maximal marginal relevance (MMR), on torch."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.columns import ITEM_ID, QUERY_ID, RANK, SCORE
from pipeline.errors import ConfigError, DataError
from pipeline.schema import ANY, EMBEDDING, keep_input_types
from pipeline.stage import Stage, StageTags

__all__ = ["MMRDisplay", "mmr_select"]


def mmr_select(relevance, embeddings, valid, n: int, mmr_lambda: float):
    """Greedy MMR for a batch of queries at once; returns ``(Q, min(n, M))`` positions, -1 when none.

    Args:
        relevance: ``(Q, M)`` float tensor, each query's candidates in rank order.
        embeddings: ``(Q, M, D)`` float tensor, L2-normalised (or zero) item vectors.
        valid: ``(Q, M)`` bool tensor; padding is False.
        n: picks per query.
        mmr_lambda: weight of relevance against similarity to what is already picked.

    Step ``t`` picks, per query, the unpicked candidate maximising
    ``mmr_lambda * relevance - (1 - mmr_lambda) * max(similarity to the picked ones)`` (no
    penalty for the first pick). Ties go to the earlier candidate (``argmax`` returns the first
    maximum on CPU and CUDA alike), so ``mmr_lambda = 1`` keeps the input order.
    """
    import torch

    q, m = relevance.shape
    steps = min(n, m)
    picks = torch.full((q, steps), -1, dtype=torch.long, device=relevance.device)
    if steps == 0 or q == 0:
        return picks
    sims = torch.bmm(embeddings, embeddings.transpose(1, 2))
    available = valid.clone()
    penalty = torch.zeros_like(relevance)
    rows = torch.arange(q, device=relevance.device)
    neg_inf = torch.tensor(float("-inf"), dtype=relevance.dtype, device=relevance.device)
    for t in range(steps):
        gain = torch.where(available, mmr_lambda * relevance - (1.0 - mmr_lambda) * penalty, neg_inf)
        best = gain.argmax(dim=1)
        has = available.any(dim=1)
        picks[:, t] = torch.where(has, best, torch.full_like(best, -1))
        available[rows, best] = False
        picked_sims = sims[rows, best]
        penalty = picked_sims if t == 0 else torch.maximum(penalty, picked_sims)
    return picks


class MMRDisplay(Stage):
    """Show ``n`` candidates per query, re-ordered for diversity by maximal marginal relevance.

    MMR (Carbonell & Goldstein, 1998) trades relevance against redundancy: it picks the best
    candidate first, then each time the one maximising ``mmr_lambda * relevance - (1 -
    mmr_lambda) * (its largest cosine similarity to the items already picked)``. Relevance is the
    candidate's ``score`` scaled to [0, 1] within its query (min-max), so the trade-off does not
    depend on the ranker's score scale. ``mmr_lambda = 1`` is the plain top-``n`` by ``rank``;
    lower values push near-duplicates (five colours of one kettle) down the list.

    Only the ``candidates`` best-ranked rows of each query are considered. The item vectors come
    from either

    * ``index``: a FAISS index folder (the one ``recall.faiss`` searches, ``"artifacts/index"``);
      vectors are read back from it by ``item_id`` (exact for Flat, HNSW and IVF-Flat indexes,
      approximate for compressed ones), or
    * ``embedding_column``: a list-of-float column of the candidates.

    An item without a vector (not in the index, or a null embedding) gets a zero vector:
    similarity 0 to every other item. The selection runs as batched tensor operations on torch, for all queries of the
    batch at once, on the CPU or on a CUDA device (``device``); the output is the shown rows in
    MMR order with ``rank`` 1..n, every other column passing through. CPU and CUDA pick the same
    items except where two candidates' MMR gains tie to float rounding.

    Args:
        n: rows shown per query.
        mmr_lambda: relevance weight in [0, 1].
        candidates: best-ranked rows per query that MMR chooses from.
        index: FAISS index folder holding the item vectors (relative to the config file).
        embedding_column: column holding item vectors instead.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
    """

    name = "display.mmr"
    input_schema = pa.schema([pa.field(QUERY_ID, ANY), pa.field(SCORE, pa.float32()), pa.field(RANK, pa.int32())])
    output_schema = pa.schema([pa.field(RANK, pa.int32())])
    tags = StageTags(devices=("cpu", "cuda"), level="candidate")
    top_param = "n"
    path_params = ("index",)

    def __init__(self, n: int = 10, mmr_lambda: float = 0.7, candidates: int = 100, index: str | None = None,
                 embedding_column: str | None = None, device: str = "auto"):
        self.n = n
        self.mmr_lambda = mmr_lambda
        self.candidates = candidates
        self.index = index
        self.embedding_column = embedding_column
        self.device = device

    def required_columns(self) -> pa.Schema:
        extra = [pa.field(ITEM_ID, ANY)] if self.index else []
        if self.embedding_column:
            extra.append(pa.field(self.embedding_column, EMBEDDING))
        return pa.schema(list(self.input_schema) + extra)

    def validate_params(self) -> None:
        super().validate_params()
        for param in ("n", "candidates"):
            value = getattr(self, param)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise self._bad_param(param, "an int >= 1")
        if not isinstance(self.mmr_lambda, (int, float)) or isinstance(self.mmr_lambda, bool) \
                or not 0 <= self.mmr_lambda <= 1:
            raise self._bad_param("mmr_lambda", "a number in [0, 1]")
        if bool(self.index) == bool(self.embedding_column):
            raise ConfigError(f"stage '{self.name}' needs exactly one source of item vectors: 'index' (a FAISS index "
                              f"folder) or 'embedding_column'; got index={self.index!r}, "
                              f"embedding_column={self.embedding_column!r}")

    def warm_up(self) -> None:
        if self.is_warm:
            return
        self.validate_params()
        index = None
        if self.index:
            from indexes.faiss_index import FaissIndex

            index = FaissIndex.load(self.resolve_path(self.index))
        super().warm_up()
        self.index_ = index

    def _item_vectors(self, table: pa.Table) -> np.ndarray:
        if self.index_ is not None:
            return self.index_.vectors(self.index_.positions_for(table.column(ITEM_ID)))
        col = table.column(self.embedding_column).combine_chunks()
        lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)
        dims = set(lengths[lengths > 0].tolist())
        if len(dims) > 1:
            raise DataError(f"stage '{self.name}': column '{self.embedding_column}' holds vectors of lengths "
                            f"{sorted(dims)}; they must all have one length")
        dim = dims.pop() if dims else 1
        out = np.zeros((len(col), dim), np.float32)
        full = lengths == dim
        if full.any():
            values = pc.list_flatten(col.filter(pa.array(full)))
            out[full] = pc.fill_null(values, 0.0).to_numpy(zero_copy_only=False).reshape(-1, dim)
        return out

    def transform(self, table: pa.Table) -> pa.Table:
        import torch

        frame = (pl.from_arrow(table)
                 .with_row_index("__qpos").with_columns(pl.col("__qpos").min().over(QUERY_ID))
                 .sort(["__qpos", RANK, SCORE], descending=[False, False, True], maintain_order=True)
                 .with_columns(pl.int_range(pl.len()).over(QUERY_ID).alias("__pos"))
                 .filter(pl.col("__pos") < self.candidates)
                 .with_columns(pl.col("__qpos").rank("dense").cast(pl.Int64).sub(1).alias("__q")))
        if frame.height == 0:
            return keep_input_types(frame.drop("__qpos", "__pos", "__q").to_arrow(), table.schema)
        sorted_table = frame.to_arrow()
        q_idx = frame["__q"].to_numpy().astype(np.int64)
        pos = frame["__pos"].to_numpy().astype(np.int64)
        n_q, width = int(q_idx.max()) + 1, int(pos.max()) + 1
        score = frame[SCORE].cast(pl.Float64).fill_null(float("nan")).to_numpy()
        relevance = _minmax_per_query(score, q_idx, n_q)
        vectors = self._item_vectors(sorted_table)

        device = torch.device(self.device_)
        emb = torch.zeros((n_q, width, vectors.shape[1]), dtype=torch.float32, device=device)
        rel = torch.zeros((n_q, width), dtype=torch.float32, device=device)
        valid = torch.zeros((n_q, width), dtype=torch.bool, device=device)
        qi, pi = torch.from_numpy(q_idx).to(device), torch.from_numpy(pos).to(device)
        emb[qi, pi] = torch.nn.functional.normalize(torch.from_numpy(vectors).to(device), dim=1)
        rel[qi, pi] = torch.from_numpy(relevance.astype(np.float32)).to(device)
        valid[qi, pi] = True
        picks = mmr_select(rel, emb, valid, self.n, float(self.mmr_lambda)).cpu().numpy()

        starts = np.searchsorted(q_idx, np.arange(n_q))
        query_of, shown = np.nonzero(picks >= 0)
        rows = starts[query_of] + picks[query_of, shown]
        out = sorted_table.take(pa.array(rows, pa.int64())).drop_columns(["__qpos", "__pos", "__q"])
        out = out.set_column(out.schema.get_field_index(RANK), pa.field(RANK, pa.int32()),
                             pa.array(shown + 1, pa.int32()))
        return keep_input_types(out, table.schema)


def _minmax_per_query(score: np.ndarray, q_idx: np.ndarray, n_q: int) -> np.ndarray:
    """Scores scaled to [0, 1] within each query; 1 where a query's scores are all equal, 0 for NaN."""
    finite = np.isfinite(score)
    lo = np.full(n_q, np.inf)
    hi = np.full(n_q, -np.inf)
    np.minimum.at(lo, q_idx[finite], score[finite])
    np.maximum.at(hi, q_idx[finite], score[finite])
    span = (hi - lo)[q_idx]
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = np.where(span > 0, (score - lo[q_idx]) / np.where(span > 0, span, 1.0), 1.0)
    return np.where(finite, scaled, 0.0)
