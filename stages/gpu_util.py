"""What the built-in stages share on their CUDA paths.

Every stage with a ``device`` parameter keeps its CPU and CUDA code in one class
(:mod:`pipeline.stage`); this module holds the pieces those CUDA paths have in common:

* :func:`log_fallback` — a CUDA path that meets something the GPU library cannot do (a ``k``
  above faiss-gpu's limit, a rule cudf-polars does not implement, a model hummingbird-ml cannot
  reproduce exactly) runs that piece of work on the CPU instead and says so once, through
  Python's :mod:`logging` (WARNING, one message per stage and reason), never silently and never
  by failing a batch that the CPU can answer.
* :func:`index_on_device` — a loaded FAISS index placed where the stage searches: cloned to the
  GPU by faiss-gpu where that is installed, else searched with torch on the GPU
  (:class:`indexes.torch_search.TorchSearch`), so ``device="cuda"`` never fails for lack of a
  faiss GPU wheel; :func:`search_plan` is the decision, apart so it can be tested anywhere.
* :func:`gpu_pays_off` — on ``device="auto"`` a batch goes to the GPU only from a crossover
  size (:data:`RANKER_GPU_MIN_ROWS`, :data:`FILTER_GPU_MIN_ROWS`); below it, copying to the GPU
  and launching kernels costs more than the CPU needs for the whole batch.
* :func:`collect` — a Polars lazy query collected on Polars' GPU engine (``cudf-polars``), the
  same plan as on the CPU engine, with the CPU engine as fall-back.
* :class:`TorchTreeModel` — a LightGBM model compiled to tensor operations by hummingbird-ml
  (`convert(booster, "torch")`), so the same trees score on a CUDA device. It is built from the
  booster that LightGBM loaded from its text model; nothing is unpickled. Thresholds and leaf
  values are kept in float64 and LightGBM's input conventions are reproduced (values within
  ``1e-35`` of zero read as zero, NaN as zero where the model has no NaN-aware split), so its
  scores equal LightGBM's own to rounding; :func:`tree_model_unsupported` names the models for
  which that is not true.

Nothing here imports a GPU library or touches CUDA at import time.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pipeline.errors import DeviceError

__all__ = ["log_fallback", "index_on_device", "search_plan", "gpu_pays_off", "RANKER_GPU_MIN_ROWS",
           "FILTER_GPU_MIN_ROWS", "SEARCH_BACKENDS", "SEARCH_STORAGES", "collect", "TorchTreeModel",
           "tree_model_unsupported", "LIGHTGBM_ZERO"]

log = logging.getLogger(__name__)

#: values of a recall stage's ``search_backend`` parameter
SEARCH_BACKENDS = ("auto", "faiss", "torch")
#: values of a recall stage's ``search_storage`` parameter (vectors' type for torch search)
SEARCH_STORAGES = ("auto", "fp32", "fp16", "bf16", "int8")
#: ``search_storage="auto"``: half precision on a GPU (then re-scored in fp32), fp32 on a CPU
AUTO_STORAGE = {"cuda": "fp16", "cpu": "fp32"}
#: ``rank.lightgbm`` on ``device="auto"`` scores a batch with hummingbird-ml on the GPU only from
#: this many rows; smaller batches go to LightGBM on the CPU. Issue 14 (one H200, torch 2.11,
#: 16 CPU threads): at the demo's batch hummingbird scored 671k rows/s, native LightGBM 928k
#: rows/s, so the GPU lost there; the crossover itself was not measured. 262,144 is the batch at
#: which the issue asks the GPU path to be 5x native — a placeholder until
#: ``benchmarks/gpu_crossover.py`` measures it on the target GPU (docs/gpu.md).
RANKER_GPU_MIN_ROWS = 262_144
#: ``filter.rules`` on ``device="auto"`` collects on Polars' GPU engine only from this many rows.
#: Not measured (cudf-polars was not installed on the issue-14 machine); Polars' CPU engine
#: filters millions of rows in milliseconds, so the copy to the GPU pays off only for large
#: batches. Re-measure with ``benchmarks/gpu_crossover.py``.
FILTER_GPU_MIN_ROWS = 1_000_000
#: LightGBM's kZeroThreshold (the float 1e-35f, as a double): at prediction it reads any |x| <= this as 0
LIGHTGBM_ZERO = float(np.float32(1e-35))
#: objectives whose predictions are the raw sum of the trees (no sigmoid, exp or softmax)
RAW_OBJECTIVES = ("lambdarank", "rank_xendcg", "regression", "regression_l2", "l2", "regression_l1", "l1",
                  "huber", "fair", "quantile", "mape")


def log_fallback(owner: Any, reason: str, *, logger: logging.Logger = log) -> None:
    """Log ``reason`` (work that runs on the CPU instead of the GPU) once per ``owner`` and reason."""
    seen = owner.__dict__.setdefault("_gpu_fallbacks", set())
    if reason not in seen:
        seen.add(reason)
        logger.warning(reason)


def search_plan(device: str, backend: str, faiss_gpu: bool) -> str:
    """What searches a recall stage's index: ``"faiss"`` (the CPU index as loaded),
    ``"faiss-gpu"`` (a faiss-gpu clone) or ``"torch"`` (:meth:`indexes.FaissIndex.to_torch`).

    ``device`` is the stage's resolved device, ``backend`` its ``search_backend`` parameter:
    ``"torch"`` always searches with torch (on the CPU too: the CI parity test of the GPU path),
    ``"faiss"`` always with faiss, and ``"auto"`` with faiss on a CPU, faiss-gpu on CUDA where
    the installed faiss has GPU support, else torch on CUDA.
    """
    if backend == "torch":
        return "torch"
    if device != "cuda":
        return "faiss"
    return "faiss-gpu" if backend == "faiss" or faiss_gpu else "torch"


def index_on_device(stage: Any, index: Any) -> Any:
    """``index`` (an :class:`indexes.FaissIndex`) placed as :func:`search_plan` says for ``stage``.

    ``stage`` has ``device`` (requested), ``device_`` (resolved), ``search_backend`` and
    ``search_storage``. On ``"auto"`` the GPU must give the CPU's hits (up to rounding and
    ties: the conformance kit's ``cpu_gpu_parity``), so an index whose CPU search goes through
    an HNSW graph, which torch cannot reproduce (it searches exactly), stays on the CPU unless
    ``search_backend="torch"`` asks for exact search. Fall-backs, each logged once: a faiss-gpu
    clone that fails (an index type faiss-gpu lacks, GPU memory) is replaced by torch on the
    GPU when the backend is ``"auto"`` and torch gives the same hits, else by the CPU index —
    except that ``search_backend="faiss"`` with ``device="cuda"`` on a faiss without GPU
    support fails with the install hint. Torch search that cannot hold the index (it gives no
    vectors back, GPU memory) falls back to the CPU index unless ``search_backend="torch"``
    asked for it, which fails.
    """
    from indexes.faiss_index import faiss_has_gpu

    backend = getattr(stage, "search_backend", "auto")
    plan = search_plan(stage.device_, backend, faiss_has_gpu())
    if plan == "faiss":
        return index
    if plan == "faiss-gpu":
        try:
            placed = index.to_gpu()
            log.info("stage '%s': %d vectors searched by faiss-gpu (%s)", stage.name, index.ntotal, index.factory)
            return placed
        except DeviceError as exc:
            if backend == "faiss" and stage.device != "auto" and not faiss_has_gpu():
                raise
            if backend == "faiss" or not index.torch_gives_same_hits:
                log_fallback(stage, f"stage '{stage.name}': {exc}; searching on the CPU")
                stage.device_ = "cpu"
                return index
            log_fallback(stage, f"stage '{stage.name}': {exc}; searching with torch on the GPU instead")
    elif backend == "auto" and not index.torch_gives_same_hits:
        log_fallback(stage, f"stage '{stage.name}': faiss has no GPU support, and torch would search the "
                            f"{index.factory!r} index exactly, not through its graph as on the CPU; searching on "
                            "the CPU (search_backend='torch' searches exactly on the GPU)")
        stage.device_ = "cpu"
        return index
    storage = getattr(stage, "search_storage", "auto")
    storage = AUTO_STORAGE[stage.device_] if storage == "auto" else storage
    try:
        placed = index.to_torch(stage.device_, storage=storage)
    except DeviceError as exc:
        if backend == "torch":
            raise DeviceError(f"stage '{stage.name}': {exc}") from exc
        log_fallback(stage, f"stage '{stage.name}': {exc}; searching with faiss on the CPU")
        stage.device_ = "cpu"
        return index
    log.info("stage '%s': %d vectors searched with torch on %s (%s storage%s)", stage.name, index.ntotal,
             stage.device_, storage, "" if storage == "fp32" else ", candidates re-scored in fp32")
    return placed


def gpu_pays_off(requested: str, rows: int, min_rows: int) -> bool:
    """Whether a batch of ``rows`` runs on the GPU path of a stage resolved to CUDA.

    ``requested`` is the stage's ``device`` parameter: an explicit ``"cuda"`` always uses the
    GPU (the user asked for it; parity tests rely on it); ``"auto"`` only from ``min_rows`` rows,
    the measured (or placeholder) crossover of that stage.
    """
    return requested != "auto" or rows >= min_rows


def _last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def collect(lazy, *, device: str, owner: Any, what: str):
    """``lazy.collect()`` on Polars' GPU engine when ``device == "cuda"``, else on the CPU engine.

    The GPU engine (``pl.GPUEngine``, provided by the ``cudf-polars`` package) executes the same
    optimised plan, so results are identical. When it cannot — cudf-polars is not installed, or
    it does not implement an expression of the plan — the CPU engine collects instead and the
    reason is logged once (``raise_on_fail=True`` makes Polars report instead of silently
    switching). A genuine error of the query itself is raised again by the CPU engine.
    """
    import polars as pl

    if device != "cuda":
        return lazy.collect()
    try:
        return lazy.collect(engine=pl.GPUEngine(raise_on_fail=True))
    except Exception as exc:  # cudf-polars raises many types for what it does not implement
        log_fallback(owner, f"{what}: Polars' GPU engine cannot run this query ({_last_line(exc)}); "
                            "the CPU engine runs it instead")
        return lazy.collect()


def _nodes(node: dict):
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        if "split_feature" in n:
            stack.extend((n["left_child"], n["right_child"]))


def _split_nodes(node: dict):
    return (n for n in _nodes(node) if "split_feature" in n)


def tree_model_unsupported(booster) -> str | None:
    """Why hummingbird-ml's torch version of ``booster`` would not score exactly like LightGBM,
    or ``None`` when it does.

    Supported: one output per row (regression and ranking objectives, whose scores are the raw
    sum of the trees), numerical ``<=`` splits, missing values handled as ``None`` or ``NaN``
    (the latter needs a NaN-free batch, checked per batch by :meth:`TorchTreeModel.predict`).
    Not supported: categorical splits, zero-as-missing splits, linear trees, random-forest
    averaging, several classes, and objectives that transform the raw score.
    """
    return _unsupported(booster.dump_model())


def _unsupported(dump: dict) -> str | None:
    objective = str(dump.get("objective", "")).split(" ")[0]
    if dump.get("num_class", 1) != 1 or dump.get("num_tree_per_iteration", 1) != 1:
        return f"the model has {dump.get('num_class')} classes"
    if objective not in RAW_OBJECTIVES:
        return f"objective {objective!r} transforms the raw score (supported: {', '.join(RAW_OBJECTIVES)})"
    if dump.get("average_output"):
        return "the model averages its trees (random forest)"
    for tree in dump["tree_info"]:
        for node in _nodes(tree["tree_structure"]):
            if "leaf_coeff" in node:
                return "the model has linear trees"
            if node.get("decision_type", "<=") != "<=":
                return f"the model has {node['decision_type']!r} (categorical) splits"
            if node.get("missing_type") == "Zero":
                return "the model treats zero as missing"
    return None


class TorchTreeModel:
    """A LightGBM model compiled by hummingbird-ml into tensor operations, on CPU or CUDA.

    ``TorchTreeModel(booster, "cuda").predict(X)`` gives the scores of ``booster.predict(X)``
    (to float64 rounding, about 1e-12), computed by batched tree traversal on the device. The
    conversion reads the trees from ``booster.dump_model()`` — the booster LightGBM parsed from
    its text model — and keeps them in memory; no file is written or unpickled.

    Raises :class:`DeviceError` when hummingbird-ml is not installed (``pip install
    funnel-rank[gpu]``) or :func:`tree_model_unsupported` names a reason.
    """

    def __init__(self, booster, device: str = "cpu"):
        dump = booster.dump_model()
        reason = _unsupported(dump)
        if reason is not None:
            raise DeviceError(f"hummingbird-ml cannot score this LightGBM model exactly: {reason}")
        try:
            from hummingbird.ml import convert
        except ImportError as exc:
            raise DeviceError("scoring LightGBM on a GPU needs hummingbird-ml: pip install 'funnel-rank[gpu]'") from exc
        self.device = device
        self.n_features = booster.num_feature()
        self.nan_to_zero = all(node.get("missing_type") != "NaN" for tree in dump["tree_info"]
                               for node in _split_nodes(tree["tree_structure"]))
        exact = {"tree_op_precision_dtype": "float64", "tree_implementation": "perf_tree_trav"}
        self.model = convert(booster, "torch", device=device, extra_config=exact)

    def predict(self, X: np.ndarray) -> np.ndarray | None:
        """Scores of the rows of ``X`` (float64), or ``None`` when ``X`` holds NaN that the model
        routes by its learned default direction (score such a batch with LightGBM itself)."""
        Z = np.array(X, dtype=np.float64)
        if Z.shape[0] == 0:
            return np.zeros(0, np.float64)
        nan = np.isnan(Z)
        if nan.any():
            if not self.nan_to_zero:
                return None
            Z[nan] = 0.0
        Z[np.abs(Z) <= LIGHTGBM_ZERO] = 0.0
        return np.asarray(self.model.predict(Z), dtype=np.float64).reshape(-1)
