"""A FAISS index with its item ids, saved as a checked artifact folder."""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

from pipeline.errors import ArtifactError, ConfigError, DataError, DeviceError

__all__ = ["FaissIndex", "INDEX_FILE", "IDS_FILE", "GPU_MAX_K", "gpu_search_fallback", "faiss_has_gpu",
           "installed_faiss_distributions", "check_faiss_distributions", "AUTO", "auto_factory", "train_rows",
           "build_memory"]

log = logging.getLogger(__name__)


def installed_faiss_distributions(paths: Iterable[str] | None = None) -> list[str]:
    """Names of the installed faiss wheels (``faiss-cpu``, ``faiss-gpu-cu12`` ...) on ``paths``
    (``sys.path`` by default), read from their ``.dist-info``/``.egg-info`` folder names."""
    found = set()
    for entry in sys.path if paths is None else paths:
        folder = Path(entry or ".")
        if not folder.is_dir():
            continue
        for meta in folder.glob("faiss*-info"):
            name = meta.name.removesuffix(".dist-info").removesuffix(".egg-info").split("-")[0]
            found.add(name.replace("_", "-").lower())
    return sorted(found)


def check_faiss_distributions(names: Iterable[str]) -> None:
    """Refuse two faiss wheels installed side by side (a CPU and a GPU one, or two GPU flavours).

    ``faiss-cpu`` and ``faiss-gpu*`` all install the same ``faiss`` module, so whichever was
    installed last has overwritten parts of the other and the result is neither. pip cannot
    declare that two extras conflict (``funnel-rank[cpu]`` vs ``funnel-rank[gpu]``), so this
    runs before faiss is imported and raises :class:`DeviceError` saying how to repair it.
    """
    wheels = sorted({n for n in names if n == "faiss" or n.startswith(("faiss-cpu", "faiss-gpu"))})
    if len(wheels) > 1:
        raise DeviceError(
            f"{' and '.join(wheels)} are all installed; they ship the same 'faiss' module and overwrite each "
            f"other. Keep one: `pip uninstall -y {' '.join(wheels)}` then `pip install 'funnel-rank[gpu]'` "
            "(or 'funnel-rank[cpu]' on a machine without CUDA)"
        )


# before `import faiss`: with both wheels installed, importing it may crash instead of failing clearly
check_faiss_distributions(installed_faiss_distributions())

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline.artifacts import MANIFEST, read_manifest, sha256_file, verify_files, write_json_atomic  # noqa: E402

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
WHAT = "faiss index"
#: faiss-gpu's largest k, and largest IVF nprobe, per query (GPU_MAX_SELECTION_K without cuVS)
GPU_MAX_K = 2048
#: CAGRA's default search breadth (itopk_size); it must be at least k
CAGRA_ITOPK = 64
#: Batches of at least this many queries go through BLAS (one matrix product) in exhaustive
#: searches (Flat, IVF coarse quantizers). faiss 1.15 ships a default of 128000, which sends a
#: batch of 256 queries over 54,667 x 384 vectors through its per-query kernel: 0.75 s instead
#: of 0.09 s with BLAS on 2 AMD EPYC cores (benchmarks/results/). faiss' threshold is a
#: process-wide setting; it is lowered to this value, never raised.
BLAS_THRESHOLD = 20
#: ``factory="auto"``: chosen from the item count by :func:`auto_factory`
AUTO = "auto"
#: below this many items ``"auto"`` builds an exact ``Flat`` index
AUTO_FLAT_BELOW = 200_000
#: IVF lists ``"auto"`` visits per query unless a search says otherwise (stored in the index);
#: docs/benchmarks.md measured IVF4096 at 0.960 recall@10 with 4 on 1M x 384 synthetic vectors,
#: and text embeddings cluster less cleanly than those, hence the margin
AUTO_NPROBE = 16
#: training vectors per IVF list: faiss warns below 39; k-means subsamples above 256
TRAIN_PER_LIST = 64
#: training vectors at least (and for trained factories without lists, such as PQ alone)
MIN_TRAIN_ROWS = 50_000


def auto_factory(count: int) -> tuple[str, int | None]:
    """``(factory, nprobe)`` that ``factory="auto"`` builds for ``count`` items.

    Exact search (``"Flat"``, nprobe ``None``) below :data:`AUTO_FLAT_BELOW` items; above,
    ``"IVF{nlist},Flat"`` with ``nlist`` the power of two nearest ``4 * sqrt(count)`` (200k ->
    2048, 1M -> 4096, 10M -> 16384) searched with :data:`AUTO_NPROBE` lists.
    """
    if count < AUTO_FLAT_BELOW:
        return "Flat", None
    nlist = 1 << round(math.log2(4 * math.sqrt(count)))
    return f"IVF{nlist},Flat", AUTO_NPROBE


