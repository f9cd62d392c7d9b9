"""A FAISS index with its item ids, saved as a checked artifact folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import MANIFEST, read_manifest, sha256_file, verify_files, write_json_atomic
from pipeline.errors import ArtifactError, ConfigError, DataError, DeviceError

__all__ = ["FaissIndex", "INDEX_FILE", "IDS_FILE"]

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
WHAT = "faiss index"


def _as_matrix(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise DataError(f"{what} must be a 2-d array (rows, dimension); got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


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
        self.ids = ids
        self._factory = factory
        self._metric = metric
        self.normalize = normalize
        self._encoder = encoder
        self.location = location
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

        ``factory`` is a FAISS index factory string ("Flat", "HNSW32", "IVF1024,Flat", ...).
        Indexes that need training (IVF, PQ) are trained on ``train_size`` rows sampled with
        ``seed`` (all rows when ``None``).
        """
        if metric not in METRICS:
            raise ConfigError(f"{WHAT}: metric must be one of {tuple(METRICS)}; got {metric!r} instead")
        x = _as_matrix(embeddings, "embeddings")
        if isinstance(item_ids, pa.ChunkedArray):
            item_ids = item_ids.combine_chunks()
        item_ids = pa.array(item_ids) if not isinstance(item_ids, pa.Array) else item_ids
        if len(item_ids) != len(x):
            raise DataError(f"{WHAT}: {len(x)} embeddings but {len(item_ids)} item ids")
        if len(x) == 0:
            raise DataError(f"{WHAT}: no embeddings to index")
        if item_ids.null_count:
            raise DataError(f"{WHAT}: {item_ids.null_count} item ids are null")
        if normalize:
            x = x.copy()
            faiss.normalize_L2(x)
        try:
            index = faiss.index_factory(x.shape[1], factory, METRICS[metric])
        except RuntimeError as exc:
            raise ConfigError(f"{WHAT}: faiss cannot make an index from factory string {factory!r} ({_reason(exc)})") from exc
        if not index.is_trained:
            sample = x
            if train_size is not None and train_size < len(x):
                rows = np.random.default_rng(seed).choice(len(x), size=train_size, replace=False)
                sample = x[np.sort(rows)]
            try:
                index.train(sample)
            except RuntimeError as exc:
                raise DataError(
                    f"{WHAT}: training {factory!r} on {len(sample)} vectors failed ({_reason(exc)}); "
                    "use more vectors or fewer lists"
                ) from exc
        index.add(x)
        return cls(index, item_ids, factory=factory, metric=metric, normalize=normalize, encoder=encoder)

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
        """A copy searching on GPU ``device``; needs faiss built with GPU support (faiss-gpu)."""
        if not hasattr(faiss, "StandardGpuResources"):
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
        new._index, new._gpu_resources = gpu_index, resources
        return new

    @property
    def on_gpu(self) -> bool:
        return self._gpu_resources is not None

    # -- searching ----------------------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best items per query: ``(scores float32 (nq, k), positions int64 (nq, k))``.

        Scores are FAISS's: inner products for ``"ip"``, squared distances for ``"l2"``. A
        position of -1 (score ±FLT_MAX) means fewer than ``k`` items were found. ``nprobe`` sets
        the lists an IVF index visits, ``ef_search`` the HNSW search breadth.
        """
        q = _as_matrix(queries, "queries")
        if q.shape[1] != self.dim:
            raise DataError(f"{WHAT} at {self.location} has dimension {self.dim}; the queries have {q.shape[1]}")
        if self.normalize:
            q = q.copy()
            faiss.normalize_L2(q)
        scores, positions = self._index.search(q, int(k), params=self._search_params(nprobe, ef_search))
        return scores.astype(np.float32, copy=False), positions.astype(np.int64, copy=False)

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
        if nprobe is not None:
            params.nprobe = int(nprobe)
        if hnsw is not None:
            params.quantizer_params = hnsw
            params._hnsw = hnsw  # keep the quantizer parameters alive as long as params
        return params

    def ids_for(self, positions: np.ndarray) -> pa.Array:
        """Item ids at ``positions`` (flattened); -1 gives null."""
        flat = np.asarray(positions, dtype=np.int64).ravel()
        return self.ids.take(pa.array(flat, mask=flat < 0))

    # -- facts --------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return int(self._cpu_index.d)

    @property
    def ntotal(self) -> int:
        return int(self._cpu_index.ntotal)

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
        gpu = ", gpu" if self.on_gpu else ""
        return f"FaissIndex({self._factory!r}, metric={self._metric!r}, dim={self.dim}, ntotal={self.ntotal}{gpu})"


def _temp_path(folder: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
