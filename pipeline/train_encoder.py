"""Fine-tuning a pipeline's sentence-transformers encoder on its judgments (``funnel train encoder``).

The dense recall of a pipeline is only as good as the encoder that embeds queries and items. A
general-purpose model (the bundled all-MiniLM-L6-v2) has never seen "deck over" or "l bracket";
graded judgments of real searches teach it the shop's vocabulary. This module turns a config's
``[data] judgments`` and ``[data] catalog`` into a new, versioned model folder that the config's
encode stage loads with ``model = "artifacts/encoder/v1"``.

**What the model learns from.** Pairs ``(query, item text)``: the item text is what the index
encodes, i.e. the ``item_text`` columns of the config's ``recall.faiss`` stage joined by spaces
(``["title"]`` when there is none), so training and indexing see the same strings.

* *Positives* are the judged items with relevance >= ``min_positive`` (2.33 on the 1..3 scale:
  at least two of three raters said "relevant").
* *Negatives* come in two kinds. Every other item of the batch is a negative for a query
  (in-batch negatives, the ``MultipleNegativesRankingLoss`` / InfoNCE objective, with
  ``BatchSamplers.NO_DUPLICATES`` so a query never meets its own text or positive as a
  negative). Each pair also carries one *hard* negative, chosen in this order:

  1. a judged item of the same query with relevance < ``max_negative`` (2.0) -- a human said it
     does not match; the hardest (most similar under the base model) first;
  2. when the query has none and ``mine_depth > 0``: an unjudged item among the base model's top
     ``mine_depth`` for the query, at random among the first few that score below
     ``margin`` x the similarity of the pair's positive (unjudged top hits are often relevant
     but unrated -- false negatives -- and the margin keeps the near-ties out) and whose text is
     not a positive's text;
  3. otherwise a random catalog item not judged for the query.

  Counts of each kind are written to the manifest.

**Split by query, never by row.** The queries the config's ranker holds out for evaluation
(``holdout_fraction`` and ``seed`` of its ``rank.lightgbm`` stage; 0.2 and 0 when there is none)
are excluded entirely: the same :func:`pipeline.data.holdout_mask`, so the fine-tuned encoder
never sees a query on which the pipeline is evaluated. Of the rest, ``valid_fraction`` (split
with ``seed + 1``, as the ranker does) drives model selection and early stopping.

**Validation** is retrieval, as the pipeline uses the model: the validation queries are
encoded, the best ``100`` items are retrieved by exact inner product over a catalog subset, and
NDCG@10 (gain ``relevance - 1``) and Recall@100 (relevance >= 2.67) are computed by
:func:`pipeline.metrics.evaluate`. For speed the subset is every item judged for a validation
query plus random others up to ``val_items`` (the whole catalog when ``None``), so figures are
higher than over the full catalog; they compare checkpoints (and the base model, evaluated
before training) with each other. Evaluation runs ``evals_per_epoch`` times an epoch, the best
checkpoint is kept, and training stops after ``patience`` evaluations without improvement.

**Training** is sentence-transformers' own ``SentenceTransformerTrainer`` (the ``train``
extra: ``datasets``, ``accelerate``) with AdamW, linear warm-up over 10% of the steps and a
tqdm progress bar. ``max_seq_length`` (32 tokens by default: Home Depot titles are ~20 tokens)
bounds the cost on CPU; the saved model keeps it, and the encode stage uses it unless its own
``max_seq_length`` is set. ``device`` is the encode stage's (``"auto"``: CUDA when visible).

**Output** is a new folder (by default ``artifacts/encoder/vN`` next to the config, N one more
than the highest there; an existing folder is refused) written by ``model.save(...,
safe_serialization=True)`` -- safetensors weights, JSON configs and the tokenizer, never a
pickle (checked) -- and ``manifest.json`` with the base model, the SHA-256 of the data files, the
split, the settings, validation NDCG of the base and the fine-tuned model, timings and the
SHA-256 of every file. The folder appears complete or not at all (written aside, then renamed).
Version folders are never rewritten: an index built with ``artifacts/encoder/v1`` stays valid.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl
import pyarrow as pa
from sentence_transformers.base.evaluation import BaseEvaluator

from .artifacts import MANIFEST, sha256_file, write_json_atomic
from .columns import ITEM_ID, QUERY, QUERY_ID, RELEVANCE, SCORE
from .config import PipelineConfig, stage_to_spec
from .data import holdout_mask, read_catalog, read_judgments
from .errors import ArtifactError, ConfigError, DataError

__all__ = ["EncoderTrainingResult", "RetrievalNDCGEvaluator", "train_encoder", "split_queries", "next_version_dir",
           "MANIFEST_KIND", "BUILT_BY", "build_encoder", "encoder_build_key"]

MANIFEST_KIND = "sentence-transformers-encoder"
#: ``built_by`` in the manifest of a model ``funnel build`` trained (and may retrain when stale).
BUILT_BY = "funnel build"
#: Steps of one training, as its log lines number them.
TRAIN_STEPS = 5
#: File suffixes that would mean a pickle-based file in a saved model (refused).
PICKLE_SUFFIXES = (".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt")
_VERSION = re.compile(r"^v(\d+)$")


@dataclass
class EncoderTrainingResult:
    """What :func:`train_encoder` did; also written (with more detail) to the model's manifest."""

    folder: Path
    base_val_ndcg: float
    val_ndcg: float
    val_recall: float
    base_val_recall: float
    epochs: float
    train_pairs: int
    train_queries: int
    valid_queries: int
    holdout_queries: int
    train_minutes: float
    minutes_per_epoch: float
    negatives: dict[str, int] = field(default_factory=dict)


