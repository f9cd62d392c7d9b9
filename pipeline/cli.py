"""The ``funnel`` command line.

Every command prints one ``funnel: error: ...`` line and exits with status 2 on bad input
(no traceback unless ``--debug``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import FunnelError

DEVICE_CHOICE = click.Choice(["cpu", "cuda", "auto"])


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FunnelError as exc:
            if (ctx.obj or {}).get("debug"):
                raise
            click.echo(f"funnel: error: {exc}", err=True)
            sys.exit(2)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:  # an unexpected failure: one line, the traceback with --debug
            if (ctx.obj or {}).get("debug"):
                raise
            click.echo(f"funnel: error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="funnel-rank", prog_name="funnel")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Funnel: multi-stage retrieval and ranking (encode → recall → filter → rank → display).

    Start with `funnel demo`; then `funnel build CONFIG` and `funnel run CONFIG ...` on your own
    config (see examples/).
    """
    ctx.ensure_object(dict)["debug"] = debug


def _with_device(pipe, device: str | None):
    from .stage import Pipeline

    if device is None:
        return pipe
    stages = [s.clone(device=device) if "device" in s.get_params() and device in (("auto",) + s.tags.devices) else s
              for s in pipe.stages]
    return Pipeline(stages, inputs=pipe.inputs)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Rebuild every artifact even when its inputs are unchanged.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def build(config: Path, force: bool, quiet: bool) -> None:
    """Build every artifact CONFIG needs (item snapshot, embeddings + index, trained ranker).

    Idempotent: artifacts whose inputs and parameters are unchanged are kept.
    """
    from .build import build_artifacts
    from .config import load_config

    build_artifacts(load_config(config), force=force, progress=not quiet)


@main.group()
def train() -> None:
    """Train one model of a pipeline."""


@train.command("ranker")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Retrain even when judgments and upstream are unchanged.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train_ranker(config: Path, force: bool, quiet: bool) -> None:
    """Train the LightGBM ranker of CONFIG from its [data] judgments (split by query).

    Artifacts the ranker depends on (index, item snapshot) are built first if needed.
    """
    from .build import build_artifacts
    from .config import load_config

    cfg = load_config(config)
    if not any(s.name.startswith("rank.") for s in cfg.build().stages):
        raise click.UsageError(f"{config} has no rank.* stage")
    build_artifacts(cfg, progress=not quiet, only=lambda s: not s.name.startswith("rank."))
    build_artifacts(cfg, force=force, progress=not quiet, only=lambda s: s.name.startswith("rank."))


@main.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--queries", "-q", required=True, type=click.Path(path_type=Path),
              help="Parquet file or folder of shards with query_id and query (or history).")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="Output: a .parquet file, or a folder that receives part-00000.parquet.")
@click.option("--top", type=click.IntRange(min=1), help="Candidates per query to write (overrides the display stage).")
@click.option("--device", type=DEVICE_CHOICE, help="Device for every stage that has a `device` parameter.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Queries per batch (default: config's or 256).")
@click.option("--strict", is_flag=True, help="Fail on the first row a stage cannot process instead of quarantining it.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def run(config: Path, queries: Path, out: Path, top: int | None, device: str | None, batch_size: int | None,
        strict: bool, quiet: bool) -> None:
    """Batch candidate generation: run CONFIG over every query and write ranked candidates.

    OUT has one row per shown candidate: query_id, item_id, rank (1-based), score, plus
    provenance columns (source, recall_score, recall_rank, ...).
    """
    from .config import load_config
    from .runner import run_to_parquet

    cfg = load_config(config)
    pipe = _with_device(cfg.build(), device)
    if top is not None:
        pipe = pipe.with_top(top)
    summary = run_to_parquet(pipe, queries, out, batch_size=batch_size or cfg.batch_size or 256, progress=not quiet,
                             strict=strict)
    click.echo(f"wrote {summary.rows} rows for {summary.queries} queries to {summary.out} "
               f"in {summary.seconds:.1f} s ({summary.queries / max(summary.seconds, 1e-9):.1f} queries/s)")
    if summary.quarantined:
        click.echo(f"quarantined {summary.quarantined} row(s) that could not be processed: {summary.quarantine}")
    click.echo(_stage_table(summary.stages))


