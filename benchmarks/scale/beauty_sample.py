"""What sampling the ranker's training queries costs on Amazon Beauty (issue 20).

Run after ``python examples/beauty/evaluate.py`` (which writes the leave-one-out split to
``artifacts/validation-data``): for each ``max_train_queries`` given as a share of the training
users, a version ``validation-sample-<share>`` is built from the same split logs (association
and popularity as in ``validation``, the embeddings shared), all users are run and scored
exactly as evaluate.py scores the full pipeline.

    python benchmarks/scale/beauty_sample.py --share 0.25 --share 0.5
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import click
import polars as pl

ROOT = Path(__file__).resolve().parents[2]
BEAUTY = ROOT / "examples" / "beauty"


@click.command()
@click.option("--share", "shares", type=float, multiple=True, default=(0.25, 0.5), show_default=True)
@click.option("--version", default="validation", show_default=True)
def main(shares: tuple[float, ...], version: str) -> None:
    from pipeline.build import build_artifacts
    from pipeline.config import load_config
    from pipeline.data import next_item_targets, read_logs
    from pipeline.runner import run_to_parquet

    spec = importlib.util.spec_from_file_location("beauty_evaluate", BEAUTY / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    cfg = load_config(BEAUTY / "pipeline.toml")
    data = cfg.base_dir / "artifacts" / f"{version}-data"
    cfg.data["logs"] = str(data / "logs.parquet")
    training = next_item_targets(read_logs(cfg.data_path("logs")))[0].num_rows
    targets = pl.read_parquet(data / "targets.parquet")
    ranker = next(s for s in cfg.stages if s["type"] == "rank.lightgbm")
    results = {}
    for share in shares:
        ranker.setdefault("params", {})["max_train_queries"] = round(share * training)
        cfg.version = f"{version}-sample-{share}"
        pipe = build_artifacts(cfg, log=print)
        out = data / f"recs-sample-{share}.parquet"
        run_to_parquet(pipe, data / "queries.parquet", out, batch_size=cfg.batch_size or 512, overwrite=True,
                       name=cfg.name, inputs=cfg.inputs)
        metrics = evaluate.hit_metrics(pl.read_parquet(out), targets)
        manifest = json.loads((cfg.base_dir / "artifacts" / cfg.version / "ranker" / "manifest.json").read_text())
        results[share] = {**metrics, "train_queries": manifest["train_queries"], "train_rows": manifest["train_rows"]}
        print(f"share {share}: {json.dumps(results[share])}")
        (data / f"sample-{share}-metrics.json").write_text(json.dumps(results[share], indent=2) + "\n")


if __name__ == "__main__":
    main()
