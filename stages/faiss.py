"""Dense recall: nearest items to each query embedding from a FAISS index."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import polars as pl

from indexes.faiss_index import AUTO, FaissIndex, auto_factory, build_memory
from pipeline.artifacts import MANIFEST, build_key, read_manifest, sha256_file
from pipeline.build import BuildContext, check_fits, find_upstream, key_params, memory_postfix
from pipeline.columns import ITEM_ID, QUERY_EMBEDDING, QUERY_ID, RANK, SCORE, SOURCE
from pipeline.data import ITEM_ID_ALIASES, open_dataset, read_item_vectors
from pipeline.errors import ArtifactError, ConfigError, DataError
from pipeline.schema import ANY, EMBEDDING
from pipeline.stage import Pipeline, Stage, StageTags

from .gpu_util import SEARCH_BACKENDS, SEARCH_STORAGES, index_on_device

__all__ = ["FaissRecall", "build_vector_index", "vector_source"]


class FaissRecall(Stage):
    """Recall the ``k`` nearest items of each query embedding from a FAISS index.

    Input is one row per query with an embedding column (a list of float32, usually written by
    an encode stage). Output is long form: one row per (query, hit), ordered by query then rank,
    carrying the query's other columns, the hit's ``item_id`` (as the index stores it),
    ``score`` (higher is better: the inner product, or minus the squared L2 distance),
    ``rank`` (1-based) and ``source`` (to tell recall sources apart after a merge). The
    embedding column is dropped.

    The index folder is made by ``funnel build`` (see :class:`indexes.FaissIndex`). A query
    can get fewer than ``k`` hits (an IVF index with a small ``nprobe``, or ``k`` above the
    index size); ``on_short="keep"`` keeps the shorter list, ``"error"`` raises.

    Args:
        index: folder of the index, relative to the config file's folder.
        k: hits per query.
        embedding_column: column holding the query embeddings.
        nprobe: IVF lists to visit (IVF indexes only; faiss's default when ``None``).
        ef_search: HNSW search breadth (HNSW indexes only).
        on_short: ``"keep"`` or ``"error"`` when a query gets fewer than ``k`` hits.
        source: value of the ``source`` column.
        factory: FAISS index factory string used by ``funnel build`` (``"Flat"``, ``"HNSW32"``,
            ``"IVF1024,Flat"``, ``"IVF256,PQ32"`` ...), or ``"auto"``, the choice for large
            catalogs: chosen when the index is built from the item count
            (:func:`indexes.faiss_index.auto_factory`): exact ``"Flat"`` below 200,000 items,
            above ``"IVF{nlist},Flat"`` with ``nlist`` the power of two nearest ``4 * sqrt(n)``
            (1M items -> 4096) searched with 16 lists unless ``nprobe`` says otherwise. The
            index manifest records the factory and ``nprobe`` it chose (``"chosen_by": "auto"``).
        build_chunk_rows: catalog rows ``funnel build`` encodes at a time; each chunk's
            embeddings go to a shard file in a work folder beside the index
            (``<index>.parts-<key>-c<rows>/``), so a build stopped at any point resumes after the
            last complete shard, then the index is made from the shards one at a time. Lower it
            when a build stops for memory; it does not change the index.
        metric: ``"ip"`` (cosine on normalised embeddings) or ``"l2"``, used by ``funnel build``.
        item_text: catalog columns joined (space-separated, nulls skipped) into the text that
            ``funnel build`` encodes for each item, with the pipeline's own encoder.
        vector_column: catalog column of precomputed item vectors (list<float32> or
            fixed_size_list<float32>[d]) that ``funnel build`` indexes instead of encoding
            ``item_text`` (normalised; items without a vector left out). The query embeddings
            must live in the same space: e.g. a CLIP model's text tower encoding queries for
            its image embeddings (``encode.sentence_transformers`` with ``clip-ViT-B-32``).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (cuda when torch sees a GPU). On
            ``"cuda"`` the index is placed in ``warm_up()`` as ``search_backend`` says.
        search_backend: ``"auto"`` (on CUDA: faiss-gpu when the installed faiss has GPU support,
            else torch on the GPU where it gives the CPU's hits — not for an HNSW graph, which
            stays on the CPU; faiss on a CPU), ``"faiss"`` or ``"torch"`` (exact search on the
            GPU for any index; on a CPU too). See :func:`stages.gpu_util.index_on_device`.
            A faiss-gpu clone searches beyond its limits (``k`` or ``nprobe`` above 2048, see
            :func:`indexes.faiss_index.gpu_search_fallback`) on the CPU index, with a logged
            warning; torch search has no such limits (:meth:`indexes.FaissIndex.to_torch`).
            ``"faiss"`` with ``device="cuda"`` on a faiss without GPU support is an error.
        search_storage: type of the vectors torch searches: ``"auto"`` (fp16 on CUDA, fp32 on a
            CPU), ``"fp32"``, ``"fp16"``, ``"bf16"`` or ``"int8"``; candidates from a
            low-precision scan are re-scored in fp32, so scores are fp32 inner products.
    """

    name = "recall.faiss"
    input_schema = pa.schema([pa.field(QUERY_ID, ANY), pa.field(QUERY_EMBEDDING, EMBEDDING)])
    output_schema = pa.schema(
        [pa.field(ITEM_ID, ANY), pa.field(SCORE, pa.float32()), pa.field(RANK, pa.int32()), pa.field(SOURCE, pa.string())]
    )
    drops = (QUERY_EMBEDDING,)
    tags = StageTags(devices=("cpu", "cuda"), requires_build=True, level="query")
    path_params = ("index",)
    same_results_params = ("search_storage", "build_chunk_rows")

    def __init__(
        self,
        index: str = "artifacts/index",
        k: int = 100,
        embedding_column: str = QUERY_EMBEDDING,
        nprobe: int | None = None,
        ef_search: int | None = None,
        on_short: str = "keep",
        source: str = "dense",
        factory: str = "Flat",
        metric: str = "ip",
        item_text: list[str] | tuple[str, ...] = ("title",),
        device: str = "auto",
        search_backend: str = "auto",
        search_storage: str = "auto",
        vector_column: str | None = None,
        build_chunk_rows: int = 65_536,
    ):
        self.index = index
        self.k = k
        self.embedding_column = embedding_column
        self.nprobe = nprobe
        self.ef_search = ef_search
        self.on_short = on_short
        self.source = source
        self.factory = factory
        self.metric = metric
        self.item_text = item_text
        self.device = device
        self.search_backend = search_backend
        self.search_storage = search_storage
        self.vector_column = vector_column
        self.build_chunk_rows = build_chunk_rows

    def validate_params(self) -> None:
        super().validate_params()
        validate_search_params(self)
        if not _is_int(self.k) or self.k < 1:
            raise self._bad_param("k", "an int >= 1")
        if not _is_int(self.build_chunk_rows) or self.build_chunk_rows < 1:
            raise self._bad_param("build_chunk_rows", "an int >= 1")
        if not isinstance(self.factory, str) or not self.factory:
            raise self._bad_param("factory", "'auto' or a FAISS index factory string")
        if self.vector_column is not None and (not isinstance(self.vector_column, str) or not self.vector_column):
            raise self._bad_param("vector_column", "None or a catalog column name")
        for param in ("nprobe", "ef_search"):
            value = getattr(self, param)
            if value is not None and (not _is_int(value) or value < 1):
                raise self._bad_param(param, "None or an int >= 1")
        if self.on_short not in ("keep", "error"):
            raise self._bad_param("on_short", "one of ('keep', 'error')")
        if not isinstance(self.source, str):
            raise self._bad_param("source", "a string")
        if self.metric not in ("ip", "l2"):
            raise self._bad_param("metric", "one of ('ip', 'l2')")
        if not self.item_text or not all(isinstance(c, str) for c in self.item_text):
            raise self._bad_param("item_text", "a non-empty list of catalog column names")

    def _encoder(self, upstream: Pipeline | None) -> Stage | None:
        return find_upstream(upstream, lambda s: getattr(s, "output_column", None) == self.embedding_column
                             and hasattr(s, "encode_texts"))

    def check_upstream(self, upstream: Pipeline) -> None:
        """Composition-time check that an existing index was built with the upstream encoder."""
        if self.vector_column is not None:
            return  # catalog vectors: the query encoder is the user's choice; dimensions are checked at run
        encoder = self._encoder(upstream)
        folder = self.resolve_path(self.index)
        if encoder is None or not (folder / MANIFEST).exists():
            return
        built_with = read_manifest(folder, what=f"stage '{self.name}' index").get("encoder")
        if built_with is not None and built_with != encoder.model:
            raise ArtifactError(
                f"stage '{self.name}': the index at {folder} was built with encoder {built_with!r} but the pipeline "
                f"encodes queries with {encoder.model!r}; rebuild it with `funnel build`"
            )

    def build(self, upstream: Pipeline | None, ctx: BuildContext) -> str:
        """Index the catalog: its ``item_text`` encoded by the upstream encoder, or, when the
        config names ``[data] embeddings`` (Parquet with ``item_id`` and ``embedding``), those
        vectors as they are (they must come from the same encoder as the queries). With
        ``vector_column`` the catalog's vectors in that column are indexed as they are."""
        if self.vector_column is not None:
            return build_vector_index(self, self.resolve_path(self.index), ctx.data_path("catalog"),
                                      self.vector_column, self.factory, self.metric, ctx)
        encoder = self._encoder(upstream)
        if encoder is None:
            raise ConfigError(f"stage '{self.name}' needs an encode stage writing '{self.embedding_column}' before it")
        folder = self.resolve_path(self.index)
        source = ctx.data_path("embeddings" if "embeddings" in ctx.config.data else "catalog")
        # a model folder `funnel build` trains (encoder `train` table) is part of the key when there is one
        trained = {"encoder_model": k} if (k := getattr(encoder, "model_build_key", lambda: None)()) else {}
        key = build_key(stage=self.name, factory=self.factory, metric=self.metric, item_text=list(self.item_text),
                        encoder=key_params(encoder), source=sha256_file(source), **trained)
        if not ctx.force and (folder / MANIFEST).exists() and read_manifest(folder, what="index").get("build_key") == key:
            return f"{self.name}: up to date ({folder})"
        if "embeddings" in ctx.config.data:
            ids, embeddings = _read_embeddings(source)
            index = FaissIndex.build(embeddings, ids, factory=self.factory, metric=self.metric,
                                     normalize=encoder.normalize, encoder=encoder.model)
            encoded = ""
        else:
            index, encoded = self._build_from_catalog(encoder, source, folder, key, ctx)
        index.save(folder, extra={"build_key": key, "item_text": list(self.item_text), "source": str(source)})
        for work in folder.parent.glob(f"{folder.name}.parts-*"):
            shutil.rmtree(work, ignore_errors=True)
        return f"{self.name}: indexed {index.ntotal} items ({_described(index)}, dim {index.dim}{encoded}) in {folder}"

    def _build_from_catalog(self, encoder: Stage, source: Path, folder: Path, key: str,
                            ctx: BuildContext) -> tuple[FaissIndex, str]:
        """Encode the catalog ``build_chunk_rows`` at a time into shard files, then index them;
        return the index and ``"; encoded N items in S s (R items/s)"`` for the build's line.

        Shards are Arrow IPC files (``item_id``, ``embedding``) written under a temporary name
        and renamed, so one that is there is complete: a rerun after a stop skips them. The work
        folder is named by the build key and the chunk size, so another catalog, encoder or
        chunk size never reuses them; the caller removes it once the index is saved. ``--force``
        rebuilds the index but still resumes from such shards (they hold what the same key
        encodes); delete the folder to encode them again.
        """
        dataset = open_dataset(source, what="catalog file")
        names = dataset.schema.names
        id_col = ITEM_ID if ITEM_ID in names else next((a for a in ITEM_ID_ALIASES if a in names), None)
        missing = [c for c in (ITEM_ID, *self.item_text) if (id_col if c == ITEM_ID else c) not in names]
        if id_col is None or missing:
            raise DataError(f"catalog file {source} lacks column(s) {', '.join(missing)}; it has: {', '.join(names)}")
        _check_text_columns(dataset.schema.empty_table(), self.item_text, where=f"catalog file {source}",
                            stage=self.name)
        ids = dataset.to_table(columns=[id_col]).column(id_col)
        count = len(ids)
        if count == 0:
            raise DataError(f"catalog file {source} has no rows; a catalog needs at least one item")
        if ids.null_count:
            raise DataError(f"catalog file {source}: column {ITEM_ID} has {ids.null_count} null id(s)")
        if (unique := len(pc.unique(ids))) != count:
            raise DataError(f"catalog file {source}: column {ITEM_ID} has duplicate ids ({count - unique} repeats)")
        del ids
        chunk = int(self.build_chunk_rows)
        factory = auto_factory(count)[0] if self.factory == AUTO else self.factory
        dim = _encoder_dim(encoder)
        estimate = build_memory(factory, count, dim, chunk, self.metric) + min(chunk, count) * _TEXT_BYTES
        per_chunk = min(chunk, count) * (8 * dim + _TEXT_BYTES)  # a shard, its normalised copy, its text
        param = "build_chunk_rows" if 2 * per_chunk > estimate else "factory"
        check_fits(self.name, f"indexing {count} items x {dim} dimensions ({factory}, shards of {chunk} rows)",
                   estimate, param, getattr(self, param))
        work = folder.parent / f"{folder.name}.parts-{key[:12]}-c{chunk}"
        work.mkdir(parents=True, exist_ok=True)
        paths = [work / f"part-{i:05d}.arrow" for i in range((count + chunk - 1) // chunk)]
        done = sum(p.exists() for p in paths)
        ctx.log(f"{self.name}: encoding {count} catalog items ({', '.join(self.item_text)}) with {encoder.model} "
                f"for the index {folder} ..." + (f" (resuming: {done} of {len(paths)} shards already encoded)"
                                                 if done else ""))
        from tqdm.auto import tqdm

        desc = f"{self.name} {'/'.join(folder.parts[-2:])}: encoding items"
        rows = encoded = 0
        seconds = 0.0
        with tqdm(total=count, desc=desc, unit="item", disable=not ctx.progress) as bar:
            for path, table in zip(paths, _chunks(dataset, [id_col, *self.item_text], chunk)):
                if not path.exists():
                    start = time.perf_counter()
                    vectors = np.asarray(encoder.encode_texts(_item_texts(table, self.item_text)), np.float32)
                    seconds += time.perf_counter() - start
                    encoded += table.num_rows
                    _write_shard(path, table.column(0), vectors)
                rows += table.num_rows
                bar.update(table.num_rows)
                bar.set_postfix(memory_postfix(rows), refresh=False)
        index = FaissIndex.from_shards(_ShardFiles(paths), count=count, dim=dim, factory=self.factory,
                                       metric=self.metric, normalize=encoder.normalize, encoder=encoder.model,
                                       progress=ctx.progress, desc=f"{self.name} {'/'.join(folder.parts[-2:])}: indexing")
        rate = f" ({encoded / seconds:.0f} items/s)" if seconds > 0 else ""
        return index, f"; encoded {encoded} items in {seconds:.1f} s{rate}"

    def required_columns(self) -> pa.Schema:
        return pa.schema([pa.field(QUERY_ID, ANY), pa.field(self.embedding_column, EMBEDDING)])

    def dropped_columns(self) -> tuple[str, ...]:
        return (self.embedding_column,)

    def warm_up(self) -> None:
        if getattr(self, "index_", None) is not None:
            return
        self.validate_params()
        super().warm_up()
        try:
            index = index_on_device(self, FaissIndex.load(self.resolve_path(self.index)))
        except BaseException:
            self.device_ = None
            raise
        self.index_ = index

    def transform(self, table: pa.Table) -> pa.Table:
        index: FaissIndex = self.index_
        queries = self._embeddings(table, index)
        k = min(self.k, index.ntotal)
        if len(queries):
            scores, positions = index.search(queries, k, nprobe=self.nprobe, ef_search=self.ef_search)
        else:
            scores, positions = np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        found = positions >= 0
        counts = found.sum(axis=1)
        if self.on_short == "error" and (counts < self.k).any():
            row = int(np.argmax(counts < self.k))
            raise DataError(
                f"stage '{self.name}': query {table.column(QUERY_ID)[row].as_py()!r} got {int(counts[row])} hits "
                f"but k={self.k} (the index at {index.location} holds {index.ntotal} items); "
                "lower k, raise nprobe, or set on_short='keep'"
            )
        rows, _ = np.nonzero(found)
        ranks = np.cumsum(found, axis=1, dtype=np.int32)[found]
        hit_scores = scores[found] if index.metric == "ip" else -scores[found]
        kept = [c for c in table.column_names if c not in {self.embedding_column, ITEM_ID, SCORE, RANK, SOURCE}]
        out = table.select(kept).take(pa.array(rows, pa.int64()))
        return (
            out.append_column(ITEM_ID, index.ids_for(positions[found]))
            .append_column(pa.field(SCORE, pa.float32()), pa.array(hit_scores, pa.float32()))
            .append_column(pa.field(RANK, pa.int32()), pa.array(ranks, pa.int32()))
            .append_column(pa.field(SOURCE, pa.string()), pa.repeat(pa.scalar(self.source, pa.string()), len(rows)))
        )

    def invalid_rows(self, table: pa.Table) -> pa.Array | None:
        """A reason for each query whose embedding cannot be searched: null, NaN/inf or null
        values inside, or a length other than the index's dimension.

        A fixed-size embedding column of the wrong dimension is not a per-row problem (the
        index was built with another encoder): it is left to :meth:`transform`, which raises.
        """
        if not self.is_warm:
            self.warm_up()
        dim = self.index_.dim
        arr = table.column(self.embedding_column).combine_chunks()
        if len(arr) == 0 or (pa.types.is_fixed_size_list(arr.type) and arr.type.list_size != dim):
            return None
        n = len(arr)
        lengths = pc.fill_null(pc.list_value_length(arr), -1).to_numpy(zero_copy_only=False)
        values = pc.list_flatten(arr)
        parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
        floats = pc.fill_null(pc.cast(values, pa.float64()), 0.0).to_numpy(zero_copy_only=False)
        non_finite = np.bincount(parents, weights=~np.isfinite(floats), minlength=n) > 0
        null_inside = np.bincount(parents, weights=values.is_null().to_numpy(zero_copy_only=False), minlength=n) > 0
        col = f"column '{self.embedding_column}'"
        reasons: list[str | None] = [None] * n
        for row in np.flatnonzero((lengths != dim) | non_finite | null_inside):
            if lengths[row] < 0:
                reasons[row] = f"null embedding in {col}"
            elif lengths[row] != dim:
                reasons[row] = f"embedding in {col} has dimension {int(lengths[row])}; the index has {dim}"
            elif null_inside[row]:
                reasons[row] = f"embedding in {col} has null values"
            else:
                reasons[row] = f"embedding in {col} has NaN or infinite values"
        return pa.array(reasons, pa.string()) if any(r is not None for r in reasons) else None

    def _embeddings(self, table: pa.Table, index: FaissIndex) -> np.ndarray:
        """The embedding column as an (n, d) float32 matrix, each row checked to have d values."""
        col = self.embedding_column
        arr = table.column(col).combine_chunks()
        where = f"stage '{self.name}': column '{col}'"
        if arr.null_count:
            row = int(np.argmax(arr.is_null().to_numpy(zero_copy_only=False)))
            raise DataError(f"{where} is null for query {table.column(QUERY_ID)[row].as_py()!r}")
        if pa.types.is_fixed_size_list(arr.type):
            lengths = np.full(max(len(arr), 1), arr.type.list_size)
        else:
            lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(lengths != index.dim)
        if len(bad):
            raise DataError(f"{where} has dimension {int(lengths[bad[0]])} but the index at {index.location} has "
                            f"{index.dim}; was the index built with another encoder? Rebuild it with `funnel build`")
        values = pc.list_flatten(arr)
        if values.null_count:
            raise DataError(f"{where} has {values.null_count} null values inside embeddings")
        matrix = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(arr), index.dim)
        finite = np.isfinite(matrix).all(axis=1)
        if not finite.all():
            row = int(np.argmin(finite))
            raise DataError(f"{where} has NaN or infinite values for query {table.column(QUERY_ID)[row].as_py()!r}; "
                            "fix the embeddings, or run without --strict to quarantine such rows")
        return matrix


def validate_search_params(stage: Stage) -> None:
    """Check ``search_backend`` and ``search_storage`` (shared by the recall stages that search an index)."""
    if stage.search_backend not in SEARCH_BACKENDS:
        raise stage._bad_param("search_backend", f"one of {SEARCH_BACKENDS}")
    if stage.search_storage not in SEARCH_STORAGES:
        raise stage._bad_param("search_storage", f"one of {SEARCH_STORAGES}")


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_text_columns(table: pa.Table, columns, *, where: str, stage: str) -> None:
    """Item text columns must hold text, numbers or lists of them (never raw bytes)."""
    def ok(t: pa.DataType) -> bool:
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return ok(t.value_type)
        return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
                or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_dictionary(t)
                or pa.types.is_null(t))

    for column in columns:
        found = table.schema.field(column).type
        if not ok(found):
            raise DataError(f"{where}: column '{column}' is {found}; stage '{stage}' needs text (UTF-8 strings), "
                            "numbers or lists of them in its item_text columns")


#: bytes of catalog text per row held with a chunk (its strings, Arrow and Python)
_TEXT_BYTES = 512


def _described(index: FaissIndex) -> str:
    """``"Flat"``, or ``"auto: IVF4096,Flat, nprobe 16"`` for a factory chosen by ``"auto"``."""
    if index.requested_factory != AUTO:
        return index.factory
    return f"auto: {index.factory}" + (f", nprobe {index.nprobe}" if index.nprobe is not None else "")


def _encoder_dim(encoder: Stage) -> int:
    """The encoder's output dimension (``dim_`` once warm; else from one encoded text)."""
    if hasattr(encoder, "warm_up") and not getattr(encoder, "is_warm", True):
        encoder.warm_up()
    dim = getattr(encoder, "dim_", None)
    return int(dim) if dim else int(np.asarray(encoder.encode_texts(["item"])).shape[1])


def _chunks(dataset, columns: list[str], rows: int):
    """The dataset's ``columns`` as tables of exactly ``rows`` rows (the last one shorter), in
    file order, the id column renamed ``item_id``; one chunk of text in memory at a time."""
    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in dataset.to_batches(columns=columns, batch_size=min(rows, 1 << 16)):
        while batch.num_rows:
            take = min(rows - held, batch.num_rows)
            pending.append(batch.slice(0, take))
            held += take
            batch = batch.slice(take)
            if held == rows:
                yield _renamed(pa.Table.from_batches(pending))
                pending, held = [], 0
    if held:
        yield _renamed(pa.Table.from_batches(pending))


def _renamed(table: pa.Table) -> pa.Table:
    return table.rename_columns([ITEM_ID, *table.column_names[1:]])


def _write_shard(path: Path, ids: pa.ChunkedArray, vectors: np.ndarray) -> None:
    """One shard: Arrow IPC with ``item_id`` and ``embedding`` (fixed-size list of float32),
    written to a temporary name and renamed, so a shard file that exists is complete."""
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1])
    table = pa.table({ITEM_ID: ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids,
                      "embedding": embedding})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _ShardFiles:
    """The ``(item ids, vectors)`` of shard files, read one at a time each time it is iterated."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __iter__(self):
        for path in self.paths:
            try:
                with pa.memory_map(str(path)) as source:
                    table = pa.ipc.open_file(source).read_all()
            except (OSError, pa.ArrowInvalid) as exc:
                raise ArtifactError(f"embedding shard {path} cannot be read ({exc}); delete it and rerun "
                                    "`funnel build` to encode its rows again") from exc
            emb = table.column("embedding").combine_chunks()
            yield table.column(ITEM_ID).combine_chunks(), \
                emb.values.to_numpy(zero_copy_only=False).reshape(len(emb), emb.type.list_size)


def _item_texts(catalog: pa.Table, columns) -> list[str]:
    """One text per item: the columns joined by spaces, list columns (colours) flattened, nulls skipped."""
    frame = pl.from_arrow(catalog)
    parts = [pl.col(c).list.eval(pl.element().cast(pl.String)).list.join(" ") if isinstance(frame.schema[c], pl.List)
             else pl.col(c).cast(pl.String) for c in columns]
    return frame.select(pl.concat_str(parts, separator=" ", ignore_nulls=True)).to_series().fill_null("").to_list()


def _read_embeddings(path) -> tuple[pa.Array, np.ndarray]:
    from pipeline.data import read_parquet

    table = read_parquet(path, what="embeddings", columns=[ITEM_ID, "embedding"])
    col = table.column("embedding").combine_chunks()
    if not (pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or pa.types.is_large_list(col.type)):
        raise DataError(f"embeddings file {path}: column 'embedding' must be a list of floats; found {col.type}")
    lengths = set(pc.list_value_length(col).to_pylist()) if not pa.types.is_fixed_size_list(col.type) else {col.type.list_size}
    if len(lengths) != 1 or col.null_count:
        raise DataError(f"embeddings file {path}: column 'embedding' must hold non-null vectors of one length; found lengths {sorted(x for x in lengths if x is not None)}")
    dim = lengths.pop()
    values = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), dim)
    return table.column(ITEM_ID).combine_chunks(), values


def vector_source(column: str) -> str:
    """What an index built from catalog ``column`` records as its encoder: ``"column:<name>"``."""
    return f"column:{column}"


def build_vector_index(stage: Stage, folder: Path, catalog_path: Path, column: str, factory: str, metric: str,
                       ctx: BuildContext) -> str:
    """Index the vectors of catalog ``column`` (normalised for cosine) into ``folder``.

    The build key holds the column, the factory, the metric and the catalog's SHA-256, so a new
    catalog or another column rebuilds it and an unchanged one is found up to date.
    """
    key = build_key(stage=stage.name, vector_column=column, factory=factory, metric=metric,
                    catalog=sha256_file(catalog_path))
    if not ctx.force and (folder / MANIFEST).exists() and read_manifest(folder, what="index").get("build_key") == key:
        return f"{stage.name}: up to date ({folder})"
    ctx.log(f"{stage.name}: reading item vectors from column '{column}' of {catalog_path} for the index {folder} ...")
    vectors = read_item_vectors(catalog_path, column, stage=stage.name)
    index = FaissIndex.build(vectors.vectors, vectors.ids, factory=factory, metric=metric, normalize=True,
                             encoder=vector_source(column))
    index.save(folder, extra={"build_key": key, "vector_column": column, "source": str(catalog_path),
                              "missing_vectors": vectors.missing, "zero_norm_vectors": vectors.zero_norm})
    return (f"{stage.name}: indexed {index.ntotal} item vectors from column '{column}' ({factory}, dim {index.dim})"
            f"{vectors.skipped()} in {folder}")