def next_version_dir(root: Path) -> Path:
    """``root/vN`` with N one more than the highest ``v<int>`` folder in ``root`` (``v1`` if none)."""
    versions = [int(m.group(1)) for p in root.glob("v*") if p.is_dir() and (m := _VERSION.match(p.name))]
    return root / f"v{max(versions, default=0) + 1}"


class RetrievalNDCGEvaluator(BaseEvaluator):
    """NDCG@10 / Recall@100 of retrieval over a set of items, as a sentence-transformers evaluator.

    Encodes ``queries`` and ``item_texts`` with the model under training, ranks the items of each
    query by inner product of normalised embeddings (exact, top ``k``), and scores the ranking
    with :func:`pipeline.metrics.evaluate` against ``judgments`` (``query_id``, ``item_id``,
    ``relevance``). Returns ``{"<name>_ndcg@10": ..., "<name>_recall@100": ...}``; the primary
    metric (used by the trainer to pick the best checkpoint) is NDCG@10. ``seconds`` accumulates
    the time spent evaluating.
    """

    def __init__(self, query_ids: list, queries: list[str], item_ids: list, item_texts: list[str],
                 judgments: pa.Table, *, name: str = "val", batch_size: int = 128, k: int = 100):
        super().__init__()
        self.query_ids, self.queries = list(query_ids), list(queries)
        self.item_ids, self.item_texts = np.asarray(item_ids), list(item_texts)
        self.judgments = judgments
        self.name, self.batch_size, self.k = name, batch_size, k
        self.greater_is_better = True
        self.primary_metric = f"{name}_ndcg@10"
        self.seconds = 0.0

    def __call__(self, model, output_path: str | None = None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
        import torch

        from .metrics import evaluate

        start = time.perf_counter()
        with torch.inference_mode():
            q = model.encode(self.queries, batch_size=self.batch_size, normalize_embeddings=True, convert_to_tensor=True)
            d = model.encode(self.item_texts, batch_size=self.batch_size, normalize_embeddings=True,
                             convert_to_tensor=True)
            scores, pos = torch.topk(q @ d.T, k=min(self.k, d.shape[0]), dim=1)
        scores, pos = scores.float().cpu().numpy(), pos.cpu().numpy()
        run = pa.table({
            QUERY_ID: np.repeat(np.asarray(self.query_ids), pos.shape[1]),
            ITEM_ID: self.item_ids[pos.reshape(-1)],
            SCORE: scores.reshape(-1),
        })
        found = evaluate(run, self.judgments, k_values=(10, 100), metrics=("ndcg", "recall"))
        self.seconds += time.perf_counter() - start
        return {f"{self.name}_ndcg@10": found["ndcg@10"], f"{self.name}_recall@100": found["recall@100"]}

    @property
    def description(self) -> str:
        return "Retrieval NDCG"

    def get_config_dict(self) -> dict[str, Any]:
        return {"items": len(self.item_texts), "queries": len(self.queries)}


def split_queries(query_ids: pa.Array, holdout_fraction: float, seed: int, valid_fraction: float
                  ) -> tuple[list, list, list]:
    """``(train, valid, held)`` query ids: ``held`` is the ranker's holdout (:func:`holdout_mask`
    with ``holdout_fraction``, ``seed``), ``valid`` a ``valid_fraction`` of the rest (seed + 1)."""
    ids = query_ids.to_pylist()
    held = holdout_mask(query_ids, holdout_fraction, seed)
    kept = [q for q, h in zip(ids, held) if not h]
    in_valid = holdout_mask(pa.array(kept, type=query_ids.type), valid_fraction, seed + 1)
    return ([q for q, v in zip(kept, in_valid) if not v], [q for q, v in zip(kept, in_valid) if v],
            [q for q, h in zip(ids, held) if h])


def _stage_lists(stages: list) -> list[list]:
    """``stages`` and the stage lists of every sub-pipeline (``recall.fused`` sources) in it."""
    out = [stages]
    for stage in stages:
        subs = getattr(stage, "_pipelines", None)
        if callable(subs):
            for _, _, sub in subs():
                out += _stage_lists(sub.stages)
    return out


def _pipeline_parts(cfg: PipelineConfig, stage=None, pipe=None):
    """The encode stage, its recall stage, the item text columns and the ranker's holdout (fraction, seed).

    The encode stage is ``stage`` when given (found in ``pipe``, the pipeline being built, or one
    with the same spec in ``cfg``), else the config's first (sub-pipelines of ``recall.fused``
    included); its recall stage is the next stage of the same list that searches its embeddings.
    """
    from stages.sentence_transformers import SentenceTransformerEncoder

    lists = _stage_lists((pipe or cfg.build()).stages)
    if stage is not None and not any(s is stage for ls in lists for s in ls):
        lists = _stage_lists(cfg.build().stages)
    found = None
    for stages in lists:
        for i, s in enumerate(stages):
            mine = s is stage or (stage is not None and stage_to_spec(s) == stage_to_spec(stage))
            if found is None and isinstance(s, SentenceTransformerEncoder) and (stage is None or mine):
                found = (s, stages[i + 1:])
    if found is None:
        raise ConfigError("`funnel train encoder` needs an encode.sentence_transformers stage in the config; it has: "
                          + ", ".join(s.name for s in lists[0]))
    encoder, after = found
    recall = next((s for s in after if getattr(s, "embedding_column", None) == encoder.output_column
                   and getattr(s, "item_text", None)), None)
    item_text = list(recall.item_text) if recall is not None else ["title"]
    ranker = next((s for ls in lists for s in ls if hasattr(s, "holdout_fraction")), None)
    holdout = (float(ranker.holdout_fraction), int(ranker.seed)) if ranker is not None else (0.2, 0)
    return encoder, recall, item_text, holdout


def _base_similarity(model, texts: list[str], batch_size: int, progress: bool) -> np.ndarray:
    emb = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                       show_progress_bar=progress)
    return np.ascontiguousarray(emb, dtype=np.float32)


