"""Content recall from a user's history: a recency-weighted mean of item embeddings, searched in FAISS."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

from indexes.faiss_index import FaissIndex
from pipeline.artifacts import MANIFEST, build_key, read_manifest, sha256_file
from pipeline.build import BuildContext
from pipeline.columns import HISTORY, ITEM_ID, QUERY_ID, RANK, SCORE, SOURCE
from pipeline.data import read_catalog
from pipeline.schema import ANY
from pipeline.stage import Pipeline, Stage, StageTags

from .association import _is_int, _is_number, candidates_table, histories_to_matrix, lookup_positions, split_histories
from .faiss import _item_texts, build_vector_index, validate_search_params
from .gpu_util import index_on_device
from .sentence_transformers import DEFAULT_MODEL, PRECISIONS, SentenceTransformerEncoder

__all__ = ["UserVectorRecall", "ItemVectors"]


def _unit_rows(vectors: np.ndarray, chunk: int = 65_536, tol: float = 1e-4) -> bool:
    """Whether every row has L2 norm 1 within ``tol`` (or is all zeros), checked a chunk at a time."""
    for start in range(0, len(vectors), chunk):
        norms = np.linalg.norm(vectors[start:start + chunk], axis=1)
        if not np.all((np.abs(norms - 1) <= tol) | (norms == 0)):
            return False
    return True


class ItemVectors:
    """The item embeddings of a FAISS index folder, L2-normalised, with an id -> row lookup.

    Read back from the index itself (exact for Flat, HNSW and IVF-Flat indexes), so the content
    recall and the history features share one artifact.
    """

    def __init__(self, ids: pa.Array, vectors: np.ndarray):
        self.ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
        self.vectors = vectors

    @classmethod
    def from_index(cls, index: FaissIndex) -> "ItemVectors":
        """A flat index whose vectors are already unit length is viewed in place (no second copy of
        the catalogue in memory); any other is read back and normalised."""
        stored = index.stored_vectors()
        if stored is not None and _unit_rows(stored):
            return cls(index.ids, stored)
        vectors = np.ascontiguousarray(index.vectors(np.arange(index.ntotal)), np.float32)
        faiss.normalize_L2(vectors)
        return cls(index.ids, vectors)

    @classmethod
    def load(cls, folder: str | Path) -> "ItemVectors":
        return cls.from_index(FaissIndex.load(folder))

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, ids: pa.Array | list) -> np.ndarray:
        """Row of each id, -1 for ids the index does not hold."""
        return lookup_positions(ids, self.ids)


class UserVectorRecall(Stage):
    """Recall the items whose title embedding is nearest to the user's recent taste.

    The user vector is the mean of the embeddings of the history items, weighted by recency
    (the last item weighs 1, each older one ``recency`` times less), L2-normalised; the ``k``
    items with the highest cosine similarity are returned from a FAISS index, long form
    (``item_id``, ``score``, ``rank``, ``source``). With ``exclude_history`` the user's own
    items are skipped (the search asks for enough extra hits to still return ``k``). A user with
    no history item in the index gets no rows.

    ``funnel build`` embeds ``[data] catalog`` (the ``item_text`` columns joined) with the
    sentence-transformers ``model`` — the encode stage's own :meth:`encode_texts` — and saves a
    :class:`indexes.FaissIndex` folder; the history features read the same folder. With
    ``vector_column`` it indexes that catalog column instead — a vector per item computed
    elsewhere (image embeddings from a CLIP-like model, or any other): streamed from the
    Parquet file (:func:`pipeline.data.read_item_vectors`), L2-normalised, items without a
    vector (null or all zeros) left out. Several vector sources are fused by ``recall.fused``
    like text sources, and ``features.vectors`` turns each into ranking features.

    Args:
        index: FAISS index folder, relative to the config file's folder.
        k: items per user.
        history_column: list column of item ids, oldest first.
        recency: weight ratio between consecutive history items, in (0, 1].
        exclude_history: never return an item of the user's history.
        source: value of the ``source`` column.
        model: sentence-transformers model that embeds the item texts (build).
        vector_column: catalog column of precomputed item vectors (list<float32> or
            fixed_size_list<float32>[d]) to index instead of encoding ``item_text`` (build);
            ``model``, ``item_text`` and the encoder settings are then unused.
        item_text: catalog columns joined into each item's text (build).
        factory: FAISS index factory string (build); one that keeps vectors (Flat, HNSW32, IVF..,Flat).
        batch_size: texts per encoder batch (build).
        max_seq_length: encoder truncation in tokens (build); ``None`` keeps the model's.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA) for the encoder (build).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (encoder at build, search at run).
        search_backend: ``"auto"``, ``"faiss"`` or ``"torch"``; as for ``recall.faiss``.
        search_storage: ``"auto"``, ``"fp32"``, ``"fp16"``, ``"bf16"`` or ``"int8"``; as for
            ``recall.faiss``.
    """

    name = "recall.user_vector"
    input_schema = pa.schema([pa.field(QUERY_ID, ANY), pa.field(HISTORY, pa.list_(ANY))])
    output_schema = pa.schema([pa.field(ITEM_ID, ANY), pa.field(SCORE, pa.float32()), pa.field(RANK, pa.int32()),
                               pa.field(SOURCE, pa.string())])
    tags = StageTags(devices=("cpu", "cuda"), requires_build=True, level="query")
    path_params = ("index",)
    same_results_params = ("search_storage",)

    def __init__(self, index: str = "artifacts/content", k: int = 100, history_column: str = HISTORY,
                 recency: float = 0.7, exclude_history: bool = True, source: str = "content",
                 model: str = DEFAULT_MODEL, item_text: list[str] | tuple[str, ...] = ("title",), factory: str = "Flat",
                 batch_size: int = 64, max_seq_length: int | None = None, precision: str = "fp32",
                 device: str = "auto", search_backend: str = "auto", search_storage: str = "auto",
                 vector_column: str | None = None):
        self.index = index
        self.k = k
        self.history_column = history_column
        self.recency = recency
        self.exclude_history = exclude_history
        self.source = source
        self.model = model
        self.item_text = item_text
        self.factory = factory
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length
        self.precision = precision
        self.device = device
        self.search_backend = search_backend
        self.search_storage = search_storage
        self.vector_column = vector_column

    def required_columns(self) -> pa.Schema:
        return pa.schema([pa.field(QUERY_ID, ANY), pa.field(self.history_column, pa.list_(ANY))])

    def validate_params(self) -> None:
        super().validate_params()
        validate_search_params(self)
        if not _is_int(self.k) or self.k < 1:
            raise self._bad_param("k", "an int >= 1")
        if not _is_number(self.recency) or not 0 < self.recency <= 1:
            raise self._bad_param("recency", "a number in (0, 1]")
        if not isinstance(self.exclude_history, bool):
            raise self._bad_param("exclude_history", "true or false")
        if not isinstance(self.source, str) or not self.source:
            raise self._bad_param("source", "a non-empty string")
        if not self.item_text or not all(isinstance(c, str) for c in self.item_text):
            raise self._bad_param("item_text", "a non-empty list of catalog column names")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise self._bad_param("batch_size", "an int >= 1")
        if self.max_seq_length is not None and (not _is_int(self.max_seq_length) or self.max_seq_length < 1):
            raise self._bad_param("max_seq_length", "None or an int >= 1")
        if self.precision not in PRECISIONS:
            raise self._bad_param("precision", f"one of {PRECISIONS}")
        if self.vector_column is not None and (not isinstance(self.vector_column, str) or not self.vector_column):
            raise self._bad_param("vector_column", "None or a catalog column name")

    def _encoder(self) -> SentenceTransformerEncoder:
        return SentenceTransformerEncoder(model=self.model, batch_size=self.batch_size, normalize=True,
                                          precision=self.precision, max_seq_length=self.max_seq_length,
                                          device=self.device)

    def build(self, upstream: Pipeline | None, ctx: BuildContext) -> str:
        """Embed and index the catalog; skipped when the catalog and encoder settings are unchanged."""
        folder = self.resolve_path(self.index)
        catalog_path = ctx.data_path("catalog")
        if self.vector_column is not None:
            return build_vector_index(self, folder, catalog_path, self.vector_column, self.factory, "ip", ctx)
        key = build_key(stage=self.name, model=self.model, item_text=list(self.item_text), factory=self.factory,
                        max_seq_length=self.max_seq_length, precision=self.precision, catalog=sha256_file(catalog_path))
        if not ctx.force and (folder / MANIFEST).exists() and read_manifest(folder, what="index").get("build_key") == key:
            return f"{self.name}: up to date ({folder})"
        catalog = read_catalog(catalog_path, list(self.item_text))
        ctx.log(f"{self.name}: encoding {catalog.num_rows} catalog items with {self.model} for the index {folder} ...")
        embeddings = self._encoder().encode_texts(_item_texts(catalog, self.item_text), progress=ctx.progress,
                                                  desc=f"{self.name} {'/'.join(folder.parts[-2:])}: encoding items")
        index = FaissIndex.build(embeddings, catalog.column(ITEM_ID), factory=self.factory, metric="ip",
                                 normalize=True, encoder=self.model)
        index.save(folder, extra={"build_key": key, "item_text": list(self.item_text), "source": str(catalog_path)})
        return f"{self.name}: embedded and indexed {index.ntotal} items ({self.factory}, dim {index.dim}) in {folder}"

    def warm_up(self) -> None:
        if getattr(self, "index_", None) is not None:
            return
        self.validate_params()
        super().warm_up()
        try:
            index = FaissIndex.load(self.resolve_path(self.index))
            self.vectors_ = ItemVectors.from_index(index)
            index = index_on_device(self, index)
        except BaseException:
            self.device_ = None
            raise
        self.index_ = index

    def transform(self, table: pa.Table) -> pa.Table:
        vectors: ItemVectors = self.vectors_
        histories = split_histories(table.column(self.history_column), vectors.rows)
        weights = histories_to_matrix(histories, len(vectors), self.recency)
        users = np.flatnonzero(weights.getnnz(axis=1) > 0)
        if len(users) == 0:
            return candidates_table(table, np.zeros(0, np.int64), vectors.ids.slice(0, 0), np.zeros(0, np.float32),
                                    self.source)
        queries = np.asarray(weights[users] @ vectors.vectors, np.float32)
        extra = max(len(histories[u]) for u in users) if self.exclude_history else 0
        k = min(self.k + extra, self.index_.ntotal)
        scores, positions = self.index_.search(queries, k)
        found = positions >= 0
        if self.exclude_history:
            for i, u in enumerate(users):
                found[i] &= ~np.isin(positions[i], histories[u])
        found &= np.cumsum(found, axis=1) <= self.k
        qi, _ = np.nonzero(found)
        return candidates_table(table, users[qi], self.index_.ids_for(positions[found]), scores[found], self.source)

