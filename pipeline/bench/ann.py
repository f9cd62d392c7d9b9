"""Approximate search against exact search: the vectors of a stored index, ANN recall of a
``recall.faiss`` stage, and the synthetic comparison of Funnel's stage with raw faiss and hnswlib."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from ..columns import QUERY_ID
from ..stage import Stage
from .pareto import measure, pareto_front
from .timing import clone_warm

__all__ = ["stored_vectors", "exact_index", "ann_recall", "synthetic_vectors", "ivf_nlist", "hnswlib_index",
           "hnswlib_search", "ann_synthetic", "HNSWLIB_MISSING", "HNSWLIB_EF"]


def stored_vectors(index) -> np.ndarray:
    """Every vector of a CPU faiss index, reconstructed (exact for Flat and HNSW-Flat storage,
    decoded approximations for PQ/SQ codes)."""
    import faiss

    outer = faiss.downcast_index(index)
    # the sub-index is owned by ``outer``: keep ``outer`` referenced while reading it
    inner = faiss.downcast_index(outer.storage) if isinstance(outer, faiss.IndexHNSW) else outer
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        ivf.make_direct_map()
    return inner.reconstruct_n(0, inner.ntotal)


def exact_index(vectors: np.ndarray, metric: str):
    import faiss

    exact = faiss.IndexFlatIP(vectors.shape[1]) if metric == "ip" else faiss.IndexFlatL2(vectors.shape[1])
    exact.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return exact


def ann_recall(stage: Stage, queries: np.ndarray, k: int | None = None) -> dict:
    """Recall@k of a warm ``recall.faiss`` stage's search against exact search over the same vectors."""
    import faiss
    from faiss.contrib.evaluation import knn_intersection_measure

    from indexes.faiss_index import INDEX_FILE

    index = stage.index_
    k = min(k or stage.k, index.ntotal)
    cpu = faiss.read_index(str(stage.resolve_path(stage.index) / INDEX_FILE))
    exact = exact_index(stored_vectors(cpu), index.metric)
    q = np.ascontiguousarray(queries, dtype=np.float32).copy()
    if index.normalize:
        faiss.normalize_L2(q)
    _, ref = exact.search(q, k)
    _, got = index.search(queries, k, nprobe=stage.nprobe, ef_search=stage.ef_search)
    return {"k": k, "ann_recall_at_k": knn_intersection_measure(got, ref),
            "exact_reference": f"faiss {type(exact).__name__} over the vectors of {INDEX_FILE} ({index.factory})"}


