"""Learned-to-rank stage on LightGBM (lambdarank), with its trainer."""

from __future__ import annotations

import hashlib
import shutil
from itertools import chain
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.artifacts import build_key, read_manifest, read_verified_manifest, sha256_file, write_json_atomic
from pipeline.build import BuildContext, check_fits, find_upstream, upstream_key
from pipeline.columns import ITEM_ID, QUERY, QUERY_ID, RANK, RECALL_RANK, RECALL_SCORE, RELEVANCE, SCORE
from pipeline.data import holdout_mask, read_judgments
from pipeline.errors import ArtifactError, DataError, DeviceError
from pipeline.schema import ANY, keep_input_types
from pipeline.stage import Pipeline, Stage, StageTags

from .features import FEATURE_PREFIX
from .gpu_util import RANKER_GPU_MIN_ROWS, TorchTreeModel, gpu_pays_off, log_fallback, tree_model_unsupported

__all__ = ["LightGBMRanker", "rerank", "EXPLANATION", "EXPLANATION_TYPE", "REST"]

#: Column of per-item score explanations (``explain > 0``).
EXPLANATION = "explanation"
EXPLANATION_TYPE = pa.list_(pa.struct([pa.field("feature", pa.string()), pa.field("contribution", pa.float32())]))
#: Name of the last explanation entry: the other features' contributions plus the model's bias.
REST = "(other features + bias)"

MODEL_FILE = "model.txt"
#: LightGBM training devices: its CPU learner, its OpenCL learner ("gpu"), its CUDA learner
TRAIN_DEVICES = ("cpu", "gpu", "cuda")
HOLDOUT_QUERIES = "holdout_queries.parquet"
HOLDOUT_JUDGMENTS = "holdout_judgments.parquet"
#: Folder (under the model folder, removed after training) of the training rows' Parquet shards
TRAINING_SHARDS = ".training"
#: Training queries run through the upstream pipeline at once; rows per training shard
TRAIN_BATCH, SHARD_ROWS = 256, 500_000
LABEL = "__label"
#: Bytes a training row holds per feature (the float32 matrix LightGBM bins, its binned copy) and
#: per row (label, gradients, hessians, scores), for the estimate checked before training starts
BYTES_PER_VALUE, BYTES_PER_ROW = 8, 32


def _query_runs(ids: pa.ChunkedArray | pa.Array) -> np.ndarray | None:
    """Start offsets of each query's rows (plus the end) when every query's rows are one contiguous
    run, as the stages before a ranker emit them; ``None`` when some query's rows are split."""
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    if pa.types.is_dictionary(ids.type):
        ids = ids.dictionary_decode()
    n = len(ids)
    if n == 0:
        return np.zeros(1, np.int64)
    if ids.null_count:
        return None
    change = pc.not_equal(ids[1:], ids[:-1]).to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.flatnonzero(change) + 1, [n]]).astype(np.int64)
    # contiguous iff the number of runs equals the number of distinct ids
    return starts if len(starts) - 1 == pc.count_distinct(ids).as_py() else None


def _order(table: pa.Table, scores: np.ndarray, query_column: str) -> tuple[np.ndarray, np.ndarray]:
    """Row order (queries in first-appearance order, each best first, ties in input order) and the
    1-based rank of each row in that order."""
    starts = _query_runs(table.column(query_column))
    if starts is not None and not np.isnan(scores).any():  # the usual case: one NumPy sort
        run = np.repeat(np.arange(len(starts) - 1, dtype=np.uint64), np.diff(starts))
        # one stable sort on 64-bit keys (the run above, the score's bits flipped to sort
        # descending below) is 3x faster than np.lexsort on (score, run)
        bits = (scores + np.float32(0)).view(np.uint32)  # + 0 makes -0.0 equal 0.0
        ascending = np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))
        order = np.argsort((run << np.uint64(32)) | (~ascending).astype(np.uint64), kind="stable")
        rank = np.arange(len(order), dtype=np.int64) - np.repeat(starts[:-1], np.diff(starts)) + 1
        return order, rank
    keys = (pl.from_arrow(table.select([query_column])).with_columns(pl.Series(SCORE, scores)).with_row_index("__row")
            .with_columns(pl.col("__row").min().over(query_column).alias("__qpos"),
                          pl.col(SCORE).rank("ordinal", descending=True).over(query_column).cast(pl.Int32).alias(RANK))
            .sort(["__qpos", RANK]))
    return keys["__row"].to_numpy().astype(np.int64), keys[RANK].to_numpy()