def train_rows(factory: str, count: int, dim: int, metric: str = "ip") -> int:
    """Vectors a build from shards trains ``factory`` on: 0 when it needs no training, else
    ``max(TRAIN_PER_LIST * nlist, MIN_TRAIN_ROWS)`` capped by ``count``."""
    if factory == AUTO:
        factory = auto_factory(count)[0]
    if factory.upper().startswith("CAGRA"):
        return 0
    index = _make_index(dim, factory, metric)
    if index.is_trained:
        return 0
    ivf = faiss.try_extract_index_ivf(index)
    return min(count, max(TRAIN_PER_LIST * ivf.nlist if ivf is not None else 0, MIN_TRAIN_ROWS))


def build_memory(factory: str, count: int, dim: int, shard_rows: int, metric: str = "ip") -> int:
    """Bytes :meth:`FaissIndex.from_shards` holds at most for ``count`` vectors of ``dim``: the
    vectors in the index (stored raw: compressed factories hold less), the training sample, one
    shard and its normalised copy, the row ids of an IVF index and the links of an HNSW graph."""
    if factory == AUTO:
        factory = auto_factory(count)[0]
    shard = min(shard_rows, count)
    estimate = 4 * dim * (count + train_rows(factory, count, dim, metric) + 2 * shard)
    if "IVF" in factory.upper():
        estimate += 8 * count
    if (hnsw := re.search(r"HNSW(\d*)", factory.upper())) is not None:
        estimate += 8 * count * int(hnsw.group(1) or 32)
    return estimate


def _make_index(dim: int, factory: str, metric: str) -> faiss.Index:
    if metric not in METRICS:
        raise ConfigError(f"{WHAT}: metric must be one of {tuple(METRICS)}; got {metric!r} instead")
    try:
        return faiss.index_factory(dim, factory, METRICS[metric])
    except RuntimeError as exc:
        raise ConfigError(f"{WHAT}: faiss cannot make an index from factory string {factory!r} ({_reason(exc)})") from exc


def prefer_blas_for_batches() -> None:
    """Lower faiss' ``distance_compute_blas_threshold`` to :data:`BLAS_THRESHOLD` (see there)."""
    if faiss.cvar.distance_compute_blas_threshold > BLAS_THRESHOLD:
        faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD


def gpu_search_fallback(k: int, *, nprobe: int | None = None, ef_search: int | None = None, gpu_kind: str = "flat",
                        max_k: int = GPU_MAX_K) -> str | None:
    """Why a search must run on the CPU copy of an index cloned to the GPU; ``None`` when the GPU can.

    faiss-gpu selects at most ``max_k`` results per query (2048 for the GPU indexes without
    cuVS; more with some cuVS indexes, but 2048 is the limit every build honours) and visits at
    most as many IVF lists; ``ef_search`` tunes a CPU HNSW graph (or an HNSW coarse quantizer),
    which the GPU copy only keeps as such when it is a GPU HNSW or CAGRA index (``gpu_kind``
    ``"hnsw"``/``"cagra"``). Beyond those limits the CPU index answers, with the same results it
    gives on a CPU-only machine.
    """
    if k > max_k:
        return f"k={k} exceeds faiss-gpu's limit of {max_k} results per query"
    if nprobe is not None and nprobe > max_k:
        return f"nprobe={nprobe} exceeds faiss-gpu's limit of {max_k} IVF lists per query"
    if ef_search is not None and gpu_kind not in ("hnsw", "cagra"):
        return f"ef_search={ef_search} tunes an HNSW graph that the GPU copy ({gpu_kind}) does not have"
    return None


def faiss_has_gpu() -> bool:
    """True when the installed faiss was built with GPU support (faiss-gpu, not faiss-cpu)."""
    return hasattr(faiss, "StandardGpuResources")


def _gpu_kind(index: Any) -> str:
    """``"cagra"``, ``"hnsw"``, ``"ivf"`` or ``"flat"``: what a GPU index is, from its class."""
    try:
        name = type(faiss.downcast_index(index)).__name__
    except (RuntimeError, TypeError):
        name = type(index).__name__
    for key in ("cagra", "hnsw", "ivf"):
        if key in name.lower():
            return key
    return "flat"


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "data_ptr")


