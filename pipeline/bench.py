"""``funnel bench``: latency, throughput and quality of a pipeline, stage by stage.

A benchmark run answers four questions about one config on one machine, and writes the answers
to ``DIR/report.json``, ``DIR/report.md`` and PNG plots:

**How fast is each stage?** The queries are cut into batches of ``batch_size``; the pipeline
runs over all of them ``warmup`` times untimed, then ``repeats`` times timed. For every stage
the report gives the rows in and out of one pass, the 50th/95th/99th percentile of its
milliseconds per batch and per query (a batch's time divided by its queries), its rows per
second and its share of the pipeline's time; end to end, queries per second, the same
percentiles, the latency of one query sent alone, and the process' peak resident memory.

**How good is each stage?** With ``judgments``, every stage whose output has candidates is
scored by Recall@k against them (k = the most candidates a query has after that stage; metrics
from :mod:`pipeline.metrics`, i.e. ranx), and the final output by NDCG, Recall, MRR, MAP and
Precision. Every FAISS recall stage is also scored against exact search
(``ann_recall_at_k``): a ``faiss.IndexFlat`` of the index's metric over the vectors
reconstructed from the stored ``index.faiss``, compared with faiss' own
``knn_intersection_measure``.

**What does Funnel cost?** ``benchmarks/bare_pipeline.py`` (in a source checkout) does the same
work with the bare libraries — sentence-transformers, ``faiss.read_index``,
``lightgbm.Booster(model_file=...)``, Polars — and no Funnel. Both run in this process,
interleaved batch by batch (alternating which goes first) so that a noisy machine slows both
alike; ``overhead_ratio`` is Funnel's total time over the bare one, and ``agreement`` the share
of queries for which both return the same top-N list. The encoder is compared the same way with
a bare fp32 ``SentenceTransformer.encode`` on the same texts (speed-up and cosine).

**What are the trade-offs?** With ``sweep``, search parameters and index types of each FAISS
stage (efSearch, nprobe, Flat / HNSW / IVF, and hnswlib on the same vectors when installed),
the candidates ``k`` of recall and the batch size are varied; each point records quality and
milliseconds per query, and only Pareto-best points are kept on the front (faiss'
``OperatingPoints``). With ``ann_size``, the same is done on a synthetic clustered vector set
of that size, comparing Funnel's ``recall.faiss`` stage with raw faiss and hnswlib.

Timings depend on the machine and on what else runs on it: the report carries a machine
fingerprint (CPU, cores, threads used, library versions, GPU and driver) and the load average
at start and end, and compares only numbers measured side by side in the same run. Nothing in
the tests asserts a timing.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from .columns import ITEM_ID, QUERY_ID, RANK, SCORE
from .errors import ConfigError, DataError
from .stage import Pipeline, Stage, StageStats

__all__ = ["BenchOptions", "run_bench", "parse_override", "fingerprint", "latency_summary", "pareto_front", "synthetic_vectors",
           "stored_vectors", "ann_recall", "BARE_SCRIPT"]

#: The bare-library baseline, found in a source checkout next to the ``pipeline`` package.
BARE_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bare_pipeline.py"
#: Queries the whole-pipeline sweeps (candidates k, search parameter, batch size) run on, at most.
SWEEP_QUERIES = 512
LIBRARIES = ("funnel-rank", "torch", "sentence-transformers", "transformers", "faiss-cpu", "faiss-gpu-cu12",
             "lightgbm", "polars", "pyarrow", "numpy", "ranx", "hnswlib", "matplotlib")


@dataclass
class BenchOptions:
    """What ``funnel bench`` measures; see :func:`run_bench` and ``funnel bench --help``."""

    queries: Path
    out: Path
    judgments: Path | None = None
    device: str | None = None
    repeats: int = 5
    warmup: int = 1
    batch_size: int | None = None
    top: int | None = None
    max_queries: int | None = None
    bare: bool | None = None
    encoder_texts: int = 2000
    sweep: bool = False
    ann_size: int = 0
    ann_dim: int = 384
    threads: int | None = None
    overrides: dict[str, dict[str, Any]] | None = None
    progress: bool = True
    seed: int = 0


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"encode.sentence_transformers.precision=bf16"`` -> ``(stage type, parameter, value)``.

    The value is read as a TOML value (``256``, ``true``, ``"text"``, ``[1, 2]``) and, when it is
    not one, taken as a plain string; it is never evaluated as code.
    """
    import tomllib

    key, sep, raw = text.partition("=")
    stage, dot, param = key.strip().rpartition(".")
    if not sep or not dot or "." not in stage or not param:
        raise ConfigError(f"--set expects STAGE_TYPE.PARAM=VALUE, such as encode.sentence_transformers.batch_size=256; got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return stage, param, value


def _with_overrides(pipe: Pipeline, overrides: dict[str, dict[str, Any]] | None) -> Pipeline:
    """``pipe`` with the parameters in ``overrides`` (``{stage type: {param: value}}``) replaced."""
    if not overrides:
        return pipe
    unknown = set(overrides) - {s.name for s in pipe.stages}
    if unknown:
        raise ConfigError(f"--set names stage type(s) {sorted(unknown)} that the pipeline does not have; "
                          f"it has {', '.join(dict.fromkeys(pipe.stage_names()))}")
    stages = [s.clone(**overrides[s.name]) if s.name in overrides else s for s in pipe.stages]
    return Pipeline(stages, inputs=pipe.inputs)


# -- machine ------------------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "neon", "asimd")
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    return []


def _gpu() -> dict | None:
    import subprocess

    import torch

    if not torch.cuda.is_available():
        return None
    info = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(), "cuda": torch.version.cuda}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    return info


def _threads() -> dict:
    import faiss
    import torch

    return {"torch": torch.get_num_threads(), "faiss_omp": faiss.omp_get_max_threads(),
            "polars": pl.thread_pool_size()}


def _slug(text: str) -> str:
    text = re.sub(r"\(r\)|\(tm\)|cpu @.*|processor|\d+-core", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:40]