def synthetic_vectors(n: int, dim: int = 384, *, n_queries: int = 1000, clusters: int | None = None,
                      rank: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A clustered, L2-normalised float32 vector set ``(base (n, dim), queries (n_queries, dim))``.

    Points are a cluster centre plus a variation drawn from a ``rank``-dimensional subspace
    shared by all clusters plus small isotropic noise: like text embeddings, they have far fewer
    degrees of freedom than dimensions, which is what makes graph and IVF search work. Queries
    come from the same distribution and are not in the base set. Generated in chunks, so 1M x 384
    (1.5 GB) needs little more than the result.
    """
    rng = np.random.default_rng(seed)
    clusters = clusters or max(16, int(math.sqrt(n)))
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    basis = rng.standard_normal((rank, dim), dtype=np.float32) / math.sqrt(rank)

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, dim), dtype=np.float32)
        for i in range(0, m, 100_000):
            j = min(m, i + 100_000)
            part = centres[rng.integers(clusters, size=j - i)]
            part += 1.2 * (rng.standard_normal((j - i, rank), dtype=np.float32) @ basis)
            part += 0.15 * rng.standard_normal((j - i, dim), dtype=np.float32)
            part /= np.linalg.norm(part, axis=1, keepdims=True)
            out[i:j] = part
        return out

    return draw(n), draw(n_queries)


def ivf_nlist(n: int) -> int:
    """IVF lists for ``n`` vectors: about 4 sqrt(n), a power of two, with >= 39 training points per list."""
    return int(2 ** min(round(math.log2(max(4.0, 4 * math.sqrt(n)))), math.floor(math.log2(max(1, n // 39)))))


HNSWLIB_MISSING = "hnswlib is not installed (pip install funnel-rank[bench]): no hnswlib points"


HNSWLIB_EF = [10, 16, 24, 32, 48, 64, 96, 128, 256, 512]


def hnswlib_index(xb: np.ndarray, metric: str, *, m: int = 32, ef_construction: int = 40, seed: int = 0):
    """An hnswlib index over ``xb`` (None when hnswlib is not installed)."""
    try:
        import hnswlib
    except ImportError:
        return None
    index = hnswlib.Index(space="ip" if metric == "ip" else "l2", dim=xb.shape[1])
    index.init_index(max_elements=len(xb), M=m, ef_construction=ef_construction, random_seed=seed)
    index.add_items(xb, np.arange(len(xb)), num_threads=-1)
    return index


def hnswlib_search(index, xq: np.ndarray, k: int, ef: int) -> Callable[[], np.ndarray]:
    def search() -> np.ndarray:
        index.set_ef(max(ef, k))
        return index.knn_query(xq, k=k, num_threads=-1)[0].astype(np.int64)

    return search


def ann_synthetic(n: int, dim: int, *, k: int = 10, repeats: int = 3, seed: int = 0,
                   log: Callable[[str], None] = print) -> dict:
    """Funnel's ``recall.faiss`` stage (HNSW32 and IVF) against raw faiss and hnswlib (M=32, the
    same efConstruction) on synthetic vectors. Every index is built first; then every operating
    point is timed in interleaved rounds (:func:`interleaved`). The stage runs on an Arrow table
    of query embeddings and returns its long-form table, so its time includes Funnel's work around
    the search; its recall is that of the same search done raw."""
    import faiss

    from indexes.faiss_index import FaissIndex
    from stages.faiss import FaissRecall

    log(f"      ann: generating {n} x {dim} clustered vectors")
    xb, xq = synthetic_vectors(n, dim, seed=seed)
    t0 = time.perf_counter()
    _, ref = exact_index(xb, "ip").search(xq, k)
    builds = {"exact IndexFlatIP (search only)": time.perf_counter() - t0}
    nlist = ivf_nlist(n)
    queries = pa.table({QUERY_ID: np.arange(len(xq)),
                        "query_embedding": pa.FixedSizeListArray.from_arrays(pa.array(xq.ravel()), dim)})
    grids = {"ef_search": [10, 16, 24, 32, 48, 64, 96, 128, 256], "nprobe": [1, 2, 4, 8, 16, 32, 64, 128]}
    contenders = []
    with tempfile.TemporaryDirectory(prefix="funnel-bench-ann-") as tmp:
        for factory, param in (("HNSW32", "ef_search"), (f"IVF{nlist},Flat", "nprobe")):
            log(f"      ann: building {factory} with Funnel's FaissIndex")
            t0 = time.perf_counter()
            index = FaissIndex.build(xb, pa.array(np.arange(n, dtype=np.int64)), factory=factory, metric="ip",
                                     normalize=True, train_size=min(n, 50 * nlist) if "IVF" in factory else None,
                                     seed=seed)
            builds[factory] = time.perf_counter() - t0
            folder = index.save(Path(tmp) / factory.replace(",", "_"))
            del index
            stage = FaissRecall(index=str(folder), k=k, factory=factory, device="cpu")
            stage.warm_up()
            raw = faiss.read_index(str(folder / "index.faiss"))
            for v in grids[param]:
                s = clone_warm(stage, **{param: v})
                params = (faiss.SearchParametersHNSW(efSearch=v) if param == "ef_search"
                          else faiss.SearchParametersIVF(nprobe=v))
                raw_search = (lambda raw, params: lambda: raw.search(xq, k, params=params)[1])(raw, params)
                run_stage = (lambda s: lambda: s(queries))(s)
                point = {"param": param, "value": v}
                contenders.append(({**point, "family": f"funnel recall.faiss {factory}"}, run_stage, raw_search))
                contenders.append(({**point, "family": f"faiss {factory} (raw search)"}, raw_search, raw_search))
        log("      ann: building hnswlib M=32, ef_construction=40 (faiss' default)")
        t0 = time.perf_counter()
        hnsw = hnswlib_index(xb, "ip", seed=seed)
        note = HNSWLIB_MISSING
        if hnsw is not None:
            builds["hnswlib M=32"], note = time.perf_counter() - t0, None
            for ef in grids["ef_search"]:
                search = hnswlib_search(hnsw, xq, k, ef)
                contenders.append(({"family": "hnswlib M=32", "param": "ef", "value": max(ef, k)}, search, search))
        log(f"      ann: timing {len(contenders)} operating points, interleaved")
        points = measure(contenders, ref, len(xq), repeats)

    def best(prefix: str, target: float = 0.95) -> dict | None:
        ok = [p for p in points if p["family"].startswith(prefix) and p["recall_at_k"] >= target]
        return max(ok, key=lambda p: p["queries_per_s"]) if ok else None

    at95 = {"funnel recall.faiss": best("funnel recall.faiss"), "faiss raw": best("faiss "), "hnswlib": best("hnswlib")}
    ratio = None
    if at95["funnel recall.faiss"] and at95["hnswlib"]:
        ratio = at95["funnel recall.faiss"]["queries_per_s"] / at95["hnswlib"]["queries_per_s"]
    return {"vectors": n, "dim": dim, "queries": len(xq), "k": k, "quality": f"recall@{k} vs exact",
            "generator": "synthetic_vectors: sqrt(n) clusters, rank-48 variation + isotropic noise, L2-normalised",
            "build_s": builds, "points": points, "note": note, "best_at_recall_0.95": at95,
            "funnel_over_hnswlib_qps_at_0.95": ratio,
            "pareto": pareto_front(points, quality="recall_at_k", cost="ms_per_query")}