def _reusable_index(recall, encoder, item_text: list[str], catalog_path: Path) -> Path | None:
    """The recall stage's index folder when it holds base-model vectors of this catalog's item text.

    Encoding a 50k-item catalog takes many CPU minutes; an exact (``Flat``) index built by
    ``funnel build`` with the same encoder, item text and catalog file already has the vectors.
    """
    if recall is None or not hasattr(recall, "index"):
        return None
    folder = recall.resolve_path(recall.index)
    if not (folder / MANIFEST).exists():
        return None
    from .artifacts import read_manifest

    manifest = read_manifest(folder, what="index")
    same = (manifest.get("kind") == "faiss" and manifest.get("factory") == "Flat" and manifest.get("normalize")
            and manifest.get("encoder") == encoder.model and manifest.get("item_text") == item_text
            and manifest.get("source") == str(catalog_path))
    return folder if same else None


def _indexed_embeddings(folder: Path, index_of: dict) -> np.ndarray | None:
    """The vectors of a Flat index folder in catalog order, or ``None`` when its ids differ."""
    import faiss
    import pyarrow.parquet as pq

    from .artifacts import read_verified_manifest

    read_verified_manifest(folder, what="index")
    ids = pq.read_table(folder / "ids.parquet").column(ITEM_ID).to_pylist()
    if len(ids) != len(index_of) or any(i not in index_of for i in ids):
        return None
    index = faiss.read_index(str(folder / "index.faiss"))
    vectors = index.reconstruct_n(0, index.ntotal)
    out = np.empty_like(vectors)
    out[[index_of[i] for i in ids]] = vectors
    return out