def fingerprint() -> dict:
    """The machine and software a benchmark ran on; ``id`` is a short name for results folders."""
    versions = {}
    for name in LIBRARIES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    cores = os.cpu_count() or 1
    with contextlib.suppress(AttributeError):
        cores = len(os.sched_getaffinity(0))
    gpu = _gpu()
    cpu = _cpu_model()
    ident = f"{_slug(cpu)}-{cores}c" + (f"-{_slug(gpu['name'])}" if gpu else "")
    mem = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {
        "id": ident, "date": _dt.date.today().isoformat(), "cpu": cpu, "cpu_flags": _cpu_flags(), "cores": cores,
        "memory_gb": mem, "threads": _threads(), "gpu": gpu, "os": platform.platform(),
        "python": platform.python_version(), "libraries": versions,
    }


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


# -- small tools --------------------------------------------------------------------------------


def latency_summary(seconds: list[float], queries: list[int] | None = None) -> dict:
    """p50/p95/p99 in milliseconds of ``seconds`` (one per batch), and per query when ``queries``
    gives the queries of each batch (a batch's time shared among its queries)."""
    out: dict[str, float | None] = {}
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    for p in (50, 95, 99):
        out[f"p{p}_ms"] = float(np.percentile(ms, p)) if len(ms) else None
    if queries is not None:
        per_q = ms / np.maximum(np.asarray(queries, dtype=np.float64), 1)
        for p in (50, 95, 99):
            out[f"p{p}_ms_per_query"] = float(np.percentile(per_q, p)) if len(per_q) else None
    return out


def _operating_points():
    """faiss' ``OperatingPoints`` with keys that are never compared (every point is measured)."""
    from faiss.contrib.evaluation import OperatingPoints

    class Points(OperatingPoints):
        def compare_keys(self, k1, k2):
            return 0

        def do_nothing_key(self):
            return None

    return Points()


def pareto_front(points: list[dict], *, quality: str, cost: str) -> list[dict]:
    """The points no other point beats on both ``quality`` (higher) and ``cost`` (lower),
    by cost; kept with faiss' ``OperatingPoints``."""
    ops = _operating_points()
    for i, p in enumerate(points):
        if p.get(quality) is not None and p.get(cost) is not None:
            ops.add_operating_point(i, p[quality], p[cost])
    return sorted((points[i] for i, _, _ in ops.operating_points), key=lambda p: p[cost])


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _clone_warm(stage: Stage, **params: Any) -> Stage:
    """A clone with some search-time parameters changed that shares the loaded state (``*_``)."""
    new = stage.clone(**params)
    for key, value in vars(stage).items():
        if key.endswith("_") and not key.startswith("_"):
            setattr(new, key, value)
    return new


def _batches(table: pa.Table, size: int) -> list[pa.Table]:
    return [table.slice(i, size) for i in range(0, table.num_rows, size)]


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", disable=not progress, leave=False)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else round(float(value), 6)
    if isinstance(value, Path):
        return str(value)
    return value


# -- vectors ------------------------------------------------------------------------------------


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


def _exact_index(vectors: np.ndarray, metric: str):
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
    exact = _exact_index(stored_vectors(cpu), index.metric)
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


# -- the pieces of a run ------------------------------------------------------------------------


