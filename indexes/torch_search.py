"""Nearest-neighbour search with torch matrix products, on any device torch runs on.

This is how recall searches on a GPU when the installed faiss has no GPU support — the usual
case on CUDA 13, for which no faiss GPU wheel is on the package index — and a drop-in for
anything else that needs exact k-NN on a CUDA tensor. faiss-gpu (and cuVS CAGRA) stay the
first choice where they are installed; :func:`stages.gpu_util.index_on_device` decides.

How :class:`TorchSearch` answers ``search(queries, k)``:

1. **Storage.** The catalog vectors lie on the device in chunks of ``chunk_size`` rows, stored
   as ``fp32``, ``fp16``, ``bf16`` or ``int8`` (each vector scaled by its own largest absolute
   value / 127, the scale kept in fp32). Half precision halves the memory and doubles the
   matrix-product speed of fp32 on a GPU; int8 quarters the memory.
2. **Scan.** Per batch of ``query_batch`` queries and per chunk: one matrix product in the
   storage's compute type and a ``topk`` of ``k * oversample`` candidates; the chunks' candidates
   are merged by a second ``topk``. The score matrix of one step is ``query_batch × chunk_size``,
   so the catalog size is bounded by device memory for the storage, not for the scores.
3. **Exact re-scoring.** The candidates are scored again in fp32 from an fp32 copy of the
   vectors (on the device when it fits in half of the free memory, else in host memory), and
   the best ``k`` are returned with those fp32 scores. The result is that of exact fp32 search
   unless rounding in the low-precision scan pushed a true top-``k`` item below the first
   ``k * oversample`` candidates — measured recall@100 against exact fp32 is above 0.999 with
   the default ``oversample=2`` on normalised sentence embeddings (tests/indexes/
   test_torch_search.py checks it on CPU). With ``fp32`` storage the scan is already exact
   and nothing is re-scored.
4. **Optional coarse partition (IVF).** Given a list id per vector and the list centroids —
   read from a faiss IVF index (:meth:`indexes.FaissIndex.to_torch`), or computed by
   :func:`kmeans` — the vectors are kept grouped by list and a query scans only its ``nprobe``
   nearest lists (a batch scans the union of its queries' lists, each query masked to its own),
   which is faiss' IVF semantics. With ``host_storage=True`` the low-precision lists stay in
   (pinned) host memory and only the probed ones travel to the device per batch: the option for
   catalogs larger than GPU memory.

Scores follow faiss: inner products (``metric="ip"``, best first) or squared L2 distances
(``"l2"``, smallest first); a position of -1 with score ∓FLT_MAX pads a list when ``k`` exceeds
the candidates. Nothing here touches CUDA until a :class:`TorchSearch` is made on a CUDA device.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import ConfigError, DataError

__all__ = ["TorchSearch", "kmeans", "STORAGES", "DEFAULT_CHUNK_SIZE", "DEFAULT_QUERY_BATCH", "DEFAULT_OVERSAMPLE"]

#: storage types of the catalog vectors on the device
STORAGES = ("fp32", "fp16", "bf16", "int8")
#: catalog rows per chunk: one step's score matrix is DEFAULT_QUERY_BATCH x this (2 GiB in fp16)
DEFAULT_CHUNK_SIZE = 262_144
#: queries scored together against each chunk
DEFAULT_QUERY_BATCH = 4_096
#: candidates re-scored in fp32 per result: k * this
DEFAULT_OVERSAMPLE = 2
#: the fp32 copy for re-scoring stays on the device when it needs at most this share of free memory
EXACT_COPY_SHARE = 0.5
FLT_MAX = float(np.finfo(np.float32).max)
WHAT = "torch search"


def _torch():
    import torch

    return torch


def _dtype(storage: str):
    torch = _torch()
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}[storage]


class TorchSearch:
    """Exact (or IVF-partitioned) k-NN over fixed vectors with torch; see the module docstring.

    Args:
        vectors: ``(n, d)`` float32 catalog vectors (NumPy), row ``i`` is position ``i``.
        metric: ``"ip"`` or ``"l2"``.
        device: a torch device (``"cuda"``, ``"cuda:1"``, ``"cpu"``).
        storage: one of :data:`STORAGES`. On a CPU, fp16 matrix products may be unsupported or
            slow in the installed torch; ``bf16`` and ``int8`` (computed in bf16 there) work.
        chunk_size: catalog rows per chunk.
        query_batch: queries per scan step.
        oversample: candidates per result re-scored in fp32 (>= 1; ignored for fp32 storage).
        exact_on: ``"device"``, ``"host"`` or ``"auto"`` — where the fp32 copy for re-scoring lives.
        lists, centroids: an IVF partition — list id per vector ``(n,)`` and ``(nlist, d)`` centroids.
        host_storage: with a partition, keep the low-precision lists in host memory (see above).
    """

    def __init__(self, vectors: np.ndarray, *, metric: str = "ip", device: str = "cpu", storage: str = "fp32",
                 chunk_size: int = DEFAULT_CHUNK_SIZE, query_batch: int = DEFAULT_QUERY_BATCH,
                 oversample: int = DEFAULT_OVERSAMPLE, exact_on: str = "auto", lists: np.ndarray | None = None,
                 centroids: np.ndarray | None = None, host_storage: bool = False):
        torch = _torch()
        if metric not in ("ip", "l2"):
            raise ConfigError(f"{WHAT}: metric must be one of ('ip', 'l2'); got {metric!r} instead")
        if storage not in STORAGES:
            raise ConfigError(f"{WHAT}: storage must be one of {STORAGES}; got {storage!r} instead")
        if exact_on not in ("auto", "device", "host"):
            raise ConfigError(f"{WHAT}: exact_on must be one of ('auto', 'device', 'host'); got {exact_on!r} instead")
        for name, value in (("chunk_size", chunk_size), ("query_batch", query_batch), ("oversample", oversample)):
            if int(value) < 1:
                raise ConfigError(f"{WHAT}: {name} must be an int >= 1; got {value!r} instead")
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if x.ndim != 2 or len(x) == 0:
            raise DataError(f"{WHAT}: vectors must be a non-empty 2-d array (rows, dimension); got shape {x.shape}")
        if (lists is None) != (centroids is None):
            raise ConfigError(f"{WHAT}: an IVF partition needs both lists and centroids")
        self.metric, self.storage, self.device = metric, storage, torch.device(device)
        self.n, self.dim = x.shape
        self.chunk_size, self.query_batch, self.oversample = int(chunk_size), int(query_batch), int(oversample)
        self.compute_dtype = self._compute_dtype()
        self.host_storage = bool(host_storage) and lists is not None
        home = torch.device("cpu") if self.host_storage else self.device
        order = None
        if lists is not None:
            lists = np.asarray(lists, dtype=np.int64)
            if lists.shape != (self.n,):
                raise DataError(f"{WHAT}: {len(lists)} list ids for {self.n} vectors")
            order = np.argsort(lists, kind="stable")
            self.nlist = int(len(centroids))
            counts = np.bincount(lists, minlength=self.nlist)
            self.list_offsets = np.concatenate([[0], np.cumsum(counts)])
            self.centroids_ = torch.from_numpy(np.ascontiguousarray(centroids, np.float32)).to(self.device)
            self.order_ = torch.from_numpy(order).to(home)
            self.sorted_lists_ = torch.from_numpy(lists[order]).to(self.device)
        else:
            self.nlist = 0
        stored = x if order is None else x[order]
        self.chunks_ = [self._store(stored[s:s + self.chunk_size], home) for s in range(0, self.n, self.chunk_size)]
        if self.host_storage and self.device.type == "cuda":
            self.chunks_ = [tuple(t.pin_memory() for t in chunk) for chunk in self.chunks_]
        self.sqnorms_ = torch.from_numpy((x * x).sum(axis=1)).to(self.device) if metric == "l2" else None
        self.exact_ = None
        if storage != "fp32":
            self.exact_ = torch.from_numpy(x).to(self._exact_home(exact_on, x.nbytes))

    # -- setup --------------------------------------------------------------------------------

    def _compute_dtype(self):
        torch = _torch()
        if self.storage == "fp32":
            return torch.float32
        if self.storage == "int8":
            return torch.float16 if self.device.type == "cuda" else torch.bfloat16
        return _dtype(self.storage)

    def _store(self, block: np.ndarray, home) -> tuple:
        """One chunk as stored: ``(values,)`` or ``(int8 values, fp32 scales)``."""
        torch = _torch()
        t = torch.from_numpy(np.ascontiguousarray(block))
        if self.storage != "int8":
            return (t.to(device=home, dtype=_dtype(self.storage)),)
        scale = t.abs().amax(dim=1).clamp_min(1e-30) / 127.0
        q = torch.round(t / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return (q.to(home), scale.to(home))

    def _exact_home(self, exact_on: str, nbytes: int):
        torch = _torch()
        if exact_on == "host" or self.device.type != "cuda":
            return torch.device("cpu") if exact_on == "host" else self.device
        if exact_on == "device":
            return self.device
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.device if nbytes <= EXACT_COPY_SHARE * free else torch.device("cpu")

    @property
    def nbytes(self) -> int:
        """Bytes the stored chunks take (values and scales)."""
        return sum(t.numel() * t.element_size() for chunk in self.chunks_ for t in chunk)

    def __repr__(self) -> str:
        ivf = f", nlist={self.nlist}" if self.nlist else ""
        return f"TorchSearch(n={self.n}, dim={self.dim}, metric={self.metric!r}, {self.storage} on {self.device}{ivf})"

    # -- searching ----------------------------------------------------------------------------

    def search(self, queries: Any, k: int, *, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(scores float32 (nq, k), positions int64 (nq, k))`` as faiss returns them.

        ``queries`` is a float NumPy array or torch tensor ``(nq, d)`` (any device). ``nprobe``
        (lists per query, default 1) applies when the search has an IVF partition.
        """
        torch = _torch()
        k = int(k)
        if k < 1:
            raise ConfigError(f"{WHAT}: k must be an int >= 1; got {k} instead")
        q = queries.detach() if isinstance(queries, torch.Tensor) else torch.from_numpy(
            np.ascontiguousarray(queries, dtype=np.float32))
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise DataError(f"{WHAT} has dimension {self.dim}; the queries have shape {tuple(q.shape)}")
        nprobe = min(int(nprobe or 1), self.nlist) if self.nlist else None
        scores = np.empty((q.shape[0], k), np.float32)
        positions = np.empty((q.shape[0], k), np.int64)
        with torch.inference_mode():
            for s in range(0, q.shape[0], self.query_batch):
                qb = q[s:s + self.query_batch].to(self.device, torch.float32, non_blocking=True)
                b_scores, b_pos = self._search_batch(qb, k, nprobe)
                scores[s:s + len(qb)] = b_scores.cpu().numpy()
                positions[s:s + len(qb)] = b_pos.cpu().numpy()
        return scores, positions

    def _search_batch(self, q, k: int, nprobe: int | None):
        torch = _torch()
        want = k if self.exact_ is None else k * self.oversample
        if nprobe is None:
            best, pos = self._scan(q, want, self._all_chunks())
        else:
            best, pos = self._scan(q, want, self._probed_chunks(q, nprobe))
            pos = torch.where(pos >= 0, self.order_.to(pos.device)[pos.clamp_min(0)], pos)
        if self.exact_ is not None:
            best = self._rescore(q, pos)
        if self.metric == "l2":
            best = ((q * q).sum(dim=1, keepdim=True) - best).clamp_min_(0)
        best, order = torch.topk(best, min(k, best.shape[1]), dim=1, largest=self.metric == "ip")
        pos = pos.gather(1, order)
        missing = pos < 0
        best = best.masked_fill(missing, -FLT_MAX if self.metric == "ip" else FLT_MAX)
        if best.shape[1] < k:
            pad = k - best.shape[1]
            best = torch.nn.functional.pad(best, (0, pad), value=-FLT_MAX if self.metric == "ip" else FLT_MAX)
            pos = torch.nn.functional.pad(pos, (0, pad), value=-1)
        return best, pos

    def _all_chunks(self):
        for i, chunk in enumerate(self.chunks_):
            yield chunk, i * self.chunk_size, None

    def _probed_chunks(self, q, nprobe: int):
        """The union of the batch's probed lists, chunked; with the mask of which query probes what."""
        torch = _torch()
        coarse = q @ self.centroids_.T
        if self.metric == "l2":
            coarse = 2 * coarse - (self.centroids_ * self.centroids_).sum(dim=1)
        probes = torch.topk(coarse, nprobe, dim=1).indices
        probed = torch.zeros((q.shape[0], self.nlist), dtype=torch.bool, device=self.device)
        probed.scatter_(1, probes, True)
        wanted = torch.unique(probes).cpu().numpy()
        rows = np.concatenate([np.arange(self.list_offsets[l], self.list_offsets[l + 1]) for l in wanted])
        home = self.chunks_[0][0].device
        for s in range(0, len(rows), self.chunk_size):
            sel = torch.from_numpy(rows[s:s + self.chunk_size]).to(home)
            chunk = tuple(t.to(self.device, non_blocking=True) for t in self._gather(sel))
            sel = sel.to(self.device)
            yield chunk, sel, probed[:, self.sorted_lists_[sel]]

    def _gather(self, rows) -> tuple:
        """Stored values (and scales) at sorted-order ``rows`` across the chunks."""
        torch = _torch()
        if len(self.chunks_) == 1:
            return tuple(t.index_select(0, rows) for t in self.chunks_[0])
        which, within = rows // self.chunk_size, rows % self.chunk_size
        out = []
        for j in range(len(self.chunks_[0])):
            out.append(torch.cat([self.chunks_[c][j].index_select(0, within[which == c])
                                  for c in torch.unique(which).tolist()]))
        return tuple(out)

    def _scan(self, q, want: int, chunks):
        """Best ``want`` (score, position) per query over ``chunks``, scores higher-is-better."""
        torch = _torch()
        qc = q.to(self.compute_dtype)
        best = pos = None
        for chunk, where, mask in chunks:
            values = chunk[0] if self.storage != "int8" else chunk[0].to(self.compute_dtype)
            scores = qc @ values.T
            if self.storage == "int8":
                scores = scores * chunk[1].to(self.compute_dtype)
            positions = where if isinstance(where, torch.Tensor) else None
            if self.metric == "l2":
                norms = self.sqnorms_[self._originals(positions, where, values.shape[0])]
                scores = 2 * scores.float() - norms
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            top, idx = torch.topk(scores, min(want, scores.shape[1]), dim=1)
            idx = positions[idx] if positions is not None else idx + where
            if mask is not None:
                idx = idx.masked_fill(torch.isinf(top), -1)
            top = top.float()
            if best is None:
                best, pos = top, idx
            else:
                best, pos = torch.cat([best, top], dim=1), torch.cat([pos, idx], dim=1)
                best, sel = torch.topk(best, min(want, best.shape[1]), dim=1)
                pos = pos.gather(1, sel)
        if best is None:
            empty = torch.empty((q.shape[0], 0), device=self.device)
            return empty, empty.long()
        return best, pos

    def _originals(self, positions, start, count):
        """Catalog positions (original order) of a chunk's rows, to look up per-vector norms."""
        torch = _torch()
        if positions is None:
            return torch.arange(start, start + count, device=self.device)
        return self.order_.to(self.device)[positions]

    def _rescore(self, q, pos):
        """fp32 scores of the candidates ``pos`` (higher is better); -inf where ``pos`` is -1."""
        torch = _torch()
        home = self.exact_.device
        flat = pos.clamp_min(0).reshape(-1).to(home)
        vecs = self.exact_.index_select(0, flat).to(self.device, non_blocking=True).view(*pos.shape, self.dim)
        dots = torch.bmm(vecs, q.unsqueeze(2)).squeeze(2)
        if self.metric == "l2":
            dots = 2 * dots - (vecs * vecs).sum(dim=2)
        return dots.masked_fill(pos < 0, float("-inf"))