def _pairs(train: pl.DataFrame, texts: dict, catalog_ids: np.ndarray, model, *, base_index: Path | None,
           min_positive: float, max_negative: float, mine_depth: int, margin: float, batch_size: int, seed: int, progress: bool,
           log: Callable[[str], None], label: str = "") -> dict[str, list[str]]:
    """``anchor``, ``positive``, ``negative`` columns for the training queries, and each negative's ``kind``."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    rel = pl.col(RELEVANCE).round(2)
    by_query = train.group_by(QUERY_ID, maintain_order=True).agg(
        pl.col(QUERY).first(),
        pl.col(ITEM_ID).filter(rel >= min_positive - 1e-9).alias("pos"),
        pl.col(ITEM_ID).filter(rel < max_negative - 1e-9).alias("neg"),
        pl.col(ITEM_ID).alias("judged"),
    ).filter(pl.col("pos").list.len() > 0)
    queries = by_query[QUERY].to_list()

    # mining searches the whole catalog; otherwise only judged items need a base similarity
    needed = catalog_ids if mine_depth > 0 else np.unique(train[ITEM_ID].to_numpy())
    index_of = {item: i for i, item in enumerate(needed.tolist())}
    items_emb = _indexed_embeddings(base_index, index_of) if base_index is not None else None
    if items_emb is None:
        log(f"encoding {len(needed)} items with the base model (hard-negative order and mining)")
        items_emb = _base_similarity(model, [texts[i] for i in needed.tolist()], batch_size, progress)
    else:
        log(f"base item embeddings for hard negatives read from the index at {base_index}")
    q_emb = _base_similarity(model, queries, batch_size, progress)
    mined: list[list[tuple]] | None = None
    if mine_depth > 0:
        from indexes.faiss_index import FaissIndex

        index = FaissIndex.build(items_emb, pa.array(catalog_ids), factory="Flat", metric="ip", normalize=False)
        sims, positions = index.search(q_emb, mine_depth)
        mined = [[(catalog_ids[p].item(), s) for p, s in zip(row_p.tolist(), row_s.tolist()) if p >= 0]
                 for row_p, row_s in zip(positions, sims)]

    cols: dict[str, list[str]] = {"anchor": [], "positive": [], "negative": [], "kind": []}
    rows = by_query.select("pos", "neg", "judged").iter_rows()
    for qi, (pos, neg, judged) in enumerate(tqdm(rows, total=len(queries), desc=f"{label}pairs and hard negatives",
                                                 unit="q", disable=not progress)):
        sim = lambda item: float(q_emb[qi] @ items_emb[index_of[item]])  # noqa: E731
        neg = sorted(neg, key=sim, reverse=True)
        judged_set = set(judged)
        pos_texts = {texts[p] for p in pos}
        for j, p in enumerate(pos):
            if neg:
                negative, kind = neg[j % len(neg)], "judged"
            else:
                negative, kind = None, "random"
                if mined is not None:
                    limit = margin * sim(p)
                    ok = [c for c, s in mined[qi] if c not in judged_set and s < limit and texts[c] not in pos_texts][:10]
                    if ok:
                        negative, kind = ok[int(rng.integers(len(ok)))], "mined"
                while negative is None or negative in judged_set:
                    negative = catalog_ids[int(rng.integers(len(catalog_ids)))].item()
            cols["anchor"].append(queries[qi])
            cols["positive"].append(texts[p])
            cols["negative"].append(texts[negative])
            cols["kind"].append(kind)
    return cols


def _val_evaluator(valid: pl.DataFrame, texts: dict, catalog_ids: np.ndarray, *, val_items: int | None, seed: int,
                   batch_size: int) -> RetrievalNDCGEvaluator:
    queries = valid.unique(QUERY_ID, maintain_order=True)
    judged = set(valid[ITEM_ID].to_list())
    if val_items is None or val_items >= len(catalog_ids):
        items = catalog_ids
    else:
        others = np.array([i for i in catalog_ids.tolist() if i not in judged], dtype=catalog_ids.dtype)
        extra = np.random.default_rng(seed).choice(len(others), size=max(0, val_items - len(judged)), replace=False)
        items = np.concatenate([np.array(sorted(judged), dtype=catalog_ids.dtype), others[np.sort(extra)]])
    return RetrievalNDCGEvaluator(queries[QUERY_ID].to_list(), queries[QUERY].to_list(), items,
                                  [texts[i] for i in items.tolist()],
                                  valid.select(QUERY_ID, ITEM_ID, RELEVANCE).to_arrow(), batch_size=batch_size)


def _labelled(log: Callable[[str], None], label: str) -> Callable[[str], None]:
    return (lambda message: log(f"{label}{message}")) if label else log


class _Steps:
    """``log("<label>step i/5: what")``: where a long training is, named in every build log."""

    def __init__(self, log: Callable[[str], None], label: str):
        self.log, self.label, self.done = log, label, 0

    def __call__(self, what: str) -> None:
        self.done += 1
        self.log(f"{self.label}step {self.done}/{TRAIN_STEPS}: {what}")


def _tree_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def train_encoder(
    cfg: PipelineConfig,
    *,
    out: str | Path | None = None,
    epochs: float = 1.0,
    device: str | None = None,
    batch_size: int = 64,
    learning_rate: float = 5e-5,
    max_seq_length: int | None = 32,
    min_positive: float = 2.33,
    max_negative: float = 2.0,
    mine_depth: int = 50,
    margin: float = 0.95,
    max_pairs: int | None = None,
    valid_fraction: float = 0.1,
    val_items: int | None = 10_000,
    evals_per_epoch: int = 2,
    patience: int = 2,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    stage=None,
    base_model: str | None = None,
    replace: bool = False,
    build_key: str | None = None,
    label: str = "",
) -> EncoderTrainingResult:
    """Fine-tune the encode stage of ``cfg`` on its judgments; see the module docstring.

    ``out`` is the new model folder (default: ``artifacts/encoder/vN`` next to the config); it
    must not exist unless ``replace`` (``funnel build`` renewing a stale model it trained).
    ``max_pairs`` samples that many training pairs (all when ``None``). ``stage`` picks the
    encode stage (default: the config's first), ``base_model`` the model to start from (default:
    the stage's ``model``); ``build_key`` is recorded in the manifest; ``label`` prefixes the
    log lines and progress bars. Returns an :class:`EncoderTrainingResult`.
    """
    from stages.faiss import _item_texts  # the index's own item text, so training sees what gets indexed
    from stages.sentence_transformers import TRAIN_OPTIONS, check_train_options

    from .extras import TRAIN_MODULES, require_extra

    require_extra("train", TRAIN_MODULES, needed_by="training an encoder")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    base_dir = (cfg.base_dir or Path.cwd()).resolve()
    folder = Path(out) if out is not None else next_version_dir(base_dir / "artifacts" / "encoder")
    folder = folder if folder.is_absolute() else (Path.cwd() / folder)
    folder = folder.resolve()
    if not replace and folder.exists() and any(folder.iterdir()):
        raise ArtifactError(f"encoder output folder {folder} already exists and is not empty; model versions are never "
                            "rewritten (an index built with it would silently go stale): choose a new --out")
    options = dict(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, max_seq_length=max_seq_length,
                   max_pairs=max_pairs, min_positive=min_positive, max_negative=max_negative, mine_depth=mine_depth,
                   margin=margin, valid_fraction=valid_fraction, val_items=val_items, evals_per_epoch=evals_per_epoch,
                   patience=patience, seed=seed)
    check_train_options(options, stage="`funnel train encoder`", prefix="")

    encoder, recall, item_text, (holdout_fraction, holdout_seed) = _pipeline_parts(cfg, stage)
    # trained in fp32 and uncompiled whatever the stage runs with (bf16 weights do not take AdamW steps well)
    if base_model is None:  # a stage with a `train` table names its output folder; training starts from its base
        base_model = encoder.model if encoder.train is None else {**TRAIN_OPTIONS, **encoder.train}["base_model"]
    encoder = encoder.clone(model=base_model, device=device or encoder.device, train=None, precision="fp32",
                            compile=False)
    catalog_path, judgments_path = cfg.data_path("catalog"), cfg.data_path("judgments")
    log, step = _labelled(log, label), _Steps(log, label)
    step("reading the catalog and judgments, splitting by query")
    catalog = read_catalog(catalog_path, item_text)
    catalog_ids = catalog.column(ITEM_ID).to_numpy()
    texts = dict(zip(catalog_ids.tolist(), _item_texts(catalog, item_text)))

    judgments = pl.from_arrow(read_judgments(judgments_path)).filter(pl.col(RELEVANCE).is_not_null())
    judgments = judgments.with_columns(pl.col(ITEM_ID).cast(pl.from_arrow(catalog.column(ITEM_ID)).dtype))
    unknown = judgments.filter(~pl.col(ITEM_ID).is_in(catalog_ids.tolist())).height
    judgments = judgments.filter(pl.col(ITEM_ID).is_in(catalog_ids.tolist()))
    train_ids, valid_ids, held_ids = split_queries(judgments[QUERY_ID].unique(maintain_order=True).to_arrow(),
                                                   holdout_fraction, holdout_seed, valid_fraction)
    train = judgments.filter(pl.col(QUERY_ID).is_in(train_ids))
    valid = judgments.filter(pl.col(QUERY_ID).is_in(valid_ids))
    if train.height == 0 or valid.height == 0:
        raise DataError(f"judgments file {judgments_path}: too few queries to train ({len(train_ids)} training, "
                        f"{len(valid_ids)} validation after holding out {len(held_ids)})")
    log(f"split by query: {len(held_ids)} held out (fraction {holdout_fraction}, seed {holdout_seed}; never used), "
        f"{len(valid_ids)} validation, {len(train_ids)} training"
        + (f"; {unknown} judgment(s) of items missing from the catalog ignored" if unknown else ""))

    step(f"loading {encoder.model!r}; training pairs and hard negatives")
    encoder.warm_up()
    model = encoder.model_
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    base_index = _reusable_index(recall, encoder, item_text, catalog_path) if mine_depth > 0 else None
    cols = _pairs(train, texts, catalog_ids, model, base_index=base_index, min_positive=min_positive,
                  max_negative=max_negative, mine_depth=mine_depth, margin=margin, batch_size=encoder.batch_size * 2,
                  seed=seed, progress=progress, log=log, label=label)
    n_pairs = len(cols["anchor"])
    if n_pairs < batch_size:
        raise DataError(f"judgments file {judgments_path}: only {n_pairs} training pair(s) with relevance >= "
                        f"{min_positive}; need at least batch_size = {batch_size}")
    if max_pairs is not None and max_pairs < n_pairs:
        keep = np.sort(np.random.default_rng(seed).choice(n_pairs, size=max_pairs, replace=False))
        cols = {k: [v[i] for i in keep] for k, v in cols.items()}
    n_train = len(cols["anchor"])
    counts = {kind: cols["kind"].count(kind) for kind in ("judged", "mined", "random")}
    del cols["kind"]
    log(f"{n_train} training pairs (of {n_pairs}); hard negatives: {counts['judged']} judged irrelevant, "
        f"{counts['mined']} mined, {counts['random']} random")

    step("validating the base model")
    evaluator = _val_evaluator(valid, texts, catalog_ids, val_items=val_items, seed=seed,
                               batch_size=encoder.batch_size * 2)
    base_metrics = evaluator(model)
    log(f"base model on validation ({len(evaluator.queries)} queries over {len(evaluator.item_texts)} items): "
        f"NDCG@10 {base_metrics['val_ndcg@10']:.4f}, Recall@100 {base_metrics['val_recall@100']:.4f}")

    step(f"fine-tuning on {len(cols['anchor'])} pairs ({epochs:g} epoch(s), batches of {batch_size}, "
         f"{evals_per_epoch} validation(s) an epoch)")
    base_eval_seconds = evaluator.seconds  # the time of validation runs during training is what gets subtracted
    trainer, seconds, state = _fit(model, cols, evaluator, epochs=epochs, batch_size=batch_size,
                                   learning_rate=learning_rate, evals_per_epoch=evals_per_epoch, patience=patience,
                                   seed=seed, cpu=encoder.device_ == "cpu", progress=progress, label=label)
    if not any("eval_val_ndcg@10" in h for h in state.log_history):
        # the batch sampler can run out of distinct pairs before the first scheduled validation
        before = evaluator.seconds
        found = evaluator(trainer.model)
        base_eval_seconds += evaluator.seconds - before  # after training: not part of its time
        state.log_history.append({"step": state.global_step, "epoch": state.epoch,
                                  **{f"eval_{k}": v for k, v in found.items()}})
    best = max((h for h in state.log_history if "eval_val_ndcg@10" in h), key=lambda h: h["eval_val_ndcg@10"])
    epochs_run = float(state.epoch or epochs)
    val_seconds = evaluator.seconds - base_eval_seconds
    train_minutes = (seconds - val_seconds) / 60
    per_epoch = train_minutes / max(epochs_run, 1e-9)
    log(f"trained {epochs_run:.2f} epoch(s) in {seconds / 60:.1f} min ({per_epoch:.1f} min/epoch without the "
        f"{val_seconds / 60:.1f} min of validation); best validation NDCG@10 {best['eval_val_ndcg@10']:.4f} "
        f"at step {best['step']} (base {base_metrics['val_ndcg@10']:.4f})")

    step(f"saving to {folder}")
    manifest = {
        "kind": MANIFEST_KIND,
        **({"build_key": build_key, "built_by": BUILT_BY} if build_key is not None else {}),
        "base_model": encoder.model,
        "encoder_params": stage_to_spec(encoder)["params"],
        "item_text": item_text,
        "max_seq_length": model.max_seq_length,
        "data": {"catalog": str(catalog_path), "catalog_sha256": sha256_file(catalog_path),
                 "judgments": str(judgments_path), "judgments_sha256": sha256_file(judgments_path)},
        "split": {"holdout_fraction": holdout_fraction, "holdout_seed": holdout_seed,
                  "valid_fraction": valid_fraction, "valid_seed": holdout_seed + 1,
                  "holdout_queries": len(held_ids), "valid_queries": len(valid_ids), "train_queries": len(train_ids)},
        "training": {"loss": "MultipleNegativesRankingLoss (in-batch + 1 hard negative)", "epochs": epochs,
                     "epochs_run": epochs_run, "best_step": best["step"], "global_steps": state.global_step,
                     "batch_size": batch_size, "learning_rate": learning_rate, "warmup_ratio": 0.1,
                     "min_positive": min_positive, "max_negative": max_negative, "mine_depth": mine_depth,
                     "margin": margin, "train_pairs": n_train, "available_pairs": n_pairs, "negatives": counts,
                     "seed": seed, "device": encoder.device_, "minutes": seconds / 60,
                     "minutes_per_epoch": per_epoch, "validation_minutes": val_seconds / 60},
        "validation": {"items": len(evaluator.item_texts), "queries": len(evaluator.queries),
                       "base_ndcg@10": base_metrics["val_ndcg@10"], "base_recall@100": base_metrics["val_recall@100"],
                       "ndcg@10": best["eval_val_ndcg@10"], "recall@100": best.get("eval_val_recall@100"),
                       "history": [{k: h[k] for k in ("step", "epoch", "eval_val_ndcg@10", "eval_val_recall@100")
                                    if k in h} for h in state.log_history if "eval_val_ndcg@10" in h]},
    }
    _save(trainer.model, folder, manifest, replace=replace)
    log(f"wrote {folder}")
    return EncoderTrainingResult(
        folder=folder, base_val_ndcg=base_metrics["val_ndcg@10"], val_ndcg=best["eval_val_ndcg@10"],
        base_val_recall=base_metrics["val_recall@100"], val_recall=best.get("eval_val_recall@100", float("nan")),
        epochs=epochs_run, train_pairs=n_train, train_queries=len(train_ids), valid_queries=len(valid_ids),
        holdout_queries=len(held_ids), train_minutes=train_minutes, minutes_per_epoch=per_epoch, negatives=counts,
    )


def _fit(model, cols, evaluator, *, epochs, batch_size, learning_rate, evals_per_epoch, patience, seed, cpu, progress,
         label=""):
    """Run ``SentenceTransformerTrainer``; returns (trainer with the best model loaded, seconds, state)."""
    import math

    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from transformers import EarlyStoppingCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.utils import logging as hf_logging

    steps_per_epoch = max(1, len(cols["anchor"]) // batch_size)
    n_evals = max(1, math.ceil(evals_per_epoch * epochs))
    eval_steps = max(1, math.ceil(steps_per_epoch * epochs / n_evals))
    total_steps = eval_steps * n_evals  # the last step is evaluated too
    with tempfile.TemporaryDirectory(prefix="funnel-encoder-") as tmp:
        args = SentenceTransformerTrainingArguments(
            output_dir=tmp, max_steps=total_steps, per_device_train_batch_size=batch_size,
            learning_rate=learning_rate, warmup_steps=0.1, batch_sampler=BatchSamplers.NO_DUPLICATES,
            eval_strategy="steps", eval_steps=eval_steps, save_strategy="steps", save_steps=eval_steps,
            save_total_limit=2, save_only_model=True, load_best_model_at_end=True,
            metric_for_best_model=f"eval_{evaluator.primary_metric}", greater_is_better=True,
            logging_steps=max(1, eval_steps // 4), report_to="none", seed=seed, data_seed=seed, use_cpu=cpu,
            disable_tqdm=not progress, dataloader_drop_last=True,
        )
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=Dataset.from_dict(cols),
            loss=MultipleNegativesRankingLoss(model), evaluator=evaluator,
            callbacks=[EarlyStoppingCallback(early_stopping_patience=patience)],
        )
        if progress:  # the same bar, named after the stage and step
            class NamedProgress(ProgressCallback):
                def on_train_begin(self, args, state, control, **kwargs):
                    super().on_train_begin(args, state, control, **kwargs)
                    if getattr(self, "training_bar", None) is not None:
                        self.training_bar.set_description(f"{label}fine-tuning")

            trainer.remove_callback(ProgressCallback)
            trainer.add_callback(NamedProgress())
        else:  # quiet: no loss dicts printed either
            trainer.remove_callback(PrinterCallback)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_warning()
        start = time.perf_counter()
        try:
            trainer.train()
        finally:
            hf_logging.set_verbosity(verbosity)
        return trainer, time.perf_counter() - start, trainer.state


def _save(model, folder: Path, manifest: dict, *, replace: bool = False) -> None:
    """Write the model aside, check it holds no pickle, add the manifest, rename it into place
    (with ``replace``, the folder there is renamed away first and removed after)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    tmp.chmod(0o755)
    try:
        model.save(str(tmp), safe_serialization=True, create_model_card=False)
        files = _tree_files(tmp)
        pickled = [str(p.relative_to(tmp)) for p in files if p.suffix in PICKLE_SUFFIXES]
        if pickled:
            raise ArtifactError(f"encoder save wrote pickle-based file(s) {pickled} to {folder}; refusing to keep them")
        if not any(p.suffix == ".safetensors" for p in files):
            raise ArtifactError(f"encoder save wrote no .safetensors weights to {folder}")
        manifest["files"] = {str(p.relative_to(tmp)): sha256_file(p) for p in files}
        write_json_atomic(tmp / MANIFEST, manifest)
        old = None
        if folder.exists() and replace and any(folder.iterdir()):
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(old)
        elif folder.exists():
            folder.rmdir()  # empty (checked before training)
        tmp.rename(folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise



def encoder_build_key(stage, cfg: PipelineConfig, pipe=None) -> tuple[str, dict[str, Any]]:
    """``(build key, options)`` of the model ``stage``'s ``train`` table describes: the base model
    (and its own build key when ``funnel build`` trained it too), the options with their defaults,
    the item text and holdout split the config gives it, and the SHA-256 of the data files."""
    from stages.sentence_transformers import check_train_options

    from .artifacts import build_key

    options = check_train_options(stage.train, stage=stage.name)
    _, _, item_text, holdout = _pipeline_parts(cfg, stage, pipe)
    base = stage.clone(model=options["base_model"], train=None)
    catalog, judgments = cfg.data_path("catalog"), cfg.data_path("judgments")
    for what, path in (("catalog", catalog), ("judgments", judgments)):
        if not path.is_file():
            raise DataError(f"stage '{stage.name}': training its model needs the [data] {what} file {path}, "
                            "which does not exist")
    key = build_key(stage=stage.name, kind=MANIFEST_KIND, options=options, base_model_key=base.model_build_key(),
                    item_text=item_text, holdout=list(holdout), catalog=sha256_file(catalog),
                    judgments=sha256_file(judgments))
    return key, options


def build_encoder(stage, ctx, *, check_only: bool = False) -> str:
    """``funnel build`` of an encode stage with a ``train`` table: train ``stage.model`` when it is
    missing, stale (another build key) or ``ctx.force``; keep a folder ``funnel build`` did not
    write. With ``check_only``, only fail early (missing data, the ``train`` extra) when training
    is due. Returns the build's one-line summary."""
    from .artifacts import read_manifest
    from .extras import TRAIN_MODULES, require_extra

    folder = stage.resolve_path(stage.model)
    key, options = encoder_build_key(stage, ctx.config, ctx.pipeline)
    manifest = read_manifest(folder, what=f"stage '{stage.name}' model") if (folder / MANIFEST).is_file() else None
    if folder.exists() and not ctx.force and (manifest is None or manifest.get("built_by") != BUILT_BY):
        if check_only:
            return ""
        return (f"{stage.name}: kept {folder}: `funnel build` did not write it (trained by hand or copied in), so it "
                "is not retrained from the 'train' table; --force retrains it, or remove the folder")
    if manifest is not None and manifest.get("build_key") == key and not ctx.force:
        return "" if check_only else f"{stage.name}: up to date ({folder})"
    why = ("--force" if ctx.force else "missing" if not folder.exists()
           else "stale: its training data or settings changed")
    require_extra("train", TRAIN_MODULES,
                  needed_by=f"funnel build (stage '{stage.name}' must train its model {stage.model!r}: {why})")
    if check_only:
        return ""
    label = f"{stage.name} [train {Path(stage.model).name}] "
    ctx.log(f"{stage.name}: training {folder} ({why}) from {options['base_model']!r} on "
            f"{ctx.config.data_path('judgments').name}: {options['epochs']:g} epoch(s) in {TRAIN_STEPS} steps")
    result = train_encoder(
        ctx.config, out=folder, replace=True, build_key=key, stage=stage, base_model=options["base_model"],
        progress=ctx.progress, log=ctx.log, label=label,
        **{k: v for k, v in options.items() if k not in ("base_model", "val_items")},
        val_items=options["val_items"] or None)
    return (f"{stage.name}: trained {folder} in {result.train_minutes:.1f} min; validation NDCG@10 "
            f"{result.base_val_ndcg:.4f} (base) -> {result.val_ndcg:.4f}")