def rerank(table: pa.Table, scores: np.ndarray, *, query_column: str = QUERY_ID) -> pa.Table:
    """Replace ``score``/``rank`` by new scores, keeping the old ones as ``recall_*``.

    Rows are returned grouped by query in first-appearance order, best first.
    """
    scores = np.asarray(scores, np.float32)
    # the order is worked out on the query ids alone; the other columns (a history list, say)
    # are taken once in Arrow, not converted to Polars and back
    order, rank = _order(table, scores, query_column)
    keep = {SCORE: RECALL_SCORE, RANK: RECALL_RANK}
    out = table.drop_columns([c for c in keep.values() if c in table.column_names])
    out = out.rename_columns([keep.get(c, c) for c in out.column_names]).take(pa.array(order))
    return (out.append_column(pa.field(SCORE, pa.float32()), pa.array(scores[order], pa.float32()))
            .append_column(pa.field(RANK, pa.int32()), pa.array(rank.astype(np.int32), pa.int32())))


class LightGBMRanker(Stage):
    """Score candidates with a LightGBM lambdarank model and re-rank each query's list.

    The model folder holds LightGBM's text model (``model.txt``; never pickle) and a manifest
    with the feature columns it was trained on, in order. When the model exists, those feature
    columns are part of this stage's declared input, so a pipeline whose feature stage does not
    produce them fails when it is composed. ``funnel build`` / ``funnel train ranker`` train it:
    the upstream pipeline runs on the judged queries, candidates are labelled from the
    judgments (unjudged = 0), a ``holdout_fraction`` of queries (split by query id hash) is kept
    out of training entirely and written next to the model for evaluation, and a further
    ``valid_fraction`` drives early stopping on NDCG@10. ``truncation_level`` is LightGBM's
    ``lambdarank_truncation_level`` (default 30): pairs are only formed with the items the
    current model ranks above it, so to order a deep list (Recall@100 from 200 candidates) raise
    it to about the depth that matters. ``feature_fraction`` and ``bagging_fraction`` (LightGBM's,
    default 1: off) train each tree on a random share of the features / of the rows, which
    regularises a ranker over many correlated features.

    **Scale.** Training runs the upstream pipeline over the training queries 256 at a time and
    writes each batch's rows — query id, label and the float32 features, nothing else — as
    Parquet shards in a temporary folder; LightGBM's dataset is then filled from the shards one
    at a time into a single float32 matrix that it frees once binned, so memory follows the
    training rows, not the candidates' other columns (histories, provenance). ``max_train_queries``
    (default 100,000) trains on that many queries, chosen by a seeded hash of their ids, when
    there are more; before anything runs the build estimates the rows it may hold (queries x the
    widest recall ``k`` x features) and stops with an error naming ``max_train_queries`` when
    they would not fit the memory available (``$FUNNEL_MEMORY_LIMIT`` overrides the figure).
    ``funnel build --engine ray`` generates the training candidates on Ray Data actors (the
    ``funnel run --engine ray`` path); the model is the same.

    **Sampled negatives.** ``max_negatives = n`` keeps, of each training query's candidates,
    every positive and at most ``n`` negatives drawn uniformly (seeded, per batch); the
    validation queries that drive early stopping keep their whole lists. A lambdarank model
    learns from pairs of a positive and a negative, so with deep candidate lists (hundreds per
    query, one target) most rows add little: on the Beauty example ``n = 100`` of 400 trained a
    ranker as good as all rows (leave-one-out Recall@10 0.1402 against 0.1392) in half the time.
    With graded judgments it can cost quality: on the Home Depot example (about 330 candidates,
    several relevant items of different grades per query) ``n = 100`` lost 0.006 NDCG@10, so
    measure before keeping it.
    The memory estimate counts ``n + 1`` rows per training query.

    **Gains of graded labels.** Relevance becomes an integer label,
    ``round((relevance - relevance_offset) * label_scale)`` (0..6 for Home Depot's 1..3 in
    thirds). LightGBM's lambdarank weighs label ``l`` by the gain ``2**l - 1`` (0, 1, 3, 7, 15,
    31, 63), far steeper than an evaluation whose gain is ``relevance - 1`` (0 .. 2, linear).
    ``label_gain`` sets the gain of each label (``label_gain[l]``, non-negative, non-decreasing,
    one entry per label at least). On Home Depot ``2**(l/3) - 1`` (0, 0.26, 0.59, 1, 1.52, 2.17,
    3) gave NDCG@10 0.4408 against 0.4388 on average over three seeds (+0.002, about the spread
    between seeds). It changes what early stopping's validation NDCG@10 means too.

    **More targets per user** (next-item training from logs): ``targets_per_user = n`` trains on
    each user's last ``n`` items as targets, each with artifacts that never saw it (see
    :meth:`build`); with one target per user a small shop leaves the ranker few positives.

    The previous ``score``/``rank`` are kept as ``recall_score``/``recall_rank``.

    With ``explain = N > 0`` (``funnel run --explain``) each row also gets ``explanation``: the
    ``N`` features that moved its score most (LightGBM's exact TreeSHAP contributions,
    ``pred_contrib=True``), largest magnitude first, then one entry
    ``"(other features + bias)"`` holding the rest, so the contributions of a row sum to its
    ``score``. TreeSHAP costs about as much as scoring times the tree depth, on every candidate,
    not only on those later shown; leave it off for bulk runs.

    **Devices.** On ``device="cuda"`` (or ``"auto"`` on a machine with CUDA) ``warm_up()``
    compiles the loaded model into tensor operations with hummingbird-ml
    (:class:`stages.gpu_util.TorchTreeModel`, ``pip install 'funnel-rank[gpu]'``) and scores on
    the GPU, in float64, equal to LightGBM's own scores to rounding. A model hummingbird-ml
    cannot reproduce exactly (categorical splits, ...) and a batch with NaN features that the
    model routes by a learned default are scored by LightGBM on the CPU, with a logged warning;
    ``explain`` always runs on LightGBM. On ``device="auto"`` only batches of at least
    :data:`stages.gpu_util.RANKER_GPU_MIN_ROWS` rows go to the GPU: below that native LightGBM
    on the CPU is faster (issue 14's measurement; re-measure per GPU). ``train_device`` is separate: the device LightGBM
    *trains* on in ``funnel build`` — ``"gpu"`` is its OpenCL learner (in the pip wheel; needs
    an OpenCL driver: NVIDIA's, or pocl on a CPU), ``"cuda"`` its CUDA learner (needs LightGBM
    built from source with CUDA). A GPU-trained model is close to, not identical with, a
    CPU-trained one (single-precision histograms).
    """

    name = "rank.lightgbm"
    input_schema = pa.schema([pa.field(QUERY_ID, ANY), pa.field(SCORE, pa.float32()), pa.field(RANK, pa.int32())])
    output_schema = pa.schema([pa.field(SCORE, pa.float32()), pa.field(RANK, pa.int32()),
                               pa.field(RECALL_SCORE, pa.float32()), pa.field(RECALL_RANK, pa.int32())])
    tags = StageTags(devices=("cpu", "cuda"), requires_build=True, level="candidate")
    path_params = ("model",)

    def __init__(self, model: str = "artifacts/ranker", num_threads: int = 0, n_estimators: int = 500,
                 learning_rate: float = 0.05, num_leaves: int = 31, min_data_in_leaf: int = 20,
                 early_stopping_rounds: int = 50, holdout_fraction: float = 0.2, valid_fraction: float = 0.2,
                 label_scale: float = 3.0, relevance_offset: float = 1.0, seed: int = 0, device: str = "auto",
                 explain: int = 0, train_device: str = "cpu", truncation_level: int = 30,
                 feature_fraction: float = 1.0, bagging_fraction: float = 1.0,
                 max_train_queries: int | None = 100_000, targets_per_user: int = 1,
                 max_negatives: int | None = None, label_gain: list[float] | None = None):
        self.model = model
        self.num_threads = num_threads
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_data_in_leaf = min_data_in_leaf
        self.early_stopping_rounds = early_stopping_rounds
        self.holdout_fraction = holdout_fraction
        self.valid_fraction = valid_fraction
        self.label_scale = label_scale
        self.relevance_offset = relevance_offset
        self.seed = seed
        self.device = device
        self.explain = explain
        self.train_device = train_device
        self.truncation_level = truncation_level
        self.feature_fraction = feature_fraction
        self.bagging_fraction = bagging_fraction
        self.max_train_queries = max_train_queries
        self.targets_per_user = targets_per_user
        self.max_negatives = max_negatives
        self.label_gain = label_gain

    # -- schema ------------------------------------------------------------------------------

    def _trained_features(self) -> list[str] | None:
        folder = self.resolve_path(self.model)
        if not (folder / "manifest.json").exists():
            return None
        return list(read_manifest(folder, what=f"stage '{self.name}' model")["features"])

    def required_columns(self) -> pa.Schema:
        features = self._trained_features() or []
        return pa.schema(list(self.input_schema) + [pa.field(f, pa.float32()) for f in features])

    def produced_columns(self) -> pa.Schema:
        extra = [pa.field(EXPLANATION, EXPLANATION_TYPE)] if self.explain else []
        return pa.schema(list(self.output_schema) + extra)

    def validate_params(self) -> None:
        super().validate_params()
        for p in ("n_estimators", "num_leaves", "min_data_in_leaf", "early_stopping_rounds"):
            if not isinstance(getattr(self, p), int) or getattr(self, p) < 1:
                raise self._bad_param(p, "an int >= 1")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise self._bad_param("learning_rate", "a number > 0")
        for p in ("holdout_fraction", "valid_fraction"):
            if not (isinstance(getattr(self, p), (int, float)) and 0 <= getattr(self, p) < 1):
                raise self._bad_param(p, "a number in [0, 1)")
        for p in ("feature_fraction", "bagging_fraction"):
            if not (isinstance(getattr(self, p), (int, float)) and 0 < getattr(self, p) <= 1):
                raise self._bad_param(p, "a number in (0, 1]")
        if not isinstance(self.truncation_level, int) or isinstance(self.truncation_level, bool) \
                or self.truncation_level < 1:
            raise self._bad_param("truncation_level", "an int >= 1")
        if not (isinstance(self.label_scale, (int, float)) and self.label_scale > 0):
            raise self._bad_param("label_scale", "a number > 0")
        if not isinstance(self.explain, int) or isinstance(self.explain, bool) or self.explain < 0:
            raise self._bad_param("explain", "an int >= 0 (features listed per explained row; 0: off)")
        if self.train_device not in TRAIN_DEVICES:
            raise self._bad_param("train_device", f"one of {TRAIN_DEVICES}")
        if self.max_train_queries is not None and (not isinstance(self.max_train_queries, int)
                                                   or isinstance(self.max_train_queries, bool)
                                                   or self.max_train_queries < 1):
            raise self._bad_param("max_train_queries", "None (all) or an int >= 1")
        if not isinstance(self.targets_per_user, int) or isinstance(self.targets_per_user, bool) \
                or self.targets_per_user < 1:
            raise self._bad_param("targets_per_user", "an int >= 1 (training targets per user, from logs)")
        if self.max_negatives is not None and (not isinstance(self.max_negatives, int)
                                               or isinstance(self.max_negatives, bool) or self.max_negatives < 1):
            raise self._bad_param("max_negatives", "None (every candidate) or an int >= 1 (negatives kept per training query)")
        gains = self.label_gain
        if gains is not None and not (isinstance(gains, (list, tuple)) and len(gains) >= 2
                                      and all(isinstance(g, (int, float)) and not isinstance(g, bool) and g >= 0 for g in gains)
                                      and all(a <= b for a, b in zip(gains, gains[1:]))):
            raise self._bad_param("label_gain", "None (LightGBM's 2**label - 1) or a non-decreasing list of numbers >= 0, "
                                                "one per label")

    # -- inference ---------------------------------------------------------------------------

    def warm_up(self) -> None:
        super().warm_up()
        if getattr(self, "booster_", None) is not None:
            return
        import lightgbm as lgb

        folder = self.resolve_path(self.model)
        what = f"stage '{self.name}' model"
        manifest = read_verified_manifest(folder, what=what)
        try:
            booster = lgb.Booster(model_file=str(folder / MODEL_FILE))
        except lgb.basic.LightGBMError as exc:
            raise ArtifactError(f"{what}: {folder / MODEL_FILE} is not a LightGBM text model ({exc})") from exc
        if booster.feature_name() != manifest["features"]:
            raise ArtifactError(f"{what}: model features {booster.feature_name()} differ from its manifest {manifest['features']}")
        self.trees_ = self._gpu_trees(booster) if self.device_ == "cuda" else None
        self.booster_ = booster
        self.features_ = list(manifest["features"])

    def _gpu_trees(self, booster) -> TorchTreeModel | None:
        """The model compiled for the GPU; ``None`` (logged, scored on the CPU) when it cannot be exact."""
        reason = tree_model_unsupported(booster)
        if reason is None:
            try:
                return TorchTreeModel(booster, "cuda")
            except DeviceError as exc:
                if self.device != "auto":
                    raise DeviceError(f"stage '{self.name}': {exc}") from exc
                reason = str(exc)
        log_fallback(self, f"stage '{self.name}': scoring with LightGBM on the CPU, not on the GPU: {reason}")
        self.device_ = "cpu"
        return None

    def feature_matrix(self, table: pa.Table) -> np.ndarray:
        cols = [table.column(f).to_numpy().astype(np.float32, copy=False) for f in self.features_]
        return np.column_stack(cols) if cols else np.zeros((table.num_rows, 0), np.float32)

    def transform(self, table: pa.Table) -> pa.Table:
        scores = None
        if table.num_rows == 0:
            scores = np.zeros(0, np.float32)
        elif self.trees_ is not None and gpu_pays_off(self.device, table.num_rows, RANKER_GPU_MIN_ROWS):
            scores = self.trees_.predict(self.feature_matrix(table))
            if scores is None:
                log_fallback(self, f"stage '{self.name}': a batch has NaN features, which the model routes by "
                                   "learned defaults that hummingbird-ml does not reproduce; LightGBM scores it on the CPU")
        if scores is None:
            scores = self.booster_.predict(self.feature_matrix(table), num_threads=self.num_threads)
        if self.explain:
            table = table.drop_columns([c for c in (EXPLANATION,) if c in table.column_names])
            table = table.append_column(pa.field(EXPLANATION, EXPLANATION_TYPE), self.explanations(table))
        return keep_input_types(rerank(table, scores), table.schema)

    def explanations(self, table: pa.Table) -> pa.Array:
        """Per row: the ``explain`` largest feature contributions, then the rest plus the bias."""
        n, top = table.num_rows, min(self.explain, len(self.features_))
        if n == 0:
            return pa.array([], EXPLANATION_TYPE)
        contrib = np.asarray(self.booster_.predict(self.feature_matrix(table), pred_contrib=True,
                                                   num_threads=self.num_threads), dtype=np.float64)
        per_feature, bias = contrib[:, :-1], contrib[:, -1]
        order = np.argsort(-np.abs(per_feature), axis=1, kind="stable")[:, :top]
        shown = np.take_along_axis(per_feature, order, axis=1)
        rest = per_feature.sum(axis=1) - shown.sum(axis=1) + bias
        names = np.asarray(self.features_ + [REST], dtype=object)
        feature = np.column_stack([names[order], np.full(n, REST, dtype=object)]).ravel()
        values = np.column_stack([shown, rest]).ravel().astype(np.float32)
        structs = pa.StructArray.from_arrays([pa.array(feature, pa.string()), pa.array(values, pa.float32())],
                                             fields=list(EXPLANATION_TYPE.value_type))
        return pa.ListArray.from_arrays(pa.array(np.arange(0, n * (top + 1) + 1, top + 1, dtype=np.int32)), structs)

    # -- training ----------------------------------------------------------------------------

    def _labels(self, relevance: np.ndarray) -> np.ndarray:
        lab = np.rint((np.nan_to_num(relevance, nan=self.relevance_offset) - self.relevance_offset) * self.label_scale)
        return np.clip(lab, 0, 30).astype(np.int32)

    def build(self, upstream: Pipeline | None, ctx: BuildContext) -> str:
        """Train on ``[data] judgments`` through the upstream pipeline; see the class docstring.

        A config with ``[data] logs`` and no judgments trains next-item recommendation instead:
        each user's last logged item is the target of a query made of the items before it, and
        the candidates come from upstream artifacts rebuilt without those targets
        (:func:`stages.history.next_item_training`). Users whose target is not among the
        candidates carry no ranking signal and are left out. With ``targets_per_user = n > 1``
        each training user also gives the queries whose targets are their 2nd, ..., n-th last
        items, each view with upstream artifacts rebuilt from the logs before its targets
        (:func:`stages.history.next_item_views`): n times the ranking signal for n builds of the
        log-learned artifacts (association counts, popularity: seconds each; a sequence model:
        its training time each). Early stopping is judged on the last items only.
        """
        if upstream is None:
            raise DataError(f"stage '{self.name}' needs recall and feature stages before it to train")
        folder = self.resolve_path(self.model)
        from_logs = "judgments" not in ctx.config.data and "logs" in ctx.config.data
        judgments_path = ctx.data_path("logs" if from_logs else "judgments")
        skip = ({"model", "device", "num_threads"} | ({"targets_per_user"} if self.targets_per_user == 1 else set())
                | ({"max_negatives"} if self.max_negatives is None else set())
                | ({"label_gain"} if self.label_gain is None else set()))
        train_params = {k: v for k, v in self.get_params().items() if k not in skip}
        key = build_key(stage=self.name, params=train_params, judgments=sha256_file(judgments_path),
                        upstream=upstream_key(upstream))
        if not ctx.force and (folder / "manifest.json").exists() and read_manifest(folder, what="ranker").get("build_key") == key:
            return f"{self.name}: up to date ({folder})"

        features_stage = find_upstream(upstream, lambda s: any(f.name.startswith(FEATURE_PREFIX) for f in s.produced_columns()))
        if features_stage is None:
            raise DataError(f"stage '{self.name}' needs a feature stage (producing {FEATURE_PREFIX}* columns) before it")
        features = [f.name for f in upstream.output_schema if f.name.startswith(FEATURE_PREFIX)]

        self._check_memory(upstream, judgments_path, features, views=self.targets_per_user if from_logs else 1)
        views = iter(())
        if from_logs:
            from .history import next_item_views

            views = next_item_views(upstream, ctx, folder / "upstream", self.targets_per_user)
            queries, judgments, upstream = next(views)
        else:
            judgments = read_judgments(judgments_path)
            queries = pl.from_arrow(judgments.select([QUERY_ID, QUERY])).unique(QUERY_ID, maintain_order=True).to_arrow()
        held = np.array(holdout_mask(queries.column(QUERY_ID), self.holdout_fraction, self.seed), dtype=bool)
        folder.mkdir(parents=True, exist_ok=True)
        held_ids = queries.filter(pa.array(held)).column(QUERY_ID)
        pq.write_table(queries.filter(pa.array(held)), folder / HOLDOUT_QUERIES)
        pq.write_table(judgments.filter(pc.is_in(judgments.column(QUERY_ID), held_ids)), folder / HOLDOUT_JUDGMENTS)

        train_q = sample_queries(queries.filter(pa.array(~held)), self.max_train_queries, self.seed)
        valid_ids = train_q.column(QUERY_ID).filter(
            pa.array(holdout_mask(train_q.column(QUERY_ID), self.valid_fraction, self.seed + 1), pa.bool_()))
        work = folder / TRAINING_SHARDS
        shutil.rmtree(work, ignore_errors=True)
        # views 2.. (targets_per_user): the same training users, one target further back each,
        # without the validation users (early stopping is judged on the real last items only)
        train_ids = pc.filter(train_q.column(QUERY_ID), pc.invert(pc.is_in(train_q.column(QUERY_ID), valid_ids)))
        more = ((up, q.filter(pc.is_in(q.column(QUERY_ID), train_ids)), j) for q, j, up in views)
        try:
            shards = self._write_training_shards(chain([(upstream, train_q, judgments)], more), valid_ids, features, work,
                                                 from_logs=from_logs, ctx=ctx)
            if shards["train"].rows + shards["valid"].rows == 0:
                raise DataError(f"stage '{self.name}': no training user's next item is among the upstream candidates "
                                f"({train_q.num_rows} users from {judgments_path}); raise the recall k")
            booster, params, valid_ndcg, best = self._train(shards, features)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        train_rows, n_rows = shards["train"].rows, shards["train"].rows + shards["valid"].rows

        tmp = folder / f".{MODEL_FILE}.tmp"
        booster.save_model(str(tmp), num_iteration=best)
        tmp.replace(folder / MODEL_FILE)
        write_json_atomic(folder / "manifest.json", {
            "kind": "lightgbm-ranker", "build_key": key, "features": features, "best_iteration": best,
            "valid_ndcg@10": valid_ndcg, "train_rows": int(train_rows), "train_queries": int(shards["queries"]),
            "views": shards["views"],
            "holdout_queries": int(held.sum()), "params": params,
            "files": {name: sha256_file(folder / name) for name in (MODEL_FILE, HOLDOUT_QUERIES, HOLDOUT_JUDGMENTS)},
        })
        self.booster_ = None
        return (f"{self.name}: trained on {shards['queries']} queries / {n_rows} candidates, "
                f"{best} trees, valid NDCG@10 {valid_ndcg if valid_ndcg is None else round(valid_ndcg, 4)}; "
                f"{int(held.sum())} holdout queries in {folder}")


    def _check_memory(self, upstream: Pipeline, judgments_path, features: list[str], views: int = 1) -> None:
        """Stop before any work when the training rows cannot fit: at most one query per row of the
        judgments file, or per user of the logs with enough items for each training view (view
        ``v`` needs ``v + 1``), capped by ``max_train_queries`` per view, each with as many
        candidates as the widest recall stage's ``k`` (training queries at most ``max_negatives + 1``)."""
        if views > 1:
            items = pq.read_table(judgments_path, columns=["items"]).column("items")
            lengths = pc.fill_null(pc.list_value_length(items), 0).to_numpy(zero_copy_only=False)
            per_view = [int((lengths >= v + 1).sum()) for v in range(1, views + 1)]
        else:
            per_view = [pq.ParquetFile(judgments_path).metadata.num_rows]
        if self.max_train_queries is not None:
            per_view = [min(n, self.max_train_queries) for n in per_view]
        queries = sum(per_view)
        k = max([s.k for s in upstream.stages if isinstance(getattr(s, "k", None), int)] or [100])
        rows = queries * k
        if self.max_negatives is not None:  # sampled training lists; the validation share keeps all
            valid = int(per_view[0] * self.valid_fraction)
            rows = (queries - valid) * min(k, self.max_negatives + 1) + valid * k
        check_fits(self.name, f"training on up to {queries} queries x {k} candidates x {len(features)} features",
                   rows * (len(features) * BYTES_PER_VALUE + BYTES_PER_ROW), "max_train_queries", self.max_train_queries)

    def _write_training_shards(self, parts, valid_ids: pa.Array, features: list[str], work: Path, *,
                               from_logs: bool, ctx: BuildContext) -> dict:
        """Run each ``(upstream, queries, judgments)`` of ``parts`` (one per training view) over its
        queries a batch at a time and write each batch's labelled feature rows (query id, label,
        float32 features; nothing else) as Parquet shards under ``work``, training and validation
        queries apart; a view's rows never share a shard with another's, so a user's queries in two
        views stay two query groups. Returns ``{"train"|"valid": _Shards, "queries": n, "views": n}``.

        With ``ctx.engine == "ray"`` the candidates come from :func:`pipeline.ray_engine.run_on_ray`
        (the ``funnel run --engine ray`` path, on a cluster with ``ctx.ray_options``) as shards
        that are labelled here one at a time; the rows are the same as the local engine's."""
        from tqdm.auto import tqdm

        from pipeline.build import memory_postfix
        from pipeline.runner import write_parquet_atomic

        work.mkdir(parents=True)
        shards = {"train": _Shards(work, "train"), "valid": _Shards(work, "valid")}
        n_queries = n_views = 0
        batches = 0
        for view, (upstream, train_q, judgments) in enumerate(parts, start=1):
            rel = pl.from_arrow(judgments.select([QUERY_ID, ITEM_ID, RELEVANCE])).unique([QUERY_ID, ITEM_ID])

            def add(cands: pa.Table) -> None:
                nonlocal batches
                rows = self._labelled_rows(cands, rel, features, from_logs=from_logs)
                is_valid = pc.is_in(rows.column(QUERY_ID), pc.cast(valid_ids, rows.schema.field(QUERY_ID).type))
                shards["valid"].add(rows.filter(is_valid), write_parquet_atomic)
                train = self._sample_negatives(rows.filter(pc.invert(is_valid)), np.random.default_rng([self.seed, batches]))
                shards["train"].add(train, write_parquet_atomic)
                batches += 1

            desc = "ranker training candidates" + (f" (view {view}: targets {view - 1} step(s) before the last)"
                                                   if view > 1 else "")
            if ctx.engine == "ray":
                from pipeline.ray_engine import run_on_ray

                sub = work / f"view-{view}"
                sub.mkdir()
                write_parquet_atomic(train_q, sub / "queries.parquet")
                summary = run_on_ray(upstream, sub / "queries.parquet", sub / "candidates", batch_size=TRAIN_BATCH,
                                     progress=ctx.progress, name=f"{self.name} {desc}",
                                     **{k: v for k, v in ctx.ray_options.items() if v is not None})
                for part in sorted((sub / "candidates").glob("part-*.parquet")):
                    add(pq.read_table(part))
                    part.unlink()
                ctx.log(f"  {desc} on Ray: {summary.rows} rows for {summary.queries} queries in {summary.seconds:.0f} s")
            else:
                with tqdm(total=train_q.num_rows, desc=desc, unit="q", disable=not ctx.progress) as bar:
                    for start in range(0, train_q.num_rows, TRAIN_BATCH):
                        batch = train_q.slice(start, TRAIN_BATCH)
                        add(upstream(batch))
                        bar.update(batch.num_rows)
                        bar.set_postfix(memory_postfix(shards["train"].rows + shards["valid"].rows), refresh=False)
            for part in shards.values():
                part.flush(write_parquet_atomic)
            n_queries, n_views = n_queries + train_q.num_rows, view
        return {**shards, "queries": n_queries, "views": n_views}

    def _sample_negatives(self, rows: pa.Table, rng: np.random.Generator) -> pa.Table:
        """``rows`` (grouped by query) with every positive and at most ``max_negatives`` random
        negatives per query, in their order."""
        if self.max_negatives is None or rows.num_rows == 0:
            return rows
        frame = pl.from_arrow(rows.select([QUERY_ID, LABEL])).with_columns(
            pl.Series("__u", rng.random(rows.num_rows)), (pl.col(LABEL) > 0).alias("__pos"))
        keep = frame.select(pl.col("__pos") | (pl.col("__u").rank("ordinal").over([QUERY_ID, "__pos"])
                                                <= self.max_negatives))
        return rows.filter(keep.to_series().to_arrow())

    def _labelled_rows(self, cands: pa.Table, rel: pl.DataFrame, features: list[str], *, from_logs: bool) -> pa.Table:
        """One batch's candidates as training rows: query id, label, features (in candidate order)."""
        frame = pl.from_arrow(cands.select([QUERY_ID, ITEM_ID, *features])).with_row_index("__row")
        rel = rel.with_columns(pl.col(ITEM_ID).cast(frame.schema[ITEM_ID]), pl.col(QUERY_ID).cast(frame.schema[QUERY_ID]))
        frame = frame.join(rel, on=[QUERY_ID, ITEM_ID], how="left").sort("__row")
        if from_logs:
            frame = frame.filter(pl.col(RELEVANCE).is_not_null().any().over(QUERY_ID))
            labels = frame[RELEVANCE].is_not_null().to_numpy().astype(np.int32)
        else:
            labels = self._labels(frame[RELEVANCE].to_numpy().astype(np.float64))
        if self.label_gain is not None and len(labels) and labels.max() >= len(self.label_gain):
            top = float(np.nanmax(frame[RELEVANCE].to_numpy().astype(np.float64)))
            raise DataError(f"stage '{self.name}': relevance {top:g} becomes label {int(labels.max())} "
                            f"(relevance_offset {self.relevance_offset}, label_scale {self.label_scale}) but label_gain has "
                            f"{len(self.label_gain)} entries (labels 0..{len(self.label_gain) - 1}); give one gain per label")
        columns = {QUERY_ID: frame[QUERY_ID].to_arrow(), LABEL: pa.array(labels, pa.int32())}
        columns.update({f: pa.array(frame[f].to_numpy().astype(np.float32), pa.float32()) for f in features})
        return pa.table(columns)

    def _train(self, shards: dict, features: list[str]):
        """Train LightGBM from the shards (read back one at a time); ``(booster, params, valid NDCG@10, best)``."""
        import lightgbm as lgb

        params = {
            "objective": "lambdarank", "metric": "ndcg", "eval_at": [10], "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves, "min_data_in_leaf": self.min_data_in_leaf, "seed": self.seed,
            "num_threads": self.num_threads, "verbose": -1, "deterministic": True, "force_row_wise": True,
            "lambdarank_truncation_level": self.truncation_level,
            "feature_fraction": self.feature_fraction, "bagging_fraction": self.bagging_fraction,
            "bagging_freq": 1 if self.bagging_fraction < 1 else 0,
        }
        if self.label_gain is not None:
            params["label_gain"] = [float(g) for g in self.label_gain]
        if self.train_device != "cpu":
            params["device_type"] = self.train_device
        train_set = shards["train"].dataset(features)
        valid_sets, callbacks = [], []
        if shards["valid"].rows:
            valid_sets = [shards["valid"].dataset(features, reference=train_set)]
            callbacks = [lgb.early_stopping(self.early_stopping_rounds, verbose=False)]
        try:
            booster = lgb.train(params, train_set, num_boost_round=self.n_estimators, valid_sets=valid_sets,
                                callbacks=callbacks)
        except lgb.basic.LightGBMError as exc:
            if self.train_device == "cpu":
                raise
            raise DeviceError(
                f"stage '{self.name}': LightGBM cannot train with train_device={self.train_device!r} "
                f"({str(exc).strip().splitlines()[0]}); 'gpu' needs an OpenCL driver (NVIDIA's, or "
                "`apt-get install pocl-opencl-icd` on a CPU), 'cuda' a LightGBM built with CUDA; or use 'cpu'"
            ) from exc
        best = booster.best_iteration or booster.current_iteration()
        valid_ndcg = booster.best_score.get("valid_0", {}).get("ndcg@10") if valid_sets else None
        return booster, params, valid_ndcg, best