def _load_bare():
    """The ``BarePipeline`` class of ``benchmarks/bare_pipeline.py``, or None outside a checkout."""
    if not BARE_SCRIPT.exists():
        return None
    spec = importlib.util.spec_from_file_location("funnel_bench_bare_pipeline", BARE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _candidate_tables(pipe: Pipeline, batches: list[pa.Table], bare, progress: bool):
    """One untimed pass that keeps what quality needs: (query_id, item_id, score, rank) after each
    candidate stage, the input embeddings of each FAISS stage, and the bare pipeline's output."""
    outputs: dict[int, list[pa.Table]] = {}
    embeddings: dict[int, list[np.ndarray]] = {}
    faiss_steps = {i: s.embedding_column for i, s in enumerate(pipe.stages) if s.name == "recall.faiss"}
    keep = [QUERY_ID, ITEM_ID, SCORE, RANK]

    def grab_embeddings(step: int, table: pa.Table) -> None:
        col = faiss_steps.get(step)
        if col is not None and col in table.column_names:
            arr = table.column(col).combine_chunks()
            flat = pc.list_flatten(arr).to_numpy(zero_copy_only=False)
            embeddings.setdefault(step, []).append(flat.astype(np.float32).reshape(len(arr), -1))

    def observe(step: int, table: pa.Table) -> None:
        grab_embeddings(step + 1, table)
        if all(c in table.column_names for c in keep):
            outputs.setdefault(step, []).append(table.select(keep))

    bare_out = []
    with _bar(len(batches), "quality pass", progress) as bar:
        for batch in batches:
            grab_embeddings(0, batch)
            pipe.run(batch, observer=observe)
            if bare is not None:
                bare_out.append(bare.run(pl.from_arrow(batch)))
            bar.update()
    tables = {i: pa.concat_tables(t) for i, t in outputs.items()}
    vectors = {i: np.vstack(v) for i, v in embeddings.items()}
    return tables, vectors, (pl.concat(bare_out) if bare_out else None)


def _top_lists(frame: pl.DataFrame) -> pl.DataFrame:
    return (frame.select(pl.col(QUERY_ID).cast(pl.String), pl.col(ITEM_ID).cast(pl.String), RANK)
            .sort([QUERY_ID, RANK]).group_by(QUERY_ID, maintain_order=True).agg(pl.col(ITEM_ID)))


def _agreement(funnel: pa.Table, bare: pl.DataFrame) -> float:
    a, b = _top_lists(pl.from_arrow(funnel)), _top_lists(bare)
    joined = a.join(b, on=QUERY_ID, how="full", suffix="_bare")
    same = joined.select((pl.col(ITEM_ID) == pl.col(f"{ITEM_ID}_bare")).fill_null(False)).to_series()
    return float(same.mean()) if len(same) else float("nan")


@dataclass
class _Timings:
    """Seconds of the timed passes: wall clock per batch and per pass, and process CPU time per pass."""

    stats: list[StageStats]
    batches: list[float]
    passes: list[float]
    cpu_passes: list[float]
    bare_batches: list[float]
    bare_passes: list[float]
    bare_cpu_passes: list[float]
    bare_steps: list[list[float]]


def _timed_passes(pipe: Pipeline, batches: list[pa.Table], *, repeats: int, bare=None, progress: bool = True) -> _Timings:
    """``repeats`` timed passes; with ``bare``, each batch runs through both, alternating which goes
    first. CPU time (``time.process_time``, all threads) is kept beside wall time: on a loaded
    machine it varies far less."""
    t = _Timings([], [], [], [], [], [], [], [])
    bare_inputs = [pl.from_arrow(b) for b in batches] if bare is not None else []
    runners = {"funnel": lambda j: pipe.run(batches[j], t.stats), "bare": lambda j: bare.run(bare_inputs[j])}
    with _bar(len(batches) * repeats, "timed passes", progress) as bar:
        for r in range(repeats):
            wall = {"funnel": 0.0, "bare": 0.0}
            cpu = {"funnel": 0.0, "bare": 0.0}
            for j in range(len(batches)):
                order = ("funnel",) if bare is None else (("funnel", "bare") if (r + j) % 2 == 0 else ("bare", "funnel"))
                for who in order:
                    c0, t0 = time.process_time(), time.perf_counter()
                    runners[who](j)
                    dt = time.perf_counter() - t0
                    cpu[who] += time.process_time() - c0
                    wall[who] += dt
                    (t.batches if who == "funnel" else t.bare_batches).append(dt)
                    if who == "bare":
                        t.bare_steps.append(list(getattr(bare, "step_seconds", [])))
                bar.update()
            t.passes.append(wall["funnel"])
            t.cpu_passes.append(cpu["funnel"])
            if bare is not None:
                t.bare_passes.append(wall["bare"])
                t.bare_cpu_passes.append(cpu["bare"])
    return t


def _single_query(pipe: Pipeline, queries: pa.Table, bare, n: int) -> dict:
    """Latency of one query sent alone (first ``n`` queries), interleaved with the bare pipeline."""
    f, b = [], []
    rows = [queries.slice(i, 1) for i in range(min(n, queries.num_rows))]
    pipe.run(rows[0])
    if bare is not None:
        bare.run(pl.from_arrow(rows[0]))
    for i, row in enumerate(rows):
        for who in ((0, 1) if i % 2 == 0 else (1, 0)):
            if who == 0:
                t0 = time.perf_counter()
                pipe.run(row)
                f.append(time.perf_counter() - t0)
            elif bare is not None:
                frame = pl.from_arrow(row)
                t0 = time.perf_counter()
                bare.run(frame)
                b.append(time.perf_counter() - t0)
    out = {"queries": len(rows), **{f"funnel_{k}": v for k, v in latency_summary(f).items()}}
    if b:
        out.update({f"bare_{k}": v for k, v in latency_summary(b).items()})
        out["overhead_ratio_p50"] = out["funnel_p50_ms"] / out["bare_p50_ms"]
    return out


def _quality(tables: dict[int, pa.Table], judgments: pa.Table | None, final_step: int, top: int) -> tuple[dict, dict]:
    from .metrics import evaluate

    per_stage: dict[int, dict] = {}
    final: dict = {}
    if judgments is None:
        return per_stage, final
    for step, table in tables.items():
        k = int(pl.from_arrow(table.select([QUERY_ID])).group_by(QUERY_ID).len()["len"].max() or 1)
        res = evaluate(table, judgments, k_values=(k,), metrics=("recall",))
        per_stage[step] = {"k": k, "recall_at_k": res[f"recall@{k}"]}
    if final_step in tables:
        ks = sorted({10, top})
        final = evaluate(tables[final_step], judgments, k_values=ks)
    return per_stage, final


def _texts_for_encoder(cfg, pipe: Pipeline, queries: pa.Table, encoder: Stage, n: int, seed: int) -> dict[str, list[str]]:
    out = {}
    if encoder.text_column in queries.column_names:
        out["queries"] = [t for t in queries.column(encoder.text_column).to_pylist()[:n] if t]
    recall = next((s for s in pipe.stages if s.name == "recall.faiss"), None)
    if recall is not None and "catalog" in cfg.data and cfg.data_path("catalog").exists():
        from .data import read_catalog
        from stages.faiss import _item_texts

        catalog = read_catalog(cfg.data_path("catalog"), list(recall.item_text))
        rows = np.random.default_rng(seed).permutation(catalog.num_rows)[:n]
        out["items"] = [t for t in _item_texts(catalog.take(pa.array(np.sort(rows))), recall.item_text) if t]
    return out


def _encoder_bench(encoder: Stage, texts: dict[str, list[str]], repeats: int, sweep: bool, progress: bool) -> dict:
    """The Funnel encoder (as configured, and in bf16 when on CPU) against bare fp32
    ``SentenceTransformer.encode`` with its defaults, interleaved, on the same texts."""
    import torch
    from sentence_transformers import SentenceTransformer

    from stages.sentence_transformers import resolve_model

    path, _ = resolve_model(encoder.model)
    bare = SentenceTransformer(path, device=encoder.device_)
    bare.eval()
    compiled = ", compiled" if getattr(encoder, "compile", False) else ""
    variants = {f"configured ({encoder.precision}, batch {encoder.batch_size}{compiled})": encoder}
    fast = "bf16" if encoder.device_ == "cpu" else "fp16"
    fast_encoder = encoder
    if encoder.precision != fast:  # its own model: on CPU bf16 is a conversion of the weights, not a context
        fast_encoder = encoder.clone(precision=fast)
        fast_encoder.warm_up()
    for bs in sorted({encoder.batch_size, 256} | ({32, 64, 128} if sweep else set())):
        if (fast, bs) != (encoder.precision, encoder.batch_size):
            variants[f"{fast}, batch {bs}{compiled}"] = _clone_warm(fast_encoder, batch_size=bs)
    report = {"bare": f"SentenceTransformer.encode fp32 (batch_size 32, normalize_embeddings={encoder.normalize})",
              "device": encoder.device_, "torch_threads": torch.get_num_threads(), "sets": {}}
    runs = max(1, min(repeats, 3))
    with _bar(len(texts) * runs * (len(variants) + 1), "encoder", progress) as bar:
        for name, items in texts.items():
            if not items:
                continue
            bare.encode(items[:64], normalize_embeddings=encoder.normalize)
            for v in variants.values():
                v.encode_texts(items[:64])
            times: dict[str, list[float]] = {}
            cpu: dict[str, list[float]] = {}
            outs: dict[str, np.ndarray] = {}
            order = ["bare", *variants]
            for r in range(runs):
                for who in (order if r % 2 == 0 else order[::-1]):
                    c0, t0 = time.process_time(), time.perf_counter()
                    if who == "bare":
                        outs[who] = bare.encode(items, normalize_embeddings=encoder.normalize)
                    else:
                        outs[who] = variants[who].encode_texts(items)
                    times.setdefault(who, []).append(time.perf_counter() - t0)
                    cpu.setdefault(who, []).append(time.process_time() - c0)
                    bar.update()
            ref = outs["bare"] / np.linalg.norm(outs["bare"], axis=1, keepdims=True)
            base, base_cpu = _median(times["bare"]), _median(cpu["bare"])
            entry = {"texts": len(items), "bare_fp32_texts_per_s": len(items) / base, "variants": {}}
            for who in variants:
                got = outs[who] / np.linalg.norm(outs[who], axis=1, keepdims=True)
                cos = (got * ref).sum(axis=1)
                t = _median(times[who])
                entry["variants"][who] = {"texts_per_s": len(items) / t, "speedup": base / t,
                                          "speedup_cpu_time": base_cpu / max(_median(cpu[who]), 1e-9),
                                          "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())}
            report["sets"][name] = entry
    return report


# -- sweeps -------------------------------------------------------------------------------------


def _interleaved(calls: list[Callable[[], Any]], repeats: int, *, warm: bool = True) -> list[float]:
    """Median seconds of each call, timed in rounds that go through every call (alternating the
    direction), so that a change of load on the machine hits every call alike. ``warm`` runs
    each call once, untimed, first."""
    for call in calls if warm else ():
        call()
    times: list[list[float]] = [[] for _ in calls]
    for r in range(repeats):
        for i in (range(len(calls)) if r % 2 == 0 else reversed(range(len(calls)))):
            t0 = time.perf_counter()
            calls[i]()
            times[i].append(time.perf_counter() - t0)
    return [_median(t) for t in times]


def _search_grid(factory: str) -> tuple[str | None, list[int]]:
    """The search parameter of an index factory string and the values a sweep tries."""
    ivf = re.search(r"IVF(\d+)", factory)
    if ivf:
        nlist = int(ivf.group(1))
        return "nprobe", sorted({p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256) if p <= nlist} | {nlist})
    if "HNSW" in factory:
        return "ef_search", [16, 24, 32, 48, 64, 96, 128, 256, 512]
    return None, [0]


def _nlist(n: int) -> int:
    """IVF lists for ``n`` vectors: about 4 sqrt(n), a power of two, with >= 39 training points per list."""
    return int(2 ** min(round(math.log2(max(4.0, 4 * math.sqrt(n)))), math.floor(math.log2(max(1, n // 39)))))


def _hnswlib_index(xb: np.ndarray, metric: str, *, m: int = 32, ef_construction: int = 40, seed: int = 0):
    """An hnswlib index over ``xb`` (None when hnswlib is not installed)."""
    try:
        import hnswlib
    except ImportError:
        return None
    index = hnswlib.Index(space="ip" if metric == "ip" else "l2", dim=xb.shape[1])
    index.init_index(max_elements=len(xb), M=m, ef_construction=ef_construction, random_seed=seed)
    index.add_items(xb, np.arange(len(xb)), num_threads=-1)
    return index


HNSWLIB_MISSING = "hnswlib is not installed (pip install funnel-rank[bench]): no hnswlib points"
HNSWLIB_EF = [10, 16, 24, 32, 48, 64, 96, 128, 256, 512]


def _hnswlib_search(index, xq: np.ndarray, k: int, ef: int) -> Callable[[], np.ndarray]:
    def search() -> np.ndarray:
        index.set_ef(max(ef, k))
        return index.knn_query(xq, k=k, num_threads=-1)[0].astype(np.int64)

    return search


def _measure(contenders: list[tuple[dict, Callable[[], Any], Callable[[], np.ndarray]]], ref: np.ndarray,
             nq: int, repeats: int) -> list[dict]:
    """Time ``(point, timed call, call returning result positions)`` contenders interleaved; add
    recall against ``ref`` and milliseconds and queries per second to each point."""
    from faiss.contrib.evaluation import knn_intersection_measure

    seconds = _interleaved([c[1] for c in contenders], repeats)
    points = []
    for (point, _, result), t in zip(contenders, seconds):
        points.append({**point, "recall_at_k": knn_intersection_measure(result(), ref),
                       "ms_per_query": t * 1000 / nq, "queries_per_s": nq / t})
    return points


def _sweep_index(stage: Stage, queries: np.ndarray, *, k: int = 10, repeats: int = 3, progress: bool = True,
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
    _, ref = _exact_index(xb, index.metric).search(xq, k)
    ids = pa.array(np.arange(len(xb)))
    nlist = _nlist(len(xb))
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
    hnsw = _hnswlib_index(xb, index.metric)
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
            search = _hnswlib_search(hnsw, xq, k, ef)
            contenders.append(({"family": "hnswlib M=32", "param": "ef", "value": max(ef, k)}, search, search))
    points = _measure(contenders, ref, len(xq), repeats)
    best = {}
    for family in dict.fromkeys(p["family"] for p in points):
        ok = [p for p in points if p["family"] == family and p["recall_at_k"] >= 0.95]
        best[family] = max(ok, key=lambda p: p["queries_per_s"]) if ok else None
    return {"stage": stage.name, "vectors": len(xb), "best_at_recall_0.95": best, "dim": xb.shape[1], "queries": len(xq), "k": k,
            "quality": f"recall@{k} vs exact", "build_s": builds, "points": points, "note": note,
            "pareto": pareto_front(points, quality="recall_at_k", cost="ms_per_query")}


def _sweep_pipeline(pipe: Pipeline, batches, judgments, top: int, repeats: int, progress: bool) -> dict:
    """Candidates k and the search parameter of the first FAISS stage, through the whole pipeline:
    quality of each variant, then passes over all queries timed in interleaved rounds."""
    from .metrics import evaluate

    step = next((i for i, s in enumerate(pipe.stages) if s.name == "recall.faiss"), None)
    if step is None:
        return {"points": [], "quality": None, "pareto": []}
    stage = pipe.stages[step]
    grid = [("k", k) for k in (10, 25, 50, 100, 200, 400) if k <= stage.index_.ntotal]
    param, values = _search_grid(stage.index_.factory)
    if param:
        grid += [(param, v) for v in values if v <= 256]
    variants, points = [], []
    with _bar(len(grid), "pipeline sweep (quality)", progress) as bar:
        for name, value in grid:
            stages = list(pipe.stages)
            stages[step] = _clone_warm(stage, **{name: value})
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
    for point, t in zip(points, _interleaved([one_pass(v) for v in variants], repeats, warm=False)):
        point.update({"ms_per_query": t * 1000 / n, "queries_per_s": n / t})
    quality = f"recall_at_{top}" if judgments is not None else None
    return {"points": points, "quality": quality, "queries": n,
            "pareto": pareto_front(points, quality=quality, cost="ms_per_query") if quality else []}


def _sweep_batch_size(pipe: Pipeline, queries: pa.Table, repeats: int, progress: bool) -> list[dict]:
    """Queries per second and latency per batch size; passes timed in interleaved rounds
    (batch size 1 on the first 64 queries only)."""
    sizes = [s for s in (1, 16, 64, 256, 1024) if s <= max(queries.num_rows, 1)]
    runs = {size: _batches(queries.slice(0, 64) if size == 1 else queries, size) for size in sizes}
    seconds: dict[int, list[float]] = {size: [] for size in sizes}
    passes: dict[int, list[float]] = {size: [] for size in sizes}
    for batches in runs.values():
        for b in batches[:2]:
            pipe.run(b)
    with _bar(len(sizes) * repeats, "batch-size sweep", progress) as bar:
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
        out.append({"batch_size": size, "queries": n, "queries_per_s": n / _median(passes[size]),
                    **latency_summary(seconds[size], [b.num_rows for b in batches] * repeats)})
    return out


def _ann_synthetic(n: int, dim: int, *, k: int = 10, repeats: int = 3, seed: int = 0,
                   log: Callable[[str], None] = print) -> dict:
    """Funnel's ``recall.faiss`` stage (HNSW32 and IVF) against raw faiss and hnswlib (M=32, the
    same efConstruction) on synthetic vectors. Every index is built first; then every operating
    point is timed in interleaved rounds (:func:`_interleaved`). The stage runs on an Arrow table
    of query embeddings and returns its long-form table, so its time includes Funnel's work around
    the search; its recall is that of the same search done raw."""
    import faiss

    from indexes.faiss_index import FaissIndex
    from stages.faiss import FaissRecall

    log(f"      ann: generating {n} x {dim} clustered vectors")
    xb, xq = synthetic_vectors(n, dim, seed=seed)
    t0 = time.perf_counter()
    _, ref = _exact_index(xb, "ip").search(xq, k)
    builds = {"exact IndexFlatIP (search only)": time.perf_counter() - t0}
    nlist = _nlist(n)
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
                s = _clone_warm(stage, **{param: v})
                params = (faiss.SearchParametersHNSW(efSearch=v) if param == "ef_search"
                          else faiss.SearchParametersIVF(nprobe=v))
                raw_search = (lambda raw, params: lambda: raw.search(xq, k, params=params)[1])(raw, params)
                run_stage = (lambda s: lambda: s(queries))(s)
                point = {"param": param, "value": v}
                contenders.append(({**point, "family": f"funnel recall.faiss {factory}"}, run_stage, raw_search))
                contenders.append(({**point, "family": f"faiss {factory} (raw search)"}, raw_search, raw_search))
        log("      ann: building hnswlib M=32, ef_construction=40 (faiss' default)")
        t0 = time.perf_counter()
        hnsw = _hnswlib_index(xb, "ip", seed=seed)
        note = HNSWLIB_MISSING
        if hnsw is not None:
            builds["hnswlib M=32"], note = time.perf_counter() - t0, None
            for ef in grids["ef_search"]:
                search = _hnswlib_search(hnsw, xq, k, ef)
                contenders.append(({"family": "hnswlib M=32", "param": "ef", "value": max(ef, k)}, search, search))
        log(f"      ann: timing {len(contenders)} operating points, interleaved")
        points = _measure(contenders, ref, len(xq), repeats)

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


# -- report -------------------------------------------------------------------------------------


def _plots(report: dict, out: Path) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    stages = report["stages"]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(stages) + 1.5))
    names = [f"{s['step']}. {s['name']}" for s in stages][::-1]
    p50 = [s["p50_ms"] or 0 for s in stages][::-1]
    p95 = [s["p95_ms"] or 0 for s in stages][::-1]
    ax.barh(names, p95, color="#c6dbef", label="p95")
    ax.barh(names, p50, color="#2171b5", label="p50")
    ax.set_xlabel(f"ms per batch of {report['end_to_end']['batch_size']} queries")
    ax.set_title(f"{report['config_name']}: latency per stage ({report['fingerprint']['id']})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "stages.png", dpi=110)
    plt.close(fig)
    files.append("stages.png")

    def pareto_plot(sweep: dict, quality: str, filename: str, title: str, group: str = "family") -> None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        groups: dict[str, list[dict]] = {}
        for p in sweep["points"]:
            groups.setdefault(str(p.get(group)), []).append(p)
        for name, pts in groups.items():
            pts = sorted(pts, key=lambda p: p["ms_per_query"])
            ax.plot([p["ms_per_query"] for p in pts], [p.get(quality) for p in pts], "o-", ms=4, alpha=0.7, label=name)
        front = sweep["pareto"]
        if front:
            ax.plot([p["ms_per_query"] for p in front], [p[quality] for p in front], "k--", lw=1, label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel("ms per query (batch throughput)")
        ax.set_ylabel(quality.replace("_at_", "@"))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / filename, dpi=110)
        plt.close(fig)
        files.append(filename)

    sweeps = report.get("sweeps") or {}
    for i, s in enumerate(sweeps.get("index", [])):
        pareto_plot(s, "recall_at_k", f"sweep_index_{i + 1}.png", f"{s['stage']}: {s['quality']} vs time, "
                    f"{s['vectors']} vectors")
    pipe = sweeps.get("pipeline")
    if pipe and pipe["points"] and pipe["quality"]:
        pareto_plot(pipe, pipe["quality"], "sweep_pipeline.png", "whole pipeline: quality vs time", group="param")
    sizes = sweeps.get("batch_size")
    if sizes:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([p["batch_size"] for p in sizes], [p["queries_per_s"] for p in sizes], "o-")
        ax.set_xscale("log")
        ax.set_xlabel("batch size (queries)")
        ax.set_ylabel("queries per second")
        ax.set_title("whole pipeline: throughput vs batch size")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "sweep_batch_size.png", dpi=110)
        plt.close(fig)
        files.append("sweep_batch_size.png")
    if report.get("ann"):
        a = report["ann"]
        pareto_plot(a, "recall_at_k", "ann_synthetic.png", f"synthetic {a['vectors']} x {a['dim']}: {a['quality']} vs time")
    return files


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2g}"
    return str(v)


def _markdown(r: dict) -> str:
    fp, e = r["fingerprint"], r["end_to_end"]
    lines = [f"# funnel bench: {r['config_name']}", "",
             f"Config `{r['config']}`, {e['queries']} queries from `{r['queries']}`, batches of {e['batch_size']}, "
             f"{r['warmup']} warm-up + {r['repeats']} timed passes"
             + (f"; parameters replaced: `{json.dumps(r['overrides'])}`" if r.get("overrides") else "") + ".", "",
             f"Machine `{fp['id']}`: {fp['cpu']}, {fp['cores']} cores ({', '.join(fp['cpu_flags'])}), "
             f"{fp['memory_gb']} GB; GPU: {fp['gpu']['name'] + ' (driver ' + str(fp['gpu'].get('driver')) + ')' if fp['gpu'] else 'none'}; "
             f"threads {fp['threads']}; load average {r['load_average']['start']} at start, "
             f"{r['load_average']['end']} at end; {fp['date']}.", "",
             "Libraries: " + ", ".join(f"{k} {v}" for k, v in fp["libraries"].items()), "",
             "## End to end", "",
             "| queries/s | p50 ms/batch | p95 | p99 | p50 ms/query | 1 query alone p50 ms | peak RSS MB |",
             "|---:|---:|---:|---:|---:|---:|---:|",
             f"| {_fmt(e['queries_per_s'], 1)} | {_fmt(e['p50_ms'])} | {_fmt(e['p95_ms'])} | {_fmt(e['p99_ms'])} | "
             f"{_fmt(e['p50_ms_per_query'], 3)} | {_fmt(e['single_query'].get('funnel_p50_ms'))} | {_fmt(e['peak_rss_mb'], 0)} |", ""]
    if e.get("quality"):
        lines += ["Quality of the final output: " + ", ".join(f"{k} {_fmt(v, 4)}" for k, v in e["quality"].items()), ""]
    lines += ["## Stages", "",
              "| step | stage | device | rows in | rows out | p50 ms | p95 ms | p99 ms | p50 ms/query | rows/s | share | "
              "bare p50 ms | Funnel/bare | recall@k | ANN recall@k |",
              "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in r["stages"]:
        rec = f"{_fmt(s.get('recall_at_k'), 3)} @{s['k']}" if s.get("recall_at_k") is not None else "–"
        ann = f"{_fmt(s.get('ann_recall_at_k'), 3)} @{s['ann_k']}" if s.get("ann_recall_at_k") is not None else "–"
        lines.append(f"| {s['step']} | {s['name']} | {s['device']} | {s['rows_in']} | {s['rows_out']} | {_fmt(s['p50_ms'])} | "
                     f"{_fmt(s['p95_ms'])} | {_fmt(s['p99_ms'])} | {_fmt(s['p50_ms_per_query'], 3)} | "
                     f"{_fmt(s['throughput_rows_per_s'], 0)} | {_fmt(s['share_of_time'])} | {_fmt(s.get('bare_p50_ms'))} | "
                     f"{_fmt(s.get('overhead_ratio'), 3)} | {rec} | {ann} |")
    lines += ["", "![stages](stages.png)", ""]
    o = r.get("overhead")
    if o:
        lines += ["## Overhead against the bare libraries", ""]
        if o.get("skipped"):
            lines += [f"Not measured: {o['skipped']}", ""]
        else:
            sq = e["single_query"]
            lines += [f"`{o['bare_script']}` does the same work with sentence-transformers, faiss, Polars and LightGBM; "
                      "both ran in this process, interleaved batch by batch.", "",
                      "| | Funnel s/pass | bare s/pass | overhead_ratio | paired median ratio | CPU-time ratio | same top-N lists |",
                      "|---|---:|---:|---:|---:|---:|---:|",
                      f"| batches of {e['batch_size']} | {_fmt(o['funnel_s_per_pass'], 3)} | {_fmt(o['bare_s_per_pass'], 3)} | "
                      f"**{_fmt(o['overhead_ratio'], 3)}** | {_fmt(o['paired_median_ratio'], 3)} | {_fmt(o['cpu_overhead_ratio'], 3)} | "
                      f"{_fmt(o['agreement'], 3)} |",
                      f"| one query alone (p50 ms) | {_fmt(sq.get('funnel_p50_ms'))} | {_fmt(sq.get('bare_p50_ms'))} | "
                      f"{_fmt(sq.get('overhead_ratio_p50'), 3)} | | | |", "",
                      f"Stages after the encoder only (Funnel seconds / bare seconds): "
                      f"**{_fmt(o.get('overhead_ratio_after_encoder'), 3)}**. The encoder itself is compared below.", ""]
    enc = r.get("encoder")
    if enc:
        lines += ["## Encoder against bare sentence-transformers", "", f"Baseline: {enc['bare']} on {enc['device']}, "
                  f"{enc['torch_threads']} torch threads.", "",
                  "| texts | n | bare fp32 texts/s | Funnel variant | texts/s | speed-up | speed-up (CPU time) | cosine min | cosine mean |",
                  "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
        for name, s in enc["sets"].items():
            for vname, v in s["variants"].items():
                lines.append(f"| {name} | {s['texts']} | {_fmt(s['bare_fp32_texts_per_s'], 0)} | {vname} | {_fmt(v['texts_per_s'], 0)} | "
                             f"**{_fmt(v['speedup'])}x** | {_fmt(v['speedup_cpu_time'])}x | {v['cosine_min']:.5f} | {v['cosine_mean']:.6f} |")
        lines.append("")
    sweeps = r.get("sweeps") or {}
    for i, s in enumerate(sweeps.get("index", [])):
        lines += [f"## Sweep: {s['stage']} index types and search parameters", "",
                  f"{s['vectors']} vectors x {s['dim']}, {s['queries']} queries, {s['quality']}; builds (s): "
                  + ", ".join(f"{k} {_fmt(v, 1)}" for k, v in s["build_s"].items()) + (f". {s['note']}" if s.get("note") else ""), "",
                  "Pareto front:", "", "| family | param | value | recall | ms/query | queries/s |", "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {p['family']} | {p['param'] or ''} | {_fmt(p['value'])} | {p['recall_at_k']:.4f} | "
                  f"{_fmt(p['ms_per_query'], 4)} | {_fmt(p['queries_per_s'], 0)} |" for p in s["pareto"]]
        lines += ["", "Fastest point of each family with recall >= 0.95:", "",
                  "| family | param | value | recall | queries/s |", "|---|---|---:|---:|---:|"]
        lines += [f"| {fam} | {p['param'] or ''} | {_fmt(p['value'])} | {p['recall_at_k']:.4f} | {_fmt(p['queries_per_s'], 0)} |"
                  if p else f"| {fam} | none reached 0.95 | | | |" for fam, p in s.get("best_at_recall_0.95", {}).items()]
        lines += ["", f"![index sweep](sweep_index_{i + 1}.png)", ""]
    pipe = sweeps.get("pipeline")
    if pipe and pipe["points"]:
        q = pipe["quality"]
        lines += ["## Sweep: whole pipeline", "", f"First {pipe.get('queries')} queries; passes timed in interleaved rounds.", "",
                  "| param | value | k | ms/query | queries/s | NDCG@10 | "
                  + (q.replace("_at_", "@") if q else "") + " | Pareto |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        front = {(p["param"], p["value"]) for p in pipe["pareto"]}
        lines += [f"| {p['param']} | {p['value']} | {p['k']} | {_fmt(p['ms_per_query'], 3)} | {_fmt(p['queries_per_s'], 0)} | "
                  f"{_fmt(p.get('ndcg_at_10'), 4)} | {_fmt(p.get(q), 4) if q else ''} | {'yes' if (p['param'], p['value']) in front else ''} |"
                  for p in pipe["points"]]
        lines += ["", "![pipeline sweep](sweep_pipeline.png)", ""]
    if sweeps.get("batch_size"):
        lines += ["## Sweep: batch size", "", "| batch size | queries | queries/s | p50 ms/batch | p99 ms/batch | p50 ms/query |",
                  "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {p['batch_size']} | {p['queries']} | {_fmt(p['queries_per_s'], 1)} | {_fmt(p['p50_ms'])} | "
                  f"{_fmt(p['p99_ms'])} | {_fmt(p['p50_ms_per_query'], 3)} |" for p in sweeps["batch_size"]]
        lines += ["", "![batch size](sweep_batch_size.png)", ""]
    a = r.get("ann")
    if a:
        lines += [f"## ANN on synthetic vectors ({a['vectors']} x {a['dim']})", "", f"{a['generator']}; {a['queries']} queries, "
                  f"{a['quality']}. Builds (s): " + ", ".join(f"{k} {_fmt(v, 1)}" for k, v in a["build_s"].items())
                  + (f". {a['note']}" if a.get("note") else ""), "",
                  "Fastest point with recall@10 >= 0.95:", "", "| | family | param | recall | queries/s |", "|---|---|---|---:|---:|"]
        for name, p in a["best_at_recall_0.95"].items():
            lines.append(f"| {name} | {p['family']} | {p['param']}={p['value']} | {p['recall_at_k']:.4f} | {_fmt(p['queries_per_s'], 0)} |"
                         if p else f"| {name} | none reached 0.95 | | | |")
        lines += ["", f"Funnel / hnswlib queries/s at recall >= 0.95: **{_fmt(a['funnel_over_hnswlib_qps_at_0.95'], 2)}**", "",
                  "![ann](ann_synthetic.png)", ""]
    return "\n".join(lines)


# -- the run ------------------------------------------------------------------------------------


def run_bench(config: str | Path, options: BenchOptions, *, echo: Callable[[str], None] = print) -> dict:
    """Benchmark the pipeline of ``config``; write ``report.json``, ``report.md`` and plots to
    ``options.out``; return the report."""
    from .config import load_config
    from .data import open_dataset, read_parquet
    from .schema import check_columns

    load_start = os.getloadavg()
    if options.threads:
        import faiss
        import torch

        torch.set_num_threads(options.threads)
        faiss.omp_set_num_threads(options.threads)
    if options.repeats < 1 or options.warmup < 0:
        raise ConfigError(f"bench needs repeats >= 1 and warmup >= 0; got {options.repeats} and {options.warmup}")
    cfg = load_config(config)
    pipe = _with_overrides(cfg.build(), options.overrides).with_device(options.device)
    if options.top is not None:
        pipe = pipe.with_top(options.top)
    top = next((getattr(s, s.top_param) for s in reversed(pipe.stages) if s.top_param), 10)
    batch_size = options.batch_size or cfg.batch_size or 256
    queries = open_dataset(options.queries).to_table()
    check_columns(pipe.inputs, queries.schema, stage=pipe.stages[0].name, where=f"queries file {options.queries}")
    if options.max_queries:
        queries = queries.slice(0, options.max_queries)
    if queries.num_rows == 0:
        raise DataError(f"queries file {options.queries} has no rows")
    judgments = None
    if options.judgments is not None:
        judgments = read_parquet(options.judgments, what="judgments")
        wanted = pl.from_arrow(queries.select([QUERY_ID])).get_column(QUERY_ID).cast(pl.String)
        judgments = pl.from_arrow(judgments).filter(pl.col(QUERY_ID).cast(pl.String).is_in(wanted.implode())).to_arrow()
    batches = _batches(queries, batch_size)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)

    echo(f"[1/5] warming up {len(pipe)} stages of {config}")
    warm = []
    for stage in pipe.stages:
        t0 = time.perf_counter()
        stage.warm_up()
        warm.append(time.perf_counter() - t0)

    bare, bare_note = None, None
    if options.bare is not False:
        module = _load_bare()
        if module is None:
            bare_note = f"{BARE_SCRIPT} not found (the bare baseline needs a source checkout)"
        else:
            try:
                bare = module.BarePipeline(config, top=options.top, device=options.device, overrides=options.overrides)
            except module.Unsupported as exc:
                bare_note = f"the bare pipeline does not cover this config: {exc}"
        if bare_note and options.bare:
            raise ConfigError(f"--bare: {bare_note}")

    echo(f"[2/5] quality pass over {queries.num_rows} queries ({len(batches)} batches of {batch_size})")
    tables, vectors, bare_out = _candidate_tables(pipe, batches, bare, options.progress)
    for _ in range(max(0, options.warmup - 1)):
        for b in batches:
            pipe.run(b)
            if bare is not None:
                bare.run(pl.from_arrow(b))

    echo(f"[3/5] timing: {options.repeats} passes" + (", interleaved with the bare pipeline" if bare else ""))
    timings = _timed_passes(pipe, batches, repeats=options.repeats, bare=bare, progress=options.progress)
    stats = timings.stats
    single = _single_query(pipe, queries, bare, n=min(64, queries.num_rows))
    peak = _peak_rss_mb()

    last = len(pipe) - 1
    per_stage_q, final_q = _quality(tables, judgments, last, top)
    n_queries = [b.num_rows for b in batches] * options.repeats
    total = sum(s.total_seconds for s in stats) or 1.0
    stage_rows = []
    for i, (stage, s) in enumerate(zip(pipe.stages, stats)):
        row = {"step": i + 1, "name": stage.name, "device": getattr(stage, "device_", None) or "cpu",
               "rows_in": s.rows_in // options.repeats, "rows_out": s.rows_out // options.repeats,
               "batches": len(batches), **latency_summary(s.seconds, n_queries),
               "throughput_rows_per_s": s.rows_in / s.total_seconds if s.total_seconds else None,
               "share_of_time": s.total_seconds / total, "warm_up_s": warm[i], "k": None, "recall_at_k": None}
        row.update(per_stage_q.get(i, {}))
        if stage.name == "recall.faiss" and i in vectors:
            ann = ann_recall(stage, vectors[i])
            row.update({"ann_k": ann["k"], "ann_recall_at_k": ann["ann_recall_at_k"], "ann_reference": ann["exact_reference"]})
            if ann["k"] > 10:
                row["ann_recall_at_10"] = ann_recall(stage, vectors[i], 10)["ann_recall_at_k"]
        bare_steps = [steps[i] for steps in timings.bare_steps if len(steps) == len(pipe)]
        if bare_steps:
            row.update({"bare_p50_ms": latency_summary(bare_steps)["p50_ms"],
                        "overhead_ratio": s.total_seconds / max(sum(bare_steps), 1e-12)})
        stage_rows.append(row)
    pass_s = _median(timings.passes)
    end_to_end = {"queries": queries.num_rows, "batch_size": batch_size, "batches": len(batches), "top": top,
                  "seconds_per_pass": pass_s, "cpu_seconds_per_pass": _median(timings.cpu_passes),
                  "queries_per_s": queries.num_rows / pass_s, **latency_summary(timings.batches, n_queries),
                  "single_query": single, "peak_rss_mb": peak, "quality": final_q}
    overhead = None
    if bare is not None:
        paired = [f / b for f, b in zip(timings.batches, timings.bare_batches) if b > 0]
        after_encoder = [r for r in stage_rows[1:] if "overhead_ratio" in r] if pipe.stages[0].name.startswith("encode.") else []
        funnel_rest = sum(stats[r["step"] - 1].total_seconds for r in after_encoder)
        bare_rest = sum(sum(steps[1:]) for steps in timings.bare_steps if len(steps) == len(pipe))
        overhead = {"bare_script": "benchmarks/bare_pipeline.py", "funnel_s_per_pass": pass_s,
                    "bare_s_per_pass": _median(timings.bare_passes),
                    "overhead_ratio": sum(timings.passes) / sum(timings.bare_passes),
                    "paired_median_ratio": _median(paired),
                    "cpu_overhead_ratio": sum(timings.cpu_passes) / max(sum(timings.bare_cpu_passes), 1e-9),
                    "bare_queries_per_s": queries.num_rows / _median(timings.bare_passes),
                    "overhead_ratio_after_encoder": funnel_rest / bare_rest if after_encoder and bare_rest else None,
                    "agreement": _agreement(tables[last], bare_out) if last in tables else None}
    elif bare_note:
        overhead = {"skipped": bare_note}

    encoder = next((s for s in pipe.stages if s.name == "encode.sentence_transformers"), None)
    enc_report = None
    if encoder is not None and options.encoder_texts > 0:
        echo("[4/5] encoder against bare sentence-transformers fp32")
        texts = _texts_for_encoder(cfg, pipe, queries, encoder, options.encoder_texts, options.seed)
        enc_report = _encoder_bench(encoder, texts, options.repeats, options.sweep, options.progress)

    sweeps = None
    if options.sweep:
        echo("[5/5] sweeps: index types and search parameters, candidates k, batch size")
        sweeps = {"index": [], "pipeline": None, "batch_size": None}
        for i, stage in enumerate(pipe.stages):
            if stage.name == "recall.faiss" and i in vectors:
                sweeps["index"].append(_sweep_index(stage, vectors[i], repeats=max(1, min(options.repeats, 3)),
                                                    progress=options.progress, log=echo))
        sweep_repeats = max(1, min(options.repeats, 2))
        few = queries.slice(0, min(queries.num_rows, SWEEP_QUERIES))
        sweeps["pipeline"] = _sweep_pipeline(pipe, _batches(few, batch_size), judgments, top, sweep_repeats,
                                             options.progress)
        sweeps["batch_size"] = _sweep_batch_size(pipe, few, sweep_repeats, options.progress)
    ann = None
    if options.ann_size:
        echo(f"[5/5] ANN on {options.ann_size} synthetic vectors")
        ann = _ann_synthetic(options.ann_size, options.ann_dim, repeats=max(1, min(options.repeats, 3)),
                             seed=options.seed, log=echo)

    report = {
        "config": str(config), "config_name": cfg.name, "queries": str(options.queries),
        "judgments": str(options.judgments) if options.judgments else None, "repeats": options.repeats,
        "warmup": options.warmup, "device": options.device, "overrides": options.overrides, "fingerprint": fingerprint(),
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "end_to_end": end_to_end, "stages": stage_rows, "overhead": overhead, "encoder": enc_report,
        "sweeps": sweeps, "ann": ann, "peak_rss_mb_total": _peak_rss_mb(),
    }
    report = _jsonable(report)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    report["plots"] = _plots(report, out)
    (out / "report.md").write_text(_markdown(report) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