def _as_matrix(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise DataError(f"{what} must be a 2-d array (rows, dimension); got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


class _Storage:
    """A read-only ``float32`` array interface over memory that ``owner`` holds: the base of the
    arrays :meth:`FaissIndex.stored_vectors` returns, so that they keep the index alive."""

    def __init__(self, owner: object, address: int, shape: tuple[int, int]):
        self.owner = owner
        self.__array_interface__ = {"data": (address, True), "shape": shape, "typestr": "<f4", "version": 3}


class FaissIndex:
    """Nearest-neighbour search over item embeddings, backed by a real FAISS index.

    FAISS returns row positions; the item ids live beside the index in an Arrow array
    (position -> id), so ids may be integers or strings, unlike ``IndexIDMap``. On disk an index
    is a folder holding ``index.faiss`` (``faiss.write_index``, no pickle), ``ids.parquet`` and a
    ``manifest.json`` with the build settings and the SHA-256 of both files. The manifest is
    written last, so a folder whose manifest is there and whose checksums match is complete.

    Build with :meth:`build`, persist with :meth:`save`, open with :meth:`load`, query with
    :meth:`search` and turn positions into ids with :meth:`ids_for`.
    """

    def __init__(
        self,
        index: faiss.Index,
        ids: pa.Array,
        *,
        factory: str,
        metric: str,
        normalize: bool,
        encoder: str | None,
        location: str = "memory",
    ):
        if len(ids) != index.ntotal:
            raise ArtifactError(f"{WHAT} at {location} has {index.ntotal} vectors but {len(ids)} item ids")
        self._cpu_index = index
        self._index = index
        self._gpu_resources = None
        self._gpu_device = None
        self._gpu_kind = None
        self._torch = None
        self.ids = ids
        self._factory = factory
        self._metric = metric
        self.normalize = normalize
        self._encoder = encoder
        self.location = location
        #: the factory asked for (``"auto"``) when it differs from :attr:`factory`
        self.requested_factory = factory
        ivf = faiss.try_extract_index_ivf(index)
        self._ivf = ivf is not None
        self._hnsw = isinstance(faiss.downcast_index(index), faiss.IndexHNSW)
        self._hnsw_quantizer = ivf is not None and isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW)

    # -- building -----------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        item_ids: pa.Array,
        *,
        factory: str = "Flat",
        metric: str = "ip",
        normalize: bool = True,
        encoder: str | None = None,
        train_size: int | None = None,
        seed: int = 0,
    ) -> "FaissIndex":
        """Index ``embeddings`` (n, d) whose row i is the item ``item_ids[i]``.

        ``factory`` is a FAISS index factory string ("Flat", "HNSW32", "IVF1024,Flat", ...) or
        ``"auto"`` (:func:`auto_factory`). Indexes that need training (IVF, PQ) are trained on
        ``train_size`` rows sampled with ``seed`` (all rows when ``None``). The same as
        :meth:`from_shards` with one shard.
        """
        x = _as_matrix(embeddings, "embeddings")
        if isinstance(item_ids, pa.ChunkedArray):
            item_ids = item_ids.combine_chunks()
        item_ids = pa.array(item_ids) if not isinstance(item_ids, pa.Array) else item_ids
        if len(item_ids) != len(x):
            raise DataError(f"{WHAT}: {len(x)} embeddings but {len(item_ids)} item ids")
        return cls.from_shards([(item_ids, x)], count=len(x), dim=x.shape[1], factory=factory, metric=metric, normalize=normalize,
                               encoder=encoder, train_size=len(x) if train_size is None else train_size, seed=seed)

    @classmethod
    def from_shards(
        cls,
        shards: Iterable[tuple[pa.Array, np.ndarray]],
        *,
        count: int | None = None,
        dim: int | None = None,
        factory: str = "Flat",
        metric: str = "ip",
        normalize: bool = True,
        encoder: str | None = None,
        train_size: int | None = None,
        seed: int = 0,
        nprobe: int | None = None,
        progress: bool = False,
        desc: str = "indexing",
    ) -> "FaissIndex":
        """Index ``(item ids, vectors)`` shards in order, holding one shard at a time beside the index.

        ``shards`` is a sequence, or any iterable that gives the same shards each time it is
        iterated (one that reads shard files, say): it is iterated once to add the vectors, once
        more for a training sample when the factory needs training, once to count the rows
        when ``count`` is not given, and its first shard is read for the dimension when ``dim``
        is not given. Each shard is normalised in a copy (when ``normalize``) and
        added; the ids are concatenated as Arrow. The index equals :meth:`build`'s on the
        concatenated shards (bit for bit for Flat; for trained factories too when ``train_size``
        and ``seed`` are the same).

        ``factory="auto"`` picks the factory and ``nprobe`` from ``count`` (:func:`auto_factory`).
        Trained factories (IVF, PQ) are trained on ``train_size`` rows (:func:`train_rows` when
        ``None``; all rows when it is ``count`` or more) drawn with ``seed`` over the whole
        sequence and gathered shard by shard. ``nprobe`` is stored in an IVF index as the lists
        a search visits when it does not say (faiss' default is 1).
        """
        if metric not in METRICS:
            raise ConfigError(f"{WHAT}: metric must be one of {tuple(METRICS)}; got {metric!r} instead")
        if count is None:
            count = sum(len(ids) for ids, _ in shards)
        if count == 0:
            raise DataError(f"{WHAT}: no embeddings to index")
        requested = factory
        if factory == AUTO:
            factory, auto_nprobe = auto_factory(count)
            nprobe = auto_nprobe if nprobe is None else nprobe

        def prepared(vectors: np.ndarray) -> np.ndarray:
            x = _as_matrix(vectors, "embeddings")
            if normalize:
                x = np.array(x, dtype=np.float32, order="C", copy=True)
                faiss.normalize_L2(x)
            return x

        if factory.upper().startswith("CAGRA"):  # built on the GPU from every vector at once
            parts = [(ids, prepared(v)) for ids, v in shards]
            item_ids = _concat_ids([ids for ids, _ in parts], [len(v) for _, v in parts])
            index = _build_cagra(np.concatenate([v for _, v in parts]), factory, metric)
            return cls(index, item_ids, factory=factory, metric=metric, normalize=normalize, encoder=encoder)
        for _, vectors in shards if dim is None else ():
            dim = _as_matrix(vectors, "embeddings").shape[1]
            break
        if dim is None:
            raise DataError(f"{WHAT}: no embeddings to index")
        index = _make_index(dim, factory, metric)
        if not index.is_trained:
            _train(index, shards, prepared, count, dim, factory,
                   train_rows(factory, count, dim, metric) if train_size is None else train_size, seed)
        if nprobe is not None and (ivf := faiss.try_extract_index_ivf(index)) is not None:
            ivf.nprobe = int(nprobe)
        from tqdm.auto import tqdm

        ids, sizes = [], []
        with tqdm(total=count, desc=desc, unit="row", disable=not progress) as bar:
            for shard_ids, vectors in shards:
                x = prepared(vectors)
                if x.shape[1] != dim:
                    raise DataError(f"{WHAT}: a shard of dimension {x.shape[1]} after shards of dimension {dim}")
                index.add(x)
                ids.append(shard_ids)
                sizes.append(len(x))
                bar.update(len(x))
        item_ids = _concat_ids(ids, sizes)
        if len(item_ids) != count:
            raise DataError(f"{WHAT}: the shards hold {len(item_ids)} vectors but {count} were announced")
        out = cls(index, item_ids, factory=factory, metric=metric, normalize=normalize, encoder=encoder)
        out.requested_factory = requested
        return out

    # -- files --------------------------------------------------------------------------------

    def save(self, folder: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
        """Write the index folder; ``extra`` entries (a build key, inputs) go into the manifest."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)
        tmp_index = _temp_path(folder, INDEX_FILE)
        tmp_ids = _temp_path(folder, IDS_FILE)
        try:
            faiss.write_index(self._cpu_index, str(tmp_index))
            pq.write_table(pa.table({"item_id": self.ids}), tmp_ids)
            os.replace(tmp_index, folder / INDEX_FILE)
            os.replace(tmp_ids, folder / IDS_FILE)
        finally:
            tmp_index.unlink(missing_ok=True)
            tmp_ids.unlink(missing_ok=True)
        manifest = {
            **(extra or {}),
            "kind": "faiss",
            "factory": self._factory,
            "metric": self._metric,
            "dim": self.dim,
            "normalize": self.normalize,
            "encoder": self._encoder,
            "count": self.ntotal,
            **({"nprobe": int(ivf.nprobe)} if (ivf := faiss.try_extract_index_ivf(self._cpu_index)) is not None else {}),
            **({"chosen_by": AUTO} if self.requested_factory == AUTO else {}),
            "files": {name: sha256_file(folder / name) for name in (INDEX_FILE, IDS_FILE)},
        }
        write_json_atomic(folder / MANIFEST, manifest)
        self.location = str(folder)
        return folder

    @classmethod
    def load(
        cls,
        folder: str | Path,
        *,
        expected_dim: int | None = None,
        expected_encoder: str | None = None,
    ) -> "FaissIndex":
        """Open an index folder, checking checksums, dimension, encoder and counts."""
        folder = Path(folder)
        manifest = read_manifest(folder, what=WHAT)
        if manifest.get("kind") != "faiss":
            raise ArtifactError(f"{WHAT}: {folder / MANIFEST} describes a {manifest.get('kind')!r} artifact, not a faiss index")
        missing = [name for name in (INDEX_FILE, IDS_FILE) if name not in manifest.get("files", {})]
        missing += [key for key in ("factory", "metric", "dim", "count") if key not in manifest]
        if missing:
            raise ArtifactError(f"{WHAT}: {folder / MANIFEST} lacks {', '.join(missing)}; rebuild it with `funnel build`")
        dim, encoder = manifest["dim"], manifest.get("encoder")
        if expected_dim is not None and dim != expected_dim:
            raise ArtifactError(
                f"{WHAT} at {folder} has dimension {dim} but the encoder produces {expected_dim}; rebuild it with `funnel build`"
            )
        if expected_encoder is not None and encoder != expected_encoder:
            raise ArtifactError(
                f"{WHAT} at {folder} was built with encoder {encoder} but the pipeline encodes queries with "
                f"{expected_encoder}; rebuild with `funnel build`"
            )
        verify_files(folder, manifest, what=WHAT)
        try:
            index = faiss.read_index(str(folder / INDEX_FILE))
            ids = pq.read_table(folder / IDS_FILE).column("item_id").combine_chunks()
        except (RuntimeError, OSError, KeyError, pa.ArrowException) as exc:
            raise ArtifactError(f"{WHAT} at {folder} cannot be read ({_reason(exc)}); rebuild it with `funnel build`") from exc
        if index.d != dim:
            raise ArtifactError(f"{WHAT} at {folder}: the manifest says dimension {dim} but {INDEX_FILE} has {index.d}")
        if not (index.ntotal == len(ids) == manifest["count"]):
            raise ArtifactError(
                f"{WHAT} at {folder} is inconsistent: {INDEX_FILE} holds {index.ntotal} vectors, {IDS_FILE} "
                f"{len(ids)} ids, the manifest says {manifest['count']}; rebuild it with `funnel build`"
            )
        return cls(
            index, ids, factory=manifest["factory"], metric=manifest["metric"],
            normalize=bool(manifest.get("normalize", False)), encoder=encoder, location=str(folder),
        )

    # -- devices ------------------------------------------------------------------------------

    def to_gpu(self, device: int = 0) -> "FaissIndex":
        """A copy searching on GPU ``device``; needs faiss built with GPU support (faiss-gpu).

        Flat and IVF indexes move as they are; HNSW ones where the installed faiss has a GPU HNSW
        index, and CAGRA ones (built by :meth:`build` with factory ``"CAGRA"``) as cuVS CAGRA
        graphs. The CPU index is kept beside the GPU copy: searches beyond faiss-gpu's limits
        (:func:`gpu_search_fallback`) run on it, with a logged reason.
        """
        if not faiss_has_gpu():
            raise DeviceError(
                "faiss was installed without GPU support; install funnel-rank[gpu] (faiss-gpu-cu12) "
                "instead of funnel-rank[cpu], or run this stage with device='cpu'"
            )
        resources = faiss.StandardGpuResources()
        try:
            gpu_index = faiss.index_cpu_to_gpu(resources, device, self._cpu_index)
        except RuntimeError as exc:
            raise DeviceError(
                f"{WHAT} at {self.location} ({self._factory!r}) cannot move to GPU {device} ({_reason(exc)}); "
                "use device='cpu' or a Flat/IVF index"
            ) from exc
        new = FaissIndex(
            self._cpu_index, self.ids, factory=self._factory, metric=self._metric,
            normalize=self.normalize, encoder=self._encoder, location=self.location,
        )
        new._index, new._gpu_resources, new._gpu_device = gpu_index, resources, device
        new._gpu_kind = _gpu_kind(gpu_index)
        return new

    def to_torch(self, device: str = "cuda", *, storage: str = "fp16", **options: Any) -> "FaissIndex":
        """A copy whose searches run on torch on ``device`` (:class:`indexes.torch_search.TorchSearch`).

        For a GPU on which faiss cannot search — faiss-cpu installed, as on CUDA 13 where no
        faiss GPU wheel exists, or an index type faiss-gpu lacks. The vectors are read back from
        this index (:meth:`vectors`) and stored on ``device`` as ``storage`` (``"fp32"``,
        ``"fp16"``, ``"bf16"``, ``"int8"``), candidates re-scored in fp32. An IVF index keeps its
        partition (its centroids and lists, searched with ``nprobe`` as faiss does); any other
        index is searched exactly — for HNSW that is at least as good as the graph's answer, and
        ``ef_search`` has nothing to tune. A compressed index (PQ, SQ) is searched over its
        decoded vectors, which is what faiss' own distances are computed on. ``options`` go to
        :class:`~indexes.torch_search.TorchSearch` (``chunk_size``, ``oversample``, ...).

        Raises :class:`DeviceError` when the index cannot give its vectors back.
        """
        from .torch_search import TorchSearch

        try:
            vectors = self.vectors(np.arange(self.ntotal))
        except ArtifactError as exc:
            raise DeviceError(f"{exc}; torch cannot search it") from exc
        lists = centroids = nprobe = None
        ivf = faiss.try_extract_index_ivf(self._cpu_index)
        if ivf is not None:
            lists, centroids = _ivf_partition(ivf)
            nprobe = int(ivf.nprobe)
        try:
            search = TorchSearch(vectors, metric=self._metric, device=device, storage=storage, lists=lists,
                                 centroids=centroids, **options)
        except (RuntimeError, ValueError) as exc:  # torch: no such device, out of memory
            raise DeviceError(f"{WHAT} at {self.location} cannot be placed on {device} with torch "
                              f"({_reason(exc)}); use device='cpu'") from exc
        new = FaissIndex(
            self._cpu_index, self.ids, factory=self._factory, metric=self._metric,
            normalize=self.normalize, encoder=self._encoder, location=self.location,
        )
        new._torch, new._torch_nprobe = search, nprobe
        return new

    @property
    def torch_gives_same_hits(self) -> bool:
        """Whether :meth:`to_torch` answers as this index does on the CPU (up to rounding and ties).

        True for Flat, IVF (the same lists probed) and compressed (PQ, SQ: the same decoded
        vectors) indexes; false where an HNSW graph approximates — the index itself or an IVF
        coarse quantizer — since torch searches exactly.
        """
        return not (self._hnsw or self._hnsw_quantizer)

    @property
    def on_gpu(self) -> bool:
        """True when searches run on a GPU (a faiss-gpu clone, or torch on a CUDA device)."""
        return self._gpu_resources is not None or (self._torch is not None and self._torch.device.type == "cuda")

    @property
    def backend(self) -> str:
        """What answers :meth:`search`: ``"faiss-cpu"``, ``"faiss-gpu"`` or ``"torch-<device>"``."""
        if self._torch is not None:
            return f"torch-{self._torch.device.type}"
        return "faiss-gpu" if self._gpu_resources is not None else "faiss-cpu"

    # -- searching ----------------------------------------------------------------------------

    def search(
        self,
        queries: Any,
        k: int,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best items per query: ``(scores float32 (nq, k), positions int64 (nq, k))``.

        Scores are FAISS's: inner products for ``"ip"``, squared distances for ``"l2"``. A
        position of -1 (score ±FLT_MAX) means fewer than ``k`` items were found. ``nprobe`` sets
        the lists an IVF index visits, ``ef_search`` the HNSW (or CAGRA) search breadth.

        ``queries`` is a float matrix: a NumPy array, or a torch tensor on any device. A CUDA
        tensor is searched where it lies when the index is on the GPU (no copy through host
        memory; faiss-gpu reads device pointers). ``faiss.contrib.torch_utils`` is deliberately
        not used: importing it patches every faiss index class so that ``search`` no longer
        accepts ``params=``, for the whole process.
        """
        k = int(k)
        if self._torch is not None:
            return self._search_torch(queries, k, nprobe, ef_search)
        if _is_tensor(queries):
            return self._search_tensor(queries, k, nprobe, ef_search)
        q = _as_matrix(queries, "queries")
        if q.shape[1] != self.dim:
            raise DataError(f"{WHAT} at {self.location} has dimension {self.dim}; the queries have {q.shape[1]}")
        if self.normalize:
            q = q.copy()
            faiss.normalize_L2(q)
        index, params = self._placement(k, nprobe, ef_search)
        prefer_blas_for_batches()
        scores, positions = index.search(q, k, params=params)
        return scores.astype(np.float32, copy=False), positions.astype(np.int64, copy=False)

    def _placement(self, k: int, nprobe: int | None, ef_search: int | None):
        """``(index, search parameters)``: the GPU copy when it can run the search, else the CPU index."""
        cpu_params = self._search_params(nprobe, ef_search)
        if self._gpu_resources is None:
            return self._cpu_index, cpu_params
        reason = gpu_search_fallback(k, nprobe=nprobe, ef_search=ef_search, gpu_kind=self._gpu_kind)
        if reason is not None:
            seen = self.__dict__.setdefault("_gpu_fallbacks", set())
            if reason not in seen:
                seen.add(reason)
                log.warning("%s at %s: searching on the CPU instead of the GPU: %s", WHAT, self.location, reason)
            return self._cpu_index, cpu_params
        return self._index, self._gpu_params(k, nprobe, ef_search)

    def _gpu_params(self, k: int, nprobe: int | None, ef_search: int | None):
        if self._gpu_kind == "ivf" and nprobe is not None:
            return faiss.SearchParametersIVF(nprobe=int(nprobe))
        if self._gpu_kind == "hnsw" and ef_search is not None:
            params = faiss.SearchParametersGpuHNSW()
            params.ef = int(ef_search)
            return params
        if self._gpu_kind == "cagra" and (ef_search is not None or k > CAGRA_ITOPK):
            params = faiss.SearchParametersCagra()
            params.itopk_size = max(int(ef_search or CAGRA_ITOPK), k)
            return params
        return None

    def _search_tensor(self, x: Any, k: int, nprobe: int | None,
                       ef_search: int | None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` for a torch tensor, through faiss's pointer API on the tensor's memory."""
        import torch

        if x.ndim != 2:
            raise DataError(f"queries must be a 2-d tensor (rows, dimension); got shape {tuple(x.shape)}")
        if x.shape[1] != self.dim:
            raise DataError(f"{WHAT} at {self.location} has dimension {self.dim}; the queries have {x.shape[1]}")
        index, params = self._placement(k, nprobe, ef_search)
        on_gpu = index is not self._cpu_index
        device = torch.device("cuda", self._gpu_device) if on_gpu else torch.device("cpu")
        x = x.detach().to(device=device, dtype=torch.float32).contiguous()
        if self.normalize:
            x = torch.nn.functional.normalize(x, dim=1)
        n = x.shape[0]
        scores = torch.empty((n, k), dtype=torch.float32, device=device)
        positions = torch.empty((n, k), dtype=torch.int64, device=device)
        if on_gpu:
            torch.cuda.synchronize(device)  # faiss runs on its own stream: the queries must be written
        index.search_c(n, faiss.cast_integer_to_float_ptr(x.data_ptr()), k,
                       faiss.cast_integer_to_float_ptr(scores.data_ptr()),
                       faiss.cast_integer_to_idx_t_ptr(positions.data_ptr()), params)
        if on_gpu:
            torch.cuda.synchronize(device)
        return scores.cpu().numpy(), positions.cpu().numpy()

    def _search_torch(self, queries: Any, k: int, nprobe: int | None,
                      ef_search: int | None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` on the :class:`~indexes.torch_search.TorchSearch` copy."""
        self._search_params(nprobe, ef_search)  # the same parameter checks as on faiss
        if ef_search is not None and "ef_search" not in self.__dict__.setdefault("_gpu_fallbacks", set()):
            self._gpu_fallbacks.add("ef_search")
            log.warning("%s at %s: ef_search=%s is ignored: torch searches every vector exactly", WHAT,
                        self.location, ef_search)
        if _is_tensor(queries):
            import torch

            q = queries.detach().to(self._torch.device, torch.float32)
            if q.ndim != 2:
                raise DataError(f"queries must be a 2-d tensor (rows, dimension); got shape {tuple(q.shape)}")
            if self.normalize:
                q = torch.nn.functional.normalize(q, dim=1)
        else:
            q = _as_matrix(queries, "queries")
            if self.normalize:
                q = q.copy()
                faiss.normalize_L2(q)
        if q.shape[1] != self.dim:
            raise DataError(f"{WHAT} at {self.location} has dimension {self.dim}; the queries have {q.shape[1]}")
        return self._torch.search(q, k, nprobe=nprobe if nprobe is not None else self._torch_nprobe)

    def _search_params(self, nprobe: int | None, ef_search: int | None):
        if nprobe is None and ef_search is None:
            return None
        if nprobe is not None and not self._ivf:
            raise ConfigError(f"nprobe applies to IVF indexes; {WHAT} at {self.location} is {self._factory!r}")
        if ef_search is not None and not (self._hnsw or self._hnsw_quantizer):
            raise ConfigError(f"ef_search applies to HNSW indexes; {WHAT} at {self.location} is {self._factory!r}")
        hnsw = faiss.SearchParametersHNSW(efSearch=int(ef_search)) if ef_search is not None else None
        if not self._ivf:
            return hnsw
        params = faiss.SearchParametersIVF()
        # unset, SearchParametersIVF would visit 1 list, not the nprobe stored in the index
        params.nprobe = int(nprobe) if nprobe is not None else self.nprobe
        if hnsw is not None:
            params.quantizer_params = hnsw
            params._hnsw = hnsw  # keep the quantizer parameters alive as long as params
        return params

    def ids_for(self, positions: np.ndarray) -> pa.Array:
        """Item ids at ``positions`` (flattened); -1 gives null."""
        flat = np.asarray(positions, dtype=np.int64).ravel()
        return self.ids.take(pa.array(flat, mask=flat < 0))

    def positions_for(self, item_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Row positions of ``item_ids`` in the index (int64); -1 for an id it does not hold."""
        if isinstance(item_ids, pa.ChunkedArray):
            item_ids = item_ids.combine_chunks()
        if item_ids.type != self.ids.type:
            try:
                item_ids = pc.cast(item_ids, self.ids.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise DataError(f"{WHAT} at {self.location} holds {self.ids.type} item ids; "
                                f"got {item_ids.type} ids that do not convert ({exc})") from exc
        found = pc.index_in(item_ids, value_set=self.ids)
        return pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)

    def stored_vectors(self) -> np.ndarray | None:
        """Every stored vector, ``(ntotal, dim)`` float32, as a read-only view of a flat index's own
        storage (no copy: a catalogue's vectors are held once); ``None`` for other index types,
        whose vectors :meth:`vectors` reconstructs. The array keeps this index alive."""
        flat = faiss.downcast_index(self._cpu_index)
        if not isinstance(flat, faiss.IndexFlat) or self.ntotal == 0:
            return None
        address = faiss.rev_swig_ptr(flat.get_xb(), 1).__array_interface__["data"][0]
        return np.asarray(_Storage(self, address, (self.ntotal, self.dim)))

    def vectors(self, positions: np.ndarray) -> np.ndarray:
        """The stored vectors at ``positions``, ``(n, dim)`` float32; a row of zeros for -1.

        Read back from the CPU index (``reconstruct_batch``): exact for Flat, HNSW and IVF-Flat
        indexes (normalised when the index normalises), approximate for compressed ones (PQ, SQ).
        """
        flat = np.asarray(positions, dtype=np.int64).ravel()
        out = np.zeros((len(flat), self.dim), np.float32)
        keep = flat >= 0
        if keep.any():
            keys = np.ascontiguousarray(flat[keep])
            try:
                out[keep] = self._cpu_index.reconstruct_batch(keys)
            except RuntimeError:
                ivf = faiss.try_extract_index_ivf(self._cpu_index)
                if ivf is None:
                    raise ArtifactError(f"{WHAT} at {self.location} ({self._factory!r}) cannot return its "
                                        "vectors") from None
                ivf.make_direct_map()
                out[keep] = self._cpu_index.reconstruct_batch(keys)
        return out

    # -- facts --------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return int(self._cpu_index.d)

    @property
    def ntotal(self) -> int:
        return int(self._cpu_index.ntotal)

    @property
    def nprobe(self) -> int | None:
        """IVF lists a search visits when it does not say (stored in the index); ``None`` if not IVF."""
        ivf = faiss.try_extract_index_ivf(self._cpu_index)
        return None if ivf is None else int(ivf.nprobe)

    @property
    def metric(self) -> str:
        return self._metric

    @property
    def encoder(self) -> str | None:
        return self._encoder

    @property
    def factory(self) -> str:
        return self._factory

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        gpu = f", gpu {self._gpu_kind}" if self._gpu_resources is not None else ""
        gpu += f", {self._torch!r}" if self._torch is not None else ""
        return f"FaissIndex({self._factory!r}, metric={self._metric!r}, dim={self.dim}, ntotal={self.ntotal}{gpu})"


def _ivf_partition(ivf: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(list id per vector position, centroids)`` of a faiss IVF index."""
    lists = np.full(ivf.ntotal, -1, np.int64)
    invlists = ivf.invlists
    for list_no in range(ivf.nlist):
        size = invlists.list_size(list_no)
        if size:
            lists[faiss.rev_swig_ptr(invlists.get_ids(list_no), size).astype(np.int64)] = list_no
    if (lists < 0).any():
        raise DeviceError(f"{WHAT}: the IVF lists do not cover every vector (ids were remapped); "
                          "torch cannot search it")
    return lists, ivf.quantizer.reconstruct_n(0, ivf.nlist)


def _build_cagra(x: np.ndarray, factory: str, metric: str) -> faiss.Index:
    """A CAGRA graph built on the GPU by cuVS, returned as its CPU form (``IndexHNSWCagra``).

    ``factory`` is ``"CAGRA"`` or ``"CAGRA<graph degree>"`` (``"CAGRA32"``). The CPU form is
    saved like any index; :meth:`FaissIndex.to_gpu` turns it back into a GPU CAGRA index, and
    a CPU-only machine searches it as an HNSW graph (base level only).
    """
    match = re.fullmatch(r"CAGRA(\d*)", factory.upper())
    if match is None:
        raise ConfigError(f"{WHAT}: factory {factory!r} must be 'CAGRA' or 'CAGRA<graph degree>' such as 'CAGRA32'")
    if not hasattr(faiss, "GpuIndexCagra"):
        raise ConfigError(f"{WHAT}: factory {factory!r} needs faiss built with cuVS (faiss-gpu-cuvs) and a CUDA "
                          "device; install funnel-rank[gpu], or use 'HNSW32' on the CPU")
    if faiss.get_num_gpus() < 1:
        raise DeviceError(f"{WHAT}: factory {factory!r} builds on a GPU, and faiss sees none")
    config = faiss.GpuIndexCagraConfig()
    if match.group(1):
        config.graph_degree = int(match.group(1))
        config.intermediate_graph_degree = 2 * int(match.group(1))
    resources = faiss.StandardGpuResources()
    gpu_index = faiss.GpuIndexCagra(resources, x.shape[1], METRICS[metric], config)
    try:
        gpu_index.train(x)
    except RuntimeError as exc:
        raise DataError(f"{WHAT}: building {factory!r} on {len(x)} vectors failed ({_reason(exc)})") from exc
    return faiss.index_gpu_to_cpu(gpu_index)


def _temp_path(folder: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def _concat_ids(parts: list, sizes: list[int]) -> pa.Array:
    """The shards' item ids as one Arrow array, each shard's count checked against its vectors."""
    arrays = []
    for ids, size in zip(parts, sizes):
        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks()
        ids = pa.array(ids) if not isinstance(ids, pa.Array) else ids
        if len(ids) != size:
            raise DataError(f"{WHAT}: {size} embeddings but {len(ids)} item ids")
        if ids.null_count:
            raise DataError(f"{WHAT}: {ids.null_count} item ids are null")
        arrays.append(ids)
    return arrays[0] if len(arrays) == 1 else pa.concat_arrays(arrays)


def _train(index: faiss.Index, shards, prepared, count: int, dim: int, factory: str, size: int, seed: int) -> None:
    """Train ``index`` on ``size`` rows of the shards drawn with ``seed`` (all rows when ``size >= count``)."""
    if size < count:
        rows = np.sort(np.random.default_rng(seed).choice(count, size=size, replace=False))
    else:
        rows = np.arange(count)
    sample = np.empty((len(rows), dim), np.float32)
    offset = filled = 0
    for _, vectors in shards:
        n = len(vectors)
        lo, hi = np.searchsorted(rows, [offset, offset + n])
        if hi > lo:
            sample[filled:filled + hi - lo] = prepared(np.asarray(vectors)[rows[lo:hi] - offset])
            filled += hi - lo
        offset += n
        if filled == len(rows):
            break
    try:
        index.train(sample[:filled])
    except RuntimeError as exc:
        raise DataError(
            f"{WHAT}: training {factory!r} on {filled} vectors failed ({_reason(exc)}); "
            "use more vectors or fewer lists"
        ) from exc
