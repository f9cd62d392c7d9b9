"""``funnel demo``: the whole pipeline on a generated shop, with a per-stage report."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import polars as pl

from .columns import QUERY_ID
from .config import PipelineConfig

__all__ = ["demo_config", "run_demo"]

RELEVANT = 2.67
#: The shown list's length, and the cut-off of the demo's per-stage recall.
CUT = 10


def demo_config() -> PipelineConfig:
    """The demo pipeline: every built-in stage, relative paths inside the demo folder."""
    return PipelineConfig(
        name="demo",
        inputs={"query_id": "any", "query": "string"},
        data={"catalog": "data/catalog.parquet", "judgments": "data/judgments.parquet"},
        stages=[
            {"type": "encode.sentence_transformers", "params": {}},
            {"type": "recall.faiss", "params": {"index": "artifacts/index", "k": 100, "factory": "HNSW32",
                                                "item_text": ["title", "brand"]}},
            {"type": "lookup.catalog", "params": {"items": "artifacts/items",
                                                  "columns": ["title", "brand", "color", "material", "price", "in_stock",
                                                              "popularity"]}},
            {"type": "filter.rules", "params": {"rules": [{"column": "in_stock", "op": "eq", "value": True},
                                                          {"column": "price", "op": "between", "max": 1000.0}]}},
            {"type": "features.text", "params": {"features": ["recall_score", "recall_rank", "overlap", "coverage",
                                                              "jaccard", "title_len", "query_len", "number_match",
                                                              "query_has_number", "brand_match", "color_match",
                                                              "material_match", "popularity"]}},
            {"type": "rank.lightgbm", "params": {"model": "artifacts/ranker", "n_estimators": 300}},
            {"type": "display.topn", "params": {"n": CUT, "cap_column": "brand", "cap": 4}},
        ],
    )


def run_demo(workdir: Path, *, n_items: int = 3000, n_queries: int = 400, seed: int = 0, device: str | None = None,
             progress: bool = True, echo: Callable[[str], None] = print) -> dict:
    """Generate data, write ``pipeline.toml``, build, run on the held-out queries, evaluate."""
    from .build import build_artifacts
    from .stage import stage_table
    from .config import load_config
    from .data import read_parquet
    from .demo_data import generate_demo_data
    from .funnel_eval import _Observer, _recall, _relevant  # the per-stage recall of `funnel eval --funnel`
    from .metrics import evaluate
    from .runner import run_to_parquet

    workdir = Path(workdir).resolve()
    echo(f"[1/4] generating a demo shop ({n_items} items, {n_queries} judged queries) in {workdir}/data")
    generate_demo_data(workdir / "data", n_items=n_items, n_queries=n_queries, seed=seed)
    config_path = workdir / "pipeline.toml"
    cfg = demo_config()
    cfg.save(config_path)
    cfg = load_config(config_path)

    echo(f"[2/4] building artifacts from {config_path} (index, item snapshot, ranker)")
    build_artifacts(cfg, progress=progress, log=lambda m: echo(f"      {m}"))

    ranker_dir = workdir / "artifacts" / "ranker"
    queries, judgments = ranker_dir / "holdout_queries.parquet", ranker_dir / "holdout_judgments.parquet"
    judged = read_parquet(judgments, what="judgments")
    relevant = _relevant(judged, RELEVANT)
    observer = _Observer(relevant, CUT)

    echo(f"[3/4] running on the {judged.column(QUERY_ID).unique().__len__()} held-out queries")
    pipe = load_config(config_path).build().with_device(device)
    out = workdir / "out" / "candidates.parquet"
    summary = run_to_parquet(pipe, queries, out, batch_size=64, progress=progress, observer=observer, overwrite=True)
    seen = {step: pl.concat(parts, how="diagonal_relaxed") for step, parts in observer.seen.items()}
    echo(stage_table(summary.stages, {
        "R@all": {step: _recall(relevant, hits) for step, hits in seen.items()},
        f"R@{CUT}": {step: _recall(relevant, hits.filter(pl.col("__pos") <= CUT)) for step, hits in seen.items()},
    }))
    echo(f"      R@{CUT}: for each of the {relevant[QUERY_ID].n_unique()} queries with a relevant judged item, the share "
         f"of its relevant items ({relevant.height} in all) in the first {CUT} rows after each stage (R@all: anywhere "
         f"in its output), averaged over the queries; the same measure as recall@{CUT} below")

    echo(f"[4/4] evaluating the shown top-{CUT} against the held-out judgments")
    metrics = evaluate(read_parquet(out, what="run"), judged, k_values=(CUT,))
    echo("      " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
    echo(f"wrote {summary.rows} rows for {summary.queries} queries to {out}")
    return {"metrics": metrics, "out": out, "summary": summary}