def sample_queries(queries: pa.Table, n: int | None, seed: int, column: str = QUERY_ID) -> pa.Table:
    """At most ``n`` of ``queries``: those whose ids (``column``) hash lowest under ``seed`` (the same
    ids on every machine and in any row order, as :func:`pipeline.data.holdout_mask`), kept in their order."""
    if n is None or queries.num_rows <= n:
        return queries
    ids = queries.column(column).to_pylist()
    keys = np.array([int.from_bytes(hashlib.blake2b(f"{seed}:sample:{q}".encode(), digest_size=8).digest(), "big")
                     for q in ids], dtype=np.uint64)
    keep = np.sort(np.argsort(keys, kind="stable")[:n])
    return queries.take(pa.array(keep))


class _Shards:
    """Training rows of one split written as Parquet shards of about ``SHARD_ROWS`` rows, and read
    back one shard at a time into a LightGBM dataset."""

    def __init__(self, folder: Path, split: str):
        self.folder, self.split = folder, split
        self.paths: list[Path] = []
        self.rows = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def add(self, table: pa.Table, write) -> None:
        if table.num_rows:
            self._pending.append(table)
            self._pending_rows += table.num_rows
            self.rows += table.num_rows
        if self._pending_rows >= SHARD_ROWS:
            self.flush(write)

    def flush(self, write) -> None:
        if self._pending:
            path = self.folder / f"{self.split}-{len(self.paths):05d}.parquet"
            write(pa.concat_tables(self._pending), path)
            self.paths.append(path)
        self._pending, self._pending_rows = [], 0

    def dataset(self, features: list[str], reference=None):
        """A :class:`lightgbm.Dataset` of these rows. Shards are read one at a time into one
        preallocated float32 matrix that the dataset alone references, so LightGBM frees it once
        it has binned the values (``free_raw_data``); the model is the one the same rows in one
        in-memory table would give."""
        import lightgbm as lgb

        matrix = np.empty((self.rows, len(features)), np.float32)
        labels, groups, at = np.empty(self.rows, np.int32), [], 0
        for path in self.paths:
            table = pq.read_table(path, columns=[QUERY_ID, LABEL, *features])
            n = table.num_rows
            for j, f in enumerate(features):
                matrix[at:at + n, j] = table.column(f).to_numpy()
            labels[at:at + n] = table.column(LABEL).to_numpy()
            groups.append(_group_sizes(pl.from_arrow(table.column(QUERY_ID))))
            at += n
            del table
        return lgb.Dataset(matrix, labels, group=np.concatenate(groups), feature_name=features, reference=reference)


def _group_sizes(qids: pl.Series) -> np.ndarray:
    """Run lengths of consecutive equal query ids (rows are grouped by query)."""
    if len(qids) == 0:
        return np.zeros(0, np.int64)
    change = (qids != qids.shift(1)).fill_null(True).to_numpy()
    starts = np.flatnonzero(change)
    return np.diff(np.append(starts, len(qids)))