def kmeans(vectors: np.ndarray, nlist: int, *, iters: int = 20, device: str = "cpu", seed: int = 0,
           metric: str = "ip", sample: int | None = 256 * 1024) -> tuple[np.ndarray, np.ndarray]:
    """``(lists (n,), centroids (nlist, d))``: a k-means partition computed with torch on ``device``.

    Trained on at most ``sample`` rows (faiss' habit of 256 per centroid is plenty), then every
    vector is assigned to its best centroid (inner product for ``"ip"`` — spherical k-means with
    normalised centroids — or nearest for ``"l2"``).
    """
    torch = _torch()
    x = torch.from_numpy(np.ascontiguousarray(vectors, np.float32))
    if not 1 <= nlist <= len(x):
        raise ConfigError(f"{WHAT}: nlist must be in [1, {len(x)}]; got {nlist} instead")
    gen = torch.Generator().manual_seed(seed)
    train = x if sample is None or sample >= len(x) else x[torch.randperm(len(x), generator=gen)[:sample]]
    train = train.to(device)
    cent = train[torch.randperm(len(train), generator=gen)[:nlist].to(device)].clone()

    def assign(rows):
        scores = rows @ cent.T
        if metric == "l2":
            scores = 2 * scores - (cent * cent).sum(dim=1)
        return scores.argmax(dim=1)

    with torch.inference_mode():
        for _ in range(iters):
            a = assign(train)
            sums = torch.zeros_like(cent).index_add_(0, a, train)
            counts = torch.bincount(a, minlength=nlist).to(train.dtype)
            empty = counts == 0
            cent = torch.where(empty[:, None], cent, sums / counts.clamp_min(1)[:, None])
            if metric == "ip":
                cent = torch.nn.functional.normalize(cent, dim=1)
        lists = torch.cat([assign(x[s:s + 65536].to(device)).cpu() for s in range(0, len(x), 65536)])
    return lists.numpy().astype(np.int64), cent.cpu().numpy()
