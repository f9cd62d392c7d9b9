"""Cross-encoder re-ranking stage on sentence-transformers, with its trainer."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.artifacts import build_key, read_manifest, read_verified_manifest, sha256_file, write_json_atomic
from pipeline.build import BuildContext, upstream_key
from pipeline.columns import ITEM_ID, QUERY, QUERY_ID, RANK, RELEVANCE, SCORE, RECALL_RANK, RECALL_SCORE
from pipeline.data import holdout_mask, read_judgments
from pipeline.device import cpu_has_bf16, resolve_precision
from pipeline.errors import ArtifactError, ConfigError, DataError
from pipeline.schema import ANY, keep_input_types
from pipeline.stage import Pipeline, Stage, StageTags

from .features import FEATURE_PREFIX
from .lightgbm import rerank, sample_queries
from .sentence_transformers import DEFAULT_MODEL, resolve_model

__all__ = ["CrossEncoderReranker", "CE_SCORE", "PREV_SCORE", "cpu_has_bf16", "save_untrained"]

#: The cross-encoder's logit for the top-``k`` rows of each query (NaN below them): a ranking feature.
CE_SCORE = f"{FEATURE_PREFIX}ce_score"
#: The previous stage's score, kept as a feature so a LightGBM after this stage can weigh the two.
PREV_SCORE = f"{FEATURE_PREFIX}prev_score"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: Upstream queries run at once while collecting training pairs
TRAIN_BATCH = 256
#: Part of the model's build key: 2 since bi-encoder bases get a mean-pooled head (version 1 put
#: a head on [CLS], which never learned), so a model folder built by version 1 is rebuilt
TRAINER_VERSION = 2


class CrossEncoderReranker(Stage):
    """Re-score each query's top ``k`` candidates with a cross-encoder that reads query and title together.

    The model is a sentence-transformers ``CrossEncoder`` (a BERT with a one-logit head) that
    ``funnel build`` fine-tunes from the packaged all-MiniLM-L6-v2 weights (``base_model``; the
    head is new) on the config's ``[data] judgments``, and saves under ``model`` as safetensors
    plus a manifest (build key, SHA-256 of every file). ``layers`` keeps only the first layers of
    the base model (a shallower, faster cross-encoder; MiniLM has 6).

    **What it does to a batch.** Rows with ``rank <= k`` (the order of the stage before) are
    scored as (``query_column``, ``text_column``) pairs of at most ``max_length`` tokens, by
    ``CrossEncoder.predict``: pairs sorted by length, batches of ``batch_size`` padded to their
    longest. Those rows are re-ordered by the cross-encoder's logit; the others keep their
    order below them. Two feature columns are added: ``f_ce_score`` (the logit; NaN for rows
    below ``k``) and ``f_prev_score`` (the previous stage's score), so a second
    ``rank.lightgbm`` after this stage learns how much to trust each. The previous
    ``score``/``rank`` are kept as ``recall_score``/``recall_rank``.

    **Training** (``funnel build``): the upstream pipeline runs over the judged queries that are
    *not* in the ranker's holdout -- ``holdout_fraction``/``seed`` must equal those of every
    ``rank.lightgbm`` in the config (checked; the build fails otherwise), so the holdout used for
    evaluation is never seen. At most ``max_train_queries`` of them are used (seeded hash).
    For each, the training pairs are every judged candidate the pipeline retrieved (target
    ``(relevance - relevance_min) / (relevance_max - relevance_min)``, clipped to [0, 1]) and up
    to ``negatives`` unjudged candidates from its top ``k`` (target 0): hard negatives from the
    pipeline's own candidates. Loss: binary cross-entropy on the graded target, AdamW with
    linear warm-up and decay, ``epochs`` passes. A ``valid_fraction`` of the training queries is
    kept out to report NDCG@10 of the top ``k`` in the upstream order and in the
    cross-encoder's, before and after fine-tuning (printed and in the manifest).

    **Devices and precision.** ``precision="auto"`` runs bf16 weights on a CPU with AVX512-BF16
    or AMX (:func:`cpu_has_bf16`) and fp32 elsewhere; on CUDA, ``"auto"`` is fp16. Training is
    always fp32. The CPU and CUDA paths are the same code on another device.
    """

    name = "rerank.cross_encoder"
    input_schema = pa.schema([pa.field(QUERY_ID, ANY), pa.field(QUERY, pa.string()), pa.field(SCORE, pa.float32()),
                              pa.field(RANK, pa.int32())])
    output_schema = pa.schema([pa.field(SCORE, pa.float32()), pa.field(RANK, pa.int32()),
                               pa.field(RECALL_SCORE, pa.float32()), pa.field(RECALL_RANK, pa.int32()),
                               pa.field(CE_SCORE, pa.float32()), pa.field(PREV_SCORE, pa.float32())])
    tags = StageTags(devices=("cpu", "cuda"), requires_build=True, level="candidate")
    path_params = ("model",)
    same_results_params = ("batch_size",)

    def __init__(self, model: str = "artifacts/cross_encoder/v1", k: int = 20, text_column: str = "title",
                 query_column: str = QUERY, batch_size: int = 64, max_length: int = 48, precision: str = "auto",
                 device: str = "auto", base_model: str = DEFAULT_MODEL, layers: int | None = None,
                 epochs: float = 1.0, learning_rate: float = 5e-5, train_batch_size: int = 32, negatives: int = 8,
                 relevance_min: float = 1.0, relevance_max: float = 3.0, max_train_queries: int | None = 4000,
                 holdout_fraction: float = 0.2, valid_fraction: float = 0.05, seed: int = 0):
        self.model = model
        self.k = k
        self.text_column = text_column
        self.query_column = query_column
        self.batch_size = batch_size
        self.max_length = max_length
        self.precision = precision
        self.device = device
        self.base_model = base_model
        self.layers = layers
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.train_batch_size = train_batch_size
        self.negatives = negatives
        self.relevance_min = relevance_min
        self.relevance_max = relevance_max
        self.max_train_queries = max_train_queries
        self.holdout_fraction = holdout_fraction
        self.valid_fraction = valid_fraction
        self.seed = seed

    # -- schema and parameters ---------------------------------------------------------------

    def required_columns(self) -> pa.Schema:
        return pa.schema(list(self.input_schema.remove(self.input_schema.get_field_index(QUERY)))
                         + [pa.field(self.query_column, pa.string()), pa.field(self.text_column, pa.string())])

    def validate_params(self) -> None:
        super().validate_params()

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        for p in ("k", "batch_size", "max_length", "train_batch_size"):
            if not is_int(getattr(self, p)) or getattr(self, p) < 1:
                raise self._bad_param(p, "an int >= 1")
        if not is_int(self.negatives) or self.negatives < 0:
            raise self._bad_param("negatives", "an int >= 0")
        if self.precision not in PRECISIONS:
            raise self._bad_param("precision", f"one of {PRECISIONS}")
        if self.layers is not None and (not is_int(self.layers) or self.layers < 1):
            raise self._bad_param("layers", "None (all of the base model's) or an int >= 1")
        for p in ("epochs", "learning_rate"):
            if not (isinstance(getattr(self, p), (int, float)) and getattr(self, p) > 0):
                raise self._bad_param(p, "a number > 0")
        for p in ("holdout_fraction", "valid_fraction"):
            if not (isinstance(getattr(self, p), (int, float)) and 0 <= getattr(self, p) < 1):
                raise self._bad_param(p, "a number in [0, 1)")
        if not self.relevance_max > self.relevance_min:
            raise self._bad_param("relevance_max", f"a number > relevance_min ({self.relevance_min})")
        if self.max_train_queries is not None and (not is_int(self.max_train_queries) or self.max_train_queries < 1):
            raise self._bad_param("max_train_queries", "None (all) or an int >= 1")

    # -- inference ---------------------------------------------------------------------------

    def warm_up(self) -> None:
        super().warm_up()
        if getattr(self, "model_", None) is not None:
            return
        folder = self.resolve_path(self.model)
        read_verified_manifest(folder, what=f"stage '{self.name}' model")
        self.precision_ = self._resolve_precision()
        self.model_ = self._load(str(folder), self.device_, self.precision_)

    def _resolve_precision(self) -> str:
        return resolve_precision(self.precision, self.device_, stage=self.name)

    def _load(self, path: str, device: str, precision: str):
        """The ``CrossEncoder`` at ``path`` (safetensors only), in eval mode, its weights in ``precision``."""
        import torch

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import CrossEncoder

        if any(Path(path).glob("*.bin")) or any(Path(path).glob("*.pt")):
            raise ArtifactError(f"stage '{self.name}': model folder {path} holds pickled weights (*.bin/*.pt); "
                                "only safetensors are loaded -- rebuild it with `funnel build`")
        try:
            ce = CrossEncoder(path, device=device, local_files_only=True, max_length=self.max_length,
                              model_kwargs={"use_safetensors": True})
        except Exception as exc:  # the library raises many types for a bad folder
            raise ArtifactError(f"stage '{self.name}': cannot load cross-encoder {path} ({type(exc).__name__}: {exc})") from exc
        if precision != "fp32":  # weights converted once: no autocast, no per-call casts
            ce.to(torch.bfloat16 if precision == "bf16" else torch.float16)
        ce.eval()
        return ce

    def score_pairs(self, queries: list[str], texts: list[str]) -> np.ndarray:
        """The cross-encoder's float32 logit for each (query, text) pair, in length-sorted batches."""
        if not self.is_warm or getattr(self, "model_", None) is None:
            self.warm_up()
        return _score(self.model_, queries, texts, self.batch_size)

    def transform(self, table: pa.Table) -> pa.Table:
        n = table.num_rows
        prev = table.column(SCORE).to_numpy(zero_copy_only=False).astype(np.float32) if n else np.zeros(0, np.float32)
        ranks = table.column(RANK).to_numpy(zero_copy_only=False) if n else np.zeros(0, np.int32)
        top = np.flatnonzero(ranks <= self.k)
        ce = np.full(n, np.nan, np.float32)
        if len(top):
            queries = table.column(self.query_column).take(pa.array(top)).to_pylist()
            texts = table.column(self.text_column).take(pa.array(top)).to_pylist()
            ce[top] = self.score_pairs(queries, [t or "" for t in texts])
        scores = _new_scores(table.column(QUERY_ID), ranks, ce)
        drop = [c for c in (CE_SCORE, PREV_SCORE) if c in table.column_names]
        out = table.drop_columns(drop) if drop else table
        out = out.append_column(pa.field(CE_SCORE, pa.float32()), pa.array(ce, pa.float32()))
        out = out.append_column(pa.field(PREV_SCORE, pa.float32()), pa.array(prev, pa.float32()))
        return keep_input_types(rerank(out, scores), table.schema)

    # -- training ----------------------------------------------------------------------------

    def _train_params(self) -> dict[str, Any]:
        skip = {"model", "device", "batch_size", "precision"}
        return {k: v for k, v in self.get_params().items() if k not in skip}

    def _check_split(self, ctx: BuildContext) -> None:
        """Every ``rank.lightgbm`` of the config must hold out the same queries as this stage."""
        from .lightgbm import LightGBMRanker

        stages = ctx.pipeline.stages if ctx.pipeline is not None else []
        for s in stages:
            if isinstance(s, LightGBMRanker) and (s.holdout_fraction, s.seed) != (self.holdout_fraction, self.seed):
                raise ConfigError(
                    f"stage '{self.name}' holds out queries by holdout_fraction={self.holdout_fraction}, seed={self.seed} "
                    f"but stage '{s.name}' ({s.model}) by holdout_fraction={s.holdout_fraction}, seed={s.seed}; "
                    "set the same values so the cross-encoder never trains on the ranker's holdout")

    def build(self, upstream: Pipeline | None, ctx: BuildContext) -> str:
        """Fine-tune the cross-encoder on ``[data] judgments``; see the class docstring."""
        if upstream is None:
            raise DataError(f"stage '{self.name}' needs recall (and a catalog lookup giving '{self.text_column}') before it")
        self._check_split(ctx)
        folder = self.resolve_path(self.model)
        judgments_path = ctx.data_path("judgments")
        base_path, _ = resolve_model(self.base_model)
        key = build_key(stage=self.name, trainer=TRAINER_VERSION, params=self._train_params(),
                        judgments=sha256_file(judgments_path),
                        upstream=upstream_key(upstream))
        if not ctx.force and (folder / "manifest.json").exists() and \
                read_manifest(folder, what=f"stage '{self.name}' model").get("build_key") == key:
            return f"{self.name}: up to date ({folder})"
        t0 = time.perf_counter()
        judgments = read_judgments(judgments_path)
        queries = pl.from_arrow(judgments.select([QUERY_ID, QUERY])).unique(QUERY_ID, maintain_order=True).to_arrow()
        held = np.array(holdout_mask(queries.column(QUERY_ID), self.holdout_fraction, self.seed), dtype=bool)
        train_q = sample_queries(queries.filter(pa.array(~held)), self.max_train_queries, self.seed)
        is_valid = np.array(holdout_mask(train_q.column(QUERY_ID), self.valid_fraction, self.seed + 2), dtype=bool)
        held_ids = set(queries.filter(pa.array(held)).column(QUERY_ID).to_pylist())
        assert not held_ids & set(train_q.column(QUERY_ID).to_pylist())  # the ranker's holdout is never read

        cands = self._candidates(upstream, train_q, ctx)
        pairs = self._pairs(cands, judgments)
        valid_ids = set(train_q.filter(pa.array(is_valid)).column(QUERY_ID).to_pylist())
        train_pairs = pairs.filter(~pl.col(QUERY_ID).is_in(list(valid_ids)))
        valid_cands = cands.filter(pl.col(QUERY_ID).is_in(list(valid_ids)) & (pl.col(RANK) <= self.k))
        if train_pairs.height == 0:
            raise DataError(f"stage '{self.name}': no training pair: none of the {train_q.num_rows} training queries' "
                            f"judged items is among the upstream candidates; raise the recall k")
        ctx.log(f"{self.name}: {train_pairs.height} training pairs from {train_q.num_rows - len(valid_ids)} queries "
                f"({int((train_pairs['target'] > 0).sum())} with relevance above the minimum), "
                f"{len(valid_ids)} validation queries")

        import torch

        torch.manual_seed(self.seed)
        ce = self._init_model(base_path)
        valid_before = self._valid_ndcg(ce, valid_cands, judgments)
        self._fit(ce, train_pairs, ctx)
        valid_after = self._valid_ndcg(ce, valid_cands, judgments)
        model = ce[0].auto_model

        tmp = folder.parent / f".{folder.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        ce.save(str(tmp), safe_serialization=True)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        write_json_atomic(tmp / "manifest.json", {
            "kind": "cross-encoder", "build_key": key, "base_model": self.base_model,
            "layers": int(model.config.num_hidden_layers), "train_pairs": int(train_pairs.height),
            "train_queries": int(train_q.num_rows - len(valid_ids)), "valid_queries": len(valid_ids),
            "holdout_fraction": self.holdout_fraction, "seed": self.seed,
            "valid_ndcg@10": {"upstream": valid_after["upstream"], "untrained": valid_before["ce"],
                              "fine_tuned": valid_after["ce"]},
            "files": {name: sha256_file(tmp / name) for name in files},
        })
        if folder.exists():
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp.replace(folder)
        self.model_ = None
        line = (f"{self.name}: fine-tuned {model.config.num_hidden_layers}-layer cross-encoder on {train_pairs.height} pairs "
                f"in {time.perf_counter() - t0:.0f} s; valid NDCG@10 of the top {self.k}: upstream "
                f"{_fmt(valid_after.get('upstream'))}, untrained {_fmt(valid_before.get('ce'))}, fine-tuned {_fmt(valid_after.get('ce'))}; {folder}")
        return line

    def _candidates(self, upstream: Pipeline, train_q: pa.Table, ctx: BuildContext) -> pl.DataFrame:
        """The upstream candidates of ``train_q``: query id, query text, item id, rank, item text."""
        from tqdm.auto import tqdm

        cols = list(dict.fromkeys([QUERY_ID, self.query_column, ITEM_ID, RANK, self.text_column]))
        parts = []
        with tqdm(total=train_q.num_rows, desc=f"{self.name} training candidates", unit="q",
                  disable=not ctx.progress) as bar:
            for start in range(0, train_q.num_rows, TRAIN_BATCH):
                batch = train_q.slice(start, TRAIN_BATCH)
                parts.append(pl.from_arrow(upstream(batch).select(cols)))
                bar.update(batch.num_rows)
        return pl.concat(parts) if parts else pl.DataFrame()

    def _pairs(self, cands: pl.DataFrame, judgments: pa.Table) -> pl.DataFrame:
        """Training pairs: every judged candidate, plus up to ``negatives`` unjudged ones of the top ``k``."""
        rel = pl.from_arrow(judgments.select([QUERY_ID, ITEM_ID, RELEVANCE])).unique([QUERY_ID, ITEM_ID]).with_columns(
            pl.col(ITEM_ID).cast(cands.schema[ITEM_ID]), pl.col(QUERY_ID).cast(cands.schema[QUERY_ID]))
        frame = cands.join(rel, on=[QUERY_ID, ITEM_ID], how="left")
        judged = frame.filter(pl.col(RELEVANCE).is_not_null())
        unjudged = frame.filter(pl.col(RELEVANCE).is_null() & (pl.col(RANK) <= self.k)).sort([QUERY_ID, RANK])
        unjudged = unjudged.filter(pl.int_range(pl.len()).over(QUERY_ID) < self.negatives)
        span = self.relevance_max - self.relevance_min
        out = pl.concat([judged, unjudged]).with_columns(
            ((pl.col(RELEVANCE).fill_null(self.relevance_min) - self.relevance_min) / span).clip(0, 1).alias("target"))
        return out.select([QUERY_ID, pl.col(self.query_column).alias("q"),
                           pl.col(self.text_column).fill_null("").alias("t"), "target"])

    def _init_model(self, base_path: str):
        """A fresh cross-encoder from the base model's weights, ``layers`` deep, fp32.

        A base that is already a sequence classifier (a published cross-encoder) keeps its head.
        Any other base (a sentence-transformers bi-encoder such as the packaged all-MiniLM-L6-v2)
        gets a mean-pooled one-logit head: such models are trained with mean pooling and their
        ``[CLS]`` state is the same vector for every input (std 0.0009 across inputs measured on
        MiniLM), so a ``[CLS]`` head has nothing to learn from and fine-tuning does not move it.
        """
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import CrossEncoder
        from transformers import AutoConfig

        local = Path(base_path).exists()
        config = AutoConfig.from_pretrained(base_path, local_files_only=local)
        if any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
            ce = CrossEncoder(base_path, num_labels=1, max_length=self.max_length, device="cpu", local_files_only=local)
        else:
            from sentence_transformers.base.modules import Dense, Transformer
            from sentence_transformers.sentence_transformer.modules import Pooling

            body = Transformer(base_path, transformer_task="feature-extraction", max_seq_length=self.max_length,
                               model_kwargs={"local_files_only": local}, processor_kwargs={"local_files_only": local},
                               config_kwargs={"local_files_only": local})
            dim = body.auto_model.config.hidden_size
            ce = CrossEncoder(modules=[body, Pooling(dim, "mean"),
                                       Dense(dim, 1, activation_function=None, module_output_name="scores")],
                              device="cpu")
        hf = ce[0].auto_model
        if self.layers is not None:
            encoder = getattr(hf, hf.base_model_prefix, hf).encoder
            if self.layers < len(encoder.layer):
                encoder.layer = encoder.layer[:self.layers]
                hf.config.num_hidden_layers = self.layers
        return ce

    def _fit(self, ce, pairs: pl.DataFrame, ctx: BuildContext) -> None:
        """Binary cross-entropy on the graded target; AdamW, linear warm-up (10%) and decay."""
        import torch
        from tqdm.auto import tqdm
        from transformers import get_linear_schedule_with_warmup

        rng = np.random.default_rng(self.seed)
        qs, ts, ys = pairs["q"].to_list(), pairs["t"].to_list(), pairs["target"].to_numpy().astype(np.float32)
        n = len(qs)
        steps = max(1, int(np.ceil(n / self.train_batch_size * self.epochs)))
        opt = torch.optim.AdamW(ce.parameters(), lr=self.learning_rate, weight_decay=0.01)
        sched = get_linear_schedule_with_warmup(opt, max(1, steps // 10), steps)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        ce.train()
        order = np.concatenate([rng.permutation(n) for _ in range(int(np.ceil(self.epochs)))])
        with tqdm(total=steps, desc=f"{self.name} fine-tuning", unit="step", disable=not ctx.progress) as bar:
            for step in range(steps):
                rows = order[step * self.train_batch_size:(step + 1) * self.train_batch_size]
                if len(rows) == 0:
                    break
                feats = ce.preprocess([(qs[i], ts[i]) for i in rows])
                logits = ce(feats)["scores"][:, 0]
                loss = loss_fn(logits, torch.from_numpy(ys[rows]))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(ce.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        ce.eval()

    def _valid_ndcg(self, ce, cands: pl.DataFrame, judgments: pa.Table) -> dict[str, float | None]:
        """NDCG@10 of the validation queries' top ``k`` in the upstream order and in the model's."""
        from pipeline.metrics import evaluate

        if cands.height == 0:
            return {"upstream": None, "ce": None}
        scores = _score(ce, cands[self.query_column].to_list(), cands[self.text_column].fill_null("").to_list(),
                        self.batch_size)
        ids = set(cands[QUERY_ID].to_list())
        judged = judgments.filter(pc.is_in(judgments.column(QUERY_ID), pa.array(list(ids), judgments.schema.field(QUERY_ID).type)))
        out = {}
        for name, score in (("upstream", -cands[RANK].to_numpy().astype(np.float32)), ("ce", scores)):
            run = cands.select([QUERY_ID, ITEM_ID]).with_columns(pl.Series(SCORE, score)).to_arrow()
            out[name] = round(float(evaluate(run, judged, k_values=(10,), metrics=("ndcg",))["ndcg@10"]), 4)
        return out


def save_untrained(folder: str | Path, *, base_model: str = DEFAULT_MODEL, layers: int | None = None,
                   max_length: int = 48) -> Path:
    """Save a cross-encoder made from ``base_model`` with a new, untrained head (the first ``layers``
    layers) to ``folder`` as the stage loads one: safetensors and a manifest with checksums. For
    speed measurements and tests; ``funnel build`` writes trained ones."""
    folder = Path(folder)
    stage = CrossEncoderReranker(base_model=base_model, layers=layers, max_length=max_length)
    ce = stage._init_model(resolve_model(base_model)[0])
    ce.save(str(folder), safe_serialization=True)
    write_json_atomic(folder / "manifest.json", {
        "kind": "cross-encoder", "trained": False, "base_model": base_model,
        "layers": int(ce[0].auto_model.config.num_hidden_layers),
        "files": {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != "manifest.json"}})
    return folder


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _score(model, queries: list[str], texts: list[str], batch_size: int) -> np.ndarray:
    """Float32 logits of the ``CrossEncoder`` ``model`` for the pairs: its own ``predict``, which sorts
    the pairs by length and pads each batch to its longest (measured faster on 2 CPU cores than
    the encoder stage's cost-based cuts, :func:`stages.sentence_transformers.length_batches`)."""
    import torch

    if not queries:
        return np.zeros(0, np.float32)
    out = model.predict(list(zip(queries, texts)), batch_size=batch_size, show_progress_bar=False,
                        activation_fn=torch.nn.Identity(), convert_to_numpy=True)
    return np.asarray(out, dtype=np.float32).reshape(-1)


def _new_scores(query_ids: pa.ChunkedArray, ranks: np.ndarray, ce: np.ndarray) -> np.ndarray:
    """Scores that order each query's top-``k`` rows by ``ce`` and keep the rest below, in their ``ranks`` order."""
    n = len(ranks)
    if n == 0:
        return np.zeros(0, np.float32)
    frame = pl.DataFrame({"q": pl.from_arrow(query_ids).alias("q"), "r": ranks, "ce": ce})
    frame = frame.with_columns(pl.col("ce").fill_nan(None)).with_columns(
        pl.col("ce").min().over("q").fill_null(0.0).alias("floor"),
        pl.col("r").rank("ordinal").over("q").alias("pos"))
    below = pl.col("floor") - 1.0 - pl.col("pos").cast(pl.Float64) * 1e-3
    return frame.select(pl.when(pl.col("ce").is_not_null()).then(pl.col("ce")).otherwise(below)).to_series() \
        .to_numpy().astype(np.float32)