@main.command("eval")
@click.option("--run", "run_path", required=True, type=click.Path(path_type=Path), help="Output of `funnel run`.")
@click.option("--judgments", "-j", required=True, type=click.Path(path_type=Path),
              help="Parquet with query_id, item_id (or product_id), relevance.")
@click.option("--k", "ks", multiple=True, type=click.IntRange(min=1), default=(10, 100), show_default=True,
              help="Cut-offs (repeatable).")
@click.option("--relevant-threshold", default=2.67, show_default=True,
              help="Relevance at or above which a judged item counts as relevant (recall, MRR, MAP).")
@click.option("--gain-offset", default=1.0, show_default=True, help="NDCG gain = relevance - offset.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the metrics as JSON.")
def eval_(run_path: Path, judgments: Path, ks: tuple[int, ...], relevant_threshold: float, gain_offset: float,
          json_out: Path | None) -> None:
    """NDCG@k, Recall@k, Precision@k, MRR and MAP of a run against graded judgments."""
    from .data import open_dataset, read_parquet
    from .metrics import evaluate

    run_table = open_dataset(run_path).to_table()
    order = "score"
    if "rank" in run_table.column_names:  # the shown order, which caps and de-duplication may set
        import pyarrow.compute as pc

        run_table, order = run_table.append_column("__order", pc.negate(run_table.column("rank"))), "__order"
    metrics = evaluate(run_table, read_parquet(judgments, what="judgments"), k_values=ks, score_col=order,
                       gain_offset=gain_offset, relevant_threshold=relevant_threshold)
    for name, value in metrics.items():
        click.echo(f"{name:>16}  {value:.4f}" if isinstance(value, float) else f"{name:>16}  {value}")
    if json_out:
        json_out.write_text(json.dumps(metrics, indent=2) + "\n")


@main.command()
@click.option("--workdir", default=Path("funnel-demo"), show_default=True, type=click.Path(path_type=Path),
              help="Where the generated data, config, artifacts and output go.")
@click.option("--items", default=3000, show_default=True, type=click.IntRange(min=50), help="Catalog size.")
@click.option("--queries", default=400, show_default=True, type=click.IntRange(min=10), help="Judged queries.")
@click.option("--seed", default=0, show_default=True, help="Seed of the generated data.")
@click.option("--device", type=DEVICE_CHOICE, help="Device for every stage that has one.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(workdir: Path, items: int, queries: int, seed: int, device: str | None, quiet: bool) -> None:
    """Generate a demo shop, build its pipeline, run it and report each stage.

    Needs no network and no external data: the catalog, queries and graded judgments are
    generated; the encoder is the bundled all-MiniLM-L6-v2.
    """
    from .demo import run_demo

    run_demo(workdir, n_items=items, n_queries=queries, seed=seed, device=device, progress=not quiet, echo=click.echo)


@main.group()
def stages() -> None:
    """Inspect the stage registry (built-in and plug-in stages)."""


@stages.command("list")
def stages_list() -> None:
    """Registry key and implementing class of every installed stage."""
    from .registry import available_stages

    for name, target in available_stages().items():
        click.echo(f"{name:<32} {target}")


@main.group()
def config() -> None:
    """Check and normalise config files."""


@config.command("check")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def config_check(path: Path) -> None:
    """Validate PATH (types, parameters, columns) and print it with every parameter explicit."""
    from .config import PipelineConfig, load_config

    click.echo(PipelineConfig.normalised(load_config(path)).to_toml(), nl=False)


def _stage_table(stats, recall: dict[int, float] | None = None) -> str:
    """Per-stage rows in/out and latency (and recall of relevant items, when given)."""
    import statistics

    head = f"{'step':<4} {'stage':<30} {'rows in':>9} {'rows out':>9} {'p50 ms/batch':>13} {'total s':>8}"
    if recall is not None:
        head += f" {'recall':>7}"
    lines = [head, "-" * len(head)]
    for i, s in enumerate(stats):
        p50 = statistics.median(s.seconds) * 1000 if s.seconds else 0.0
        line = f"{i + 1:<4} {s.name:<30} {s.rows_in:>9} {s.rows_out:>9} {p50:>13.2f} {s.total_seconds:>8.2f}"
        if recall is not None:
            line += f" {recall[i]:>7.3f}" if i in recall else f" {'':>7}"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    main()
