"""Leave-one-out validation of examples/beauty/pipeline.toml on the Amazon Beauty data.

Each user's last item in ``sequences_train.parquet`` is the target; everything the pipeline
learns (association index, popularity, ranker) and every query history use only the items
before it. The artifacts go to a version of their own (``artifacts/validation``), built with the
same code path as the feedback loop (``funnel build --logs ... --version ...``). Reported, over
all users, ranking over all items: Recall@10 (hit rate) and NDCG@10 for each recall source on
its own, for the fused candidates before ranking, and for the full pipeline.

    python examples/beauty/evaluate.py                  # all 22,363 users
    python examples/beauty/evaluate.py --users 2000     # a quick subset

The same split can be scored with the generic command, e.g.
``funnel eval --run artifacts/validation-data/recs.parquet --judgments artifacts/validation-data/targets.parquet
--k 10 --gain-offset 0 --relevant-threshold 1``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "pipeline.toml"


def split(logs: pl.DataFrame, folder: Path) -> dict[str, Path]:
    """Write the leave-one-out files: logs and queries without each user's last item, and targets."""
    folder.mkdir(parents=True, exist_ok=True)
    logs = logs.filter(pl.col("items").list.len() >= 2)
    prior = logs.with_columns(pl.col("items").list.head(pl.col("items").list.len() - 1))
    paths = {"logs": folder / "logs.parquet", "queries": folder / "queries.parquet", "targets": folder / "targets.parquet"}
    prior.write_parquet(paths["logs"])
    prior.select(pl.col("user_id").alias("query_id"), pl.col("items").alias("history")).write_parquet(paths["queries"])
    logs.select(pl.col("user_id").alias("query_id"), pl.col("items").list.last().alias("item_id"),
                pl.lit(1.0).alias("relevance")).write_parquet(paths["targets"])
    return paths


def hit_metrics(recs: pl.DataFrame, targets: pl.DataFrame, k: int = 10) -> dict[str, float]:
    """Recall@k (hit rate) and NDCG@k with one target per user, averaged over every user in ``targets``."""
    ranked = (recs.sort(["query_id", "rank"]).with_columns(pl.int_range(1, pl.len() + 1).over("query_id").alias("pos"))
              .filter(pl.col("pos") <= k))
    hits = targets.join(ranked, on=["query_id", "item_id"], how="inner")
    n = targets.height
    return {f"Recall@{k}": hits.height / n, f"NDCG@{k}": float((1 / np.log2(hits["pos"].to_numpy() + 1)).sum()) / n}


def run_batches(pipe, queries: pa.Table, desc: str, batch_size: int = 512) -> pl.DataFrame:
    from tqdm.auto import tqdm

    parts = []
    with tqdm(total=queries.num_rows, desc=desc, unit="user") as bar:
        for start in range(0, queries.num_rows, batch_size):
            batch = queries.slice(start, batch_size)
            parts.append(pl.from_arrow(pipe(batch).select(["query_id", "item_id", "rank"])))
            bar.update(batch.num_rows)
    return pl.concat(parts)


def evaluate(config: Path = CONFIG, *, users: int | None = None, catalog: Path | None = None, version: str = "validation",
             force: bool = False, log=print) -> dict[str, dict[str, float]]:
    """Build the validation version, run it, and score every recall source and the full pipeline."""
    from pipeline.build import build_artifacts
    from pipeline.config import load_config
    from pipeline.runner import run_to_parquet
    from pipeline.stage import Pipeline
    from stages.display import TopNDisplay
    from stages.history import HistoryFilter

    cfg = load_config(config)
    data = cfg.base_dir / "artifacts" / f"{version}-data"
    logs = pl.read_parquet(cfg.data_path("logs"))
    if users is not None:
        logs = logs.head(users)
    paths = split(logs, data)
    cfg.version, cfg.data["logs"] = version, str(paths["logs"])
    if catalog is not None:
        cfg.data["catalog"] = str(catalog)
    t0 = time.perf_counter()
    pipe = build_artifacts(cfg, force=force, log=log)
    log(f"built version {version!r} in {time.perf_counter() - t0:.0f} s")
    targets = pl.read_parquet(paths["targets"])
    queries = pq.read_table(paths["queries"])

    t0 = time.perf_counter()
    summary = run_to_parquet(pipe, paths["queries"], data / "recs.parquet", batch_size=cfg.batch_size or 512,
                             overwrite=True, name=cfg.name, inputs=cfg.inputs)
    seconds = time.perf_counter() - t0
    recs = pl.read_parquet(summary.out)
    report = {"full pipeline": hit_metrics(recs, targets)}

    fused = pipe.stages[0]
    top10 = [HistoryFilter(), TopNDisplay(n=10)]
    for name, _, source in fused._pipelines():
        report[f"source {name}"] = hit_metrics(run_batches(Pipeline(list(source.stages) + top10), queries, name), targets)
    fused_recs = run_batches(Pipeline([fused, HistoryFilter()]), queries, "fused candidates")
    report["fused (RRF, no ranker)"] = hit_metrics(fused_recs, targets)
    cut = fused_recs.group_by("query_id").len()["len"].max()
    report[f"candidates (fused top {cut})"] = hit_metrics(fused_recs, targets, k=int(cut))
    report["run"] = {"users": queries.num_rows, "seconds": round(seconds, 1),
                     "users/s": round(queries.num_rows / max(seconds, 1e-9), 1)}
    (data / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


@click.command()
@click.option("--config", default=CONFIG, show_default=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--users", type=click.IntRange(min=10), help="Validate on the first N users only (default: all).")
@click.option("--version", default="validation", show_default=True, help="Artifact version the validation builds.")
@click.option("--force", is_flag=True, help="Rebuild the validation artifacts even when unchanged.")
def main(config: Path, users: int | None, version: str, force: bool) -> None:
    """Leave-one-out validation: Recall@10 and NDCG@10 per recall source and for the full pipeline."""
    report = evaluate(config, users=users, version=version, force=force)
    for name, metrics in report.items():
        click.echo(f"{name:<32} " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in metrics.items()))


if __name__ == "__main__":
    main()
