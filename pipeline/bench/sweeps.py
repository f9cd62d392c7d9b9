"""Sweeps: index types and search parameters of a FAISS stage, candidates ``k`` and the search
parameter through the whole pipeline, and the batch size; each keeps its Pareto front."""

from __future__ import annotations

import re
import time
from typing import Callable

import numpy as np
import pyarrow as pa

from ..stage import Pipeline, Stage
from .ann import HNSWLIB_EF, HNSWLIB_MISSING, exact_index, hnswlib_index, hnswlib_search, ivf_nlist, stored_vectors
from .pareto import measure, pareto_front
from .timing import clone_warm, interleaved, latency_summary, median, progress_bar, split_batches

__all__ = ["SWEEP_QUERIES", "sweep_index", "sweep_pipeline", "sweep_batch_size"]


SWEEP_QUERIES = 512


def _search_grid(factory: str) -> tuple[str | None, list[int]]:
    """The search parameter of an index factory string and the values a sweep tries."""
    ivf = re.search(r"IVF(\d+)", factory)
    if ivf:
        nlist = int(ivf.group(1))
        return "nprobe", sorted({p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256) if p <= nlist} | {nlist})
    if "HNSW" in factory:
        return "ef_search", [16, 24, 32, 48, 64, 96, 128, 256, 512]
    return None, [0]


def sweep_index(stage: Stage, queries: np.ndarray, *, k: int = 10, repeats: int = 3, progress: bool = True,
                 log: Callable[[str], None] = print) -> dict:
    """Index types and search parameters of one FAISS stage, on its own vectors and queries."""
    import faiss

    from indexes.faiss_index import INDEX_FILE, FaissIndex

    index = stage.index_
    xb = stored_vectors(faiss.read_index(str(stage.resolve_path(stage.index) / INDEX_FILE)))
    xq = np.ascontiguousarray(queries, dtype=np.float32).copy()
    if index.normalize:
        faiss.normalize_L2(xq)
    k = min(k, index.ntotal)
    _, ref = exact_index(xb, index.metric).search(xq, k)
    ids = pa.array(np.arange(len(xb)))
    nlist = ivf_nlist(len(xb))
    families = {f"configured {index.factory}": index}
    builds = {}
    for factory in ("Flat", "HNSW32", f"IVF{nlist},Flat"):
        if factory == index.factory or (factory.startswith("IVF") and nlist < 4):
            continue
        log(f"      sweep: building {factory} over {len(xb)} vectors")
        t0 = time.perf_counter()
        families[factory] = FaissIndex.build(xb, ids, factory=factory, metric=index.metric, normalize=False)
        builds[factory] = time.perf_counter() - t0
    hnsw, note = None, HNSWLIB_MISSING
    t0 = time.perf_counter()
    hnsw = hnswlib_index(xb, index.metric)
    if hnsw is not None:
        builds["hnswlib M=32"], note = time.perf_counter() - t0, None
    contenders = []
    for family, idx in families.items():
        param, values = _search_grid(idx.factory)
        for v in values:
            kw = {param: v} if param else {}
            search = (lambda idx, kw: lambda: idx.search(xq, k, **kw)[1])(idx, kw)
            contenders.append(({"family": family, "param": param, "value": v if param else None}, search, search))
    if hnsw is not None:
        for ef in HNSWLIB_EF:
            search = hnswlib_search(hnsw, xq, k, ef)
            contenders.append(({"family": "hnswlib M=32", "param": "ef", "value": max(ef, k)}, search, search))
    points = measure(contenders, ref, len(xq), repeats)
    best = {}
    for family in dict.fromkeys(p["family"] for p in points):
        ok = [p for p in points if p["family"] == family and p["recall_at_k"] >= 0.95]
        best[family] = max(ok, key=lambda p: p["queries_per_s"]) if ok else None
    return {"stage": stage.name, "vectors": len(xb), "best_at_recall_0.95": best, "dim": xb.shape[1], "queries": len(xq), "k": k,
            "quality": f"recall@{k} vs exact", "build_s": builds, "points": points, "note": note,
            "pareto": pareto_front(points, quality="recall_at_k", cost="ms_per_query")}


def sweep_pipeline(pipe: Pipeline, batches, judgments, top: int, repeats: int, progress: bool) -> dict:
    """Candidates k and the search parameter of the first FAISS stage, through the whole pipeline:
    quality of each variant, then passes over all queries timed in interleaved rounds."""
    from ..metrics import evaluate

    step = next((i for i, s in enumerate(pipe.stages) if s.name == "recall.faiss"), None)
    if step is None:
        return {"points": [], "quality": None, "pareto": []}
    stage = pipe.stages[step]
    grid = [("k", k) for k in (10, 25, 50, 100, 200, 400) if k <= stage.index_.ntotal]
    param, values = _search_grid(stage.index_.factory)
    if param:
        grid += [(param, v) for v in values if v <= 256]
    variants, points = [], []
    with progress_bar(len(grid), "pipeline sweep (quality)", progress) as bar:
        for name, value in grid:
            stages = list(pipe.stages)
            stages[step] = clone_warm(stage, **{name: value})
            variant = Pipeline(stages, inputs=pipe.inputs)
            point = {"param": name, "value": value, "k": stages[step].k}
            if judgments is not None:
                res = evaluate(pa.concat_tables([variant.run(b) for b in batches]), judgments,
                               k_values=sorted({10, top}), metrics=("ndcg", "recall"))
                point.update({"ndcg_at_10": res["ndcg@10"], f"recall_at_{top}": res[f"recall@{top}"]})
            variants.append(variant)
            points.append(point)
            bar.update()

    def one_pass(variant: Pipeline) -> Callable[[], None]:
        return lambda: [variant.run(b) for b in batches]

    n = sum(b.num_rows for b in batches)
    for point, t in zip(points, interleaved([one_pass(v) for v in variants], repeats, warm=False)):
        point.update({"ms_per_query": t * 1000 / n, "queries_per_s": n / t})
    quality = f"recall_at_{top}" if judgments is not None else None
    return {"points": points, "quality": quality, "queries": n,
            "pareto": pareto_front(points, quality=quality, cost="ms_per_query") if quality else []}


def sweep_batch_size(pipe: Pipeline, queries: pa.Table, repeats: int, progress: bool) -> list[dict]:
    """Queries per second and latency per batch size; passes timed in interleaved rounds
    (batch size 1 on the first 64 queries only)."""
    sizes = [s for s in (1, 16, 64, 256, 1024) if s <= max(queries.num_rows, 1)]
    runs = {size: split_batches(queries.slice(0, 64) if size == 1 else queries, size) for size in sizes}
    seconds: dict[int, list[float]] = {size: [] for size in sizes}
    passes: dict[int, list[float]] = {size: [] for size in sizes}
    for batches in runs.values():
        for b in batches[:2]:
            pipe.run(b)
    with progress_bar(len(sizes) * repeats, "batch-size sweep", progress) as bar:
        for r in range(repeats):
            for size in (sizes if r % 2 == 0 else sizes[::-1]):
                t0 = time.perf_counter()
                for b in runs[size]:
                    t1 = time.perf_counter()
                    pipe.run(b)
                    seconds[size].append(time.perf_counter() - t1)
                passes[size].append(time.perf_counter() - t0)
                bar.update()
    out = []
    for size, batches in runs.items():
        n = sum(b.num_rows for b in batches)
        out.append({"batch_size": size, "queries": n, "queries_per_s": n / median(passes[size]),
                    **latency_summary(seconds[size], [b.num_rows for b in batches] * repeats)})
    return out
