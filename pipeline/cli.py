"""The ``funnel`` command line.

Every command prints one ``funnel: error: ...`` line and exits with status 2 on bad input
(no traceback unless ``--debug``). ``funnel validate`` also exits 3 (warn) or 4 (fail) when the
data it checks exceeds a limit.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import click

from .errors import DeviceError, FunnelError, FunnelWarning

DEVICE_CHOICE = click.Choice(["cpu", "cuda", "auto"])


class _Group(click.Group):
    """The top-level group: every failure becomes one ``funnel: error:`` line (see the module docstring)."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.ClickException as exc:
            raise _shown_on_one_line(exc)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FunnelError as exc:
            if (ctx.obj or {}).get("debug"):
                raise
            click.echo(f"funnel: error: {_one_line(exc)}", err=True)
            sys.exit(2)
        except click.ClickException as exc:  # a bad option or argument: click's usage errors
            raise _shown_on_one_line(exc)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except OSError as exc:
            if (ctx.obj or {}).get("debug"):
                raise
            if exc.filename is None:
                raise _bug(exc)
            # a file or folder the user named cannot be read or written (a path under /proc, no permission ...)
            path = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else exc.filename
            click.echo(f"funnel: error: cannot use {path}: {exc.strerror or type(exc).__name__} "
                       "(run with --debug for the traceback)", err=True)
            sys.exit(2)
        except Exception as exc:  # an unexpected failure: one line, the traceback with --debug
            if (ctx.obj or {}).get("debug"):
                raise
            raise _bug(exc)


def _bug(exc: BaseException) -> SystemExit:
    click.echo(f"funnel: error: {type(exc).__name__}: {_one_line(exc)} (run with --debug for the traceback)", err=True)
    return SystemExit(1)


def _shown_on_one_line(exc: click.ClickException) -> click.ClickException:
    """``exc`` printed as one ``funnel: error:`` line naming the command and pointing at its ``--help``,
    instead of click's usage block (its exit status stays: 2 for usage errors)."""
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):  # a bare `funnel train`: the help is the answer
        return exc
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else "funnel"

    def show(file=None) -> None:
        click.echo(f"funnel: error: {command}: {_one_line(exc.format_message())} (see '{command} --help')",
                   file=file, err=file is None)

    exc.show = show
    return exc


def _one_line(exc: BaseException | str) -> str:
    """The message on one line (library errors quoted inside ours may span several).

    Flushes stdout first, so the error is the last line even when stdout is a buffered pipe.
    """
    sys.stdout.flush()
    return " ".join(str(exc).split())


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
    warnings.showwarning = _show_warning
    # torch, faiss and LightGBM each bring an OpenMP thread pool; with the default (active) wait
    # policy the idle pool of one stage spins on the cores the next stage needs. Passive waiting
    # took the Home Depot pipeline from 316 to 436 queries/s on 2 cores (docs/benchmarks.md).
    # Read when the runtimes load, i.e. before the first stage imports torch or faiss; a value
    # set by the user wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


_library_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Funnel's own warnings as one ``funnel: warning:`` line; other libraries' as Python prints them."""
    if issubclass(category, FunnelWarning):
        click.echo(f"funnel: warning: {_one_line(str(message))}", err=True)
    else:
        _library_showwarning(message, category, filename, lineno, file, line)


def _progress(quiet: bool) -> bool:
    """``progress`` for a command's ``--quiet``; quiet also silences the libraries' own bars
    (transformers' "Loading weights", Hugging Face downloads)."""
    if quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub and transformers load
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        if "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
    return not quiet


def _check_device(device: str | None, pipe=None) -> None:
    """``--device cuda``, or a stage of ``pipe`` configured with ``device = "cuda"``, on a machine
    without CUDA fails before any work, not after the first model loaded."""
    from .device import cuda_available, resolve_device

    if device == "cuda" and not cuda_available():
        raise DeviceError("--device cuda: torch sees no CUDA device (a CPU-only torch, or no GPU visible); "
                          "use --device cpu or --device auto")
    for stage in pipe.stages if pipe is not None else ():
        if getattr(stage, "device", None) == "cuda":
            resolve_device("cuda", stage=stage.name, supported=stage.tags.devices)  # the error warm_up would raise


VERSION_HELP = ("Artifact version: replaces {version} in the config's artifact paths (default: [pipeline] version). "
                "Earlier versions stay on disk, so running with an older one rolls back.")


def _load(config: Path, version: str | None = None, logs: Path | None = None):
    """CONFIG with --version and --logs applied."""
    from .config import load_config

    cfg = load_config(config)
    if version is not None:
        if not cfg.uses_version():
            raise click.UsageError(f"--version needs artifact paths containing {{version}} in {config}")
        cfg.version = version
    if logs is not None:
        if not logs.exists():
            raise click.UsageError(f"--logs: file {logs} does not exist")
        cfg.data["logs"] = str(logs.resolve())
    return cfg


@main.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Rebuild every artifact even when its inputs are unchanged.")
@click.option("--logs", type=click.Path(dir_okay=False, path_type=Path),
              help="Interaction logs (user_id, items) to learn from instead of [data] logs: new interactions "
                   "rebuild the association index, popularity and ranker.")
@click.option("--version", "version", help=VERSION_HELP)
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where a ranker's training candidates are generated: local: this process; ray: Ray Data "
                   "actors, as `funnel run --engine ray` (pip install 'funnel-rank[ray]').")
@click.option("--address", help="Ray cluster to join (e.g. ray://head:10001 or auto); default: start a local Ray.")
@click.option("--actors", type=click.IntRange(min=1), help="Ray engine: pipeline actors (default as `funnel run`).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def build(config: Path, force: bool, logs: Path | None, version: str | None, engine: str, address: str | None,
          actors: int | None, quiet: bool) -> None:
    """Build every artifact CONFIG needs (fine-tuned encoder, item snapshot, embeddings + index,
    trained ranker), in stage order, printing what each stage builds.

    Idempotent: artifacts whose inputs and parameters are unchanged are kept. With artifact
    paths containing {version}, `--logs NEW.parquet --version v2` builds a new version from new
    interactions next to the old one; `funnel run --version v2` uses it, `--version v1` rolls back.
    """
    from .build import build_artifacts

    if engine == "local" and (address is not None or actors is not None):
        raise click.UsageError("--address and --actors need --engine ray")
    if engine == "ray":
        from .extras import require_extra

        require_extra("ray", ["ray", "ray.data"], needed_by="--engine ray")
    build_artifacts(_load(config, version, logs), force=force, progress=_progress(quiet), engine=engine,
                    ray_options={"address": address, "actors": actors})


@main.group()
def train() -> None:
    """Train one model of a pipeline."""


@train.command("ranker")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Retrain even when judgments and upstream are unchanged.")
@click.option("--version", "version", help=VERSION_HELP)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train_ranker(config: Path, force: bool, version: str | None, quiet: bool) -> None:
    """Train the LightGBM ranker of CONFIG from its [data] judgments (split by query), or from
    next-item targets of its [data] logs (each user's last item) when it has no judgments.

    Artifacts the ranker depends on (index, item snapshot) are built first if needed.
    """
    from .build import build_artifacts

    cfg = _load(config, version)
    if not any(s.name.startswith("rank.") for s in cfg.build().stages):
        raise click.UsageError(f"{config} has no rank.* stage")
    build_artifacts(cfg, progress=_progress(quiet), only=lambda s: not s.name.startswith("rank."))
    build_artifacts(cfg, force=force, progress=_progress(quiet), only=lambda s: s.name.startswith("rank."))


@train.command("encoder")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path),
              help="New model folder (must not exist). Default: artifacts/encoder/vN next to CONFIG (N: next version).")
@click.option("--epochs", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Epochs over the training pairs (fractions allowed); early stopping may end sooner.")
@click.option("--device", type=DEVICE_CHOICE, help="Training device (default: the encode stage's `device`).")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=2),
              help="Pairs per batch; every other pair's item is an in-batch negative.")
@click.option("--lr", "learning_rate", default=5e-5, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Peak learning rate (AdamW, linear warm-up over 10% of the steps).")
@click.option("--max-seq-length", default=32, show_default=True, type=click.IntRange(min=1),
              help="Tokens per text while training; saved with the model.")
@click.option("--max-pairs", type=click.IntRange(min=2), help="Train on a random sample of this many pairs.")
@click.option("--min-positive", default=2.33, show_default=True,
              help="Judged relevance at or above which an item is a positive.")
@click.option("--mine-depth", default=50, show_default=True, type=click.IntRange(min=0),
              help="Base-model hits per query to mine hard negatives from when none is judged (0: no mining).")
@click.option("--valid-fraction", default=0.1, show_default=True,
              type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Share of the training queries kept aside for validation (split by query-id hash).")
@click.option("--val-items", default=10_000, show_default=True, type=click.IntRange(min=0),
              help="Catalog items retrieved over for validation (judged ones always in; 0 = the whole catalog).")
@click.option("--evals-per-epoch", default=2, show_default=True, type=click.IntRange(min=1),
              help="Validation runs per epoch (each one a checkpoint candidate).")
@click.option("--patience", default=2, show_default=True, type=click.IntRange(min=1),
              help="Stop after this many validations without a better NDCG@10.")
@click.option("--seed", default=0, show_default=True, help="Seed of sampling and training.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train_encoder(config: Path, out: Path | None, epochs: float, device: str | None, batch_size: int,
                  learning_rate: float, max_seq_length: int, max_pairs: int | None, min_positive: float,
                  mine_depth: int, valid_fraction: float, val_items: int, evals_per_epoch: int, patience: int,
                  seed: int, quiet: bool) -> None:
    """Fine-tune the sentence-transformers encoder of CONFIG on its [data] judgments and catalog.

    Contrastive training (MultipleNegativesRankingLoss: in-batch negatives plus one hard negative
    per pair, judged-irrelevant items first, then items mined with the base model) on the
    queries the ranker does not hold out; a validation split of them picks the best checkpoint
    by retrieval NDCG@10. Writes a new versioned folder (safetensors + manifest.json); use it
    with `model = "artifacts/encoder/vN"` in the encode stage (and a new index folder).
    Needs the `train` extra (datasets, accelerate): pip install -e ".[train]".

    To have `funnel build` train the encoder instead (when missing, or when the data or the
    settings changed), give the encode stage a `train` table with these options, e.g.
    `params = { model = "artifacts/encoder/v1", train = { epochs = 1 } }`.
    """
    from .config import load_config
    from .extras import TRAIN_MODULES, require_extra

    require_extra("train", TRAIN_MODULES, needed_by="funnel train encoder")
    from .train_encoder import train_encoder as train

    cfg = load_config(config)
    result = train(cfg, out=out, epochs=epochs, device=device, batch_size=batch_size, learning_rate=learning_rate,
                   max_seq_length=max_seq_length, max_pairs=max_pairs, min_positive=min_positive,
                   mine_depth=mine_depth, valid_fraction=valid_fraction, val_items=val_items or None,
                   evals_per_epoch=evals_per_epoch, patience=patience, seed=seed, progress=_progress(quiet), log=click.echo)
    base = (cfg.base_dir or Path.cwd()).resolve()
    shown = result.folder.relative_to(base) if base in result.folder.parents else result.folder
    click.echo(f"validation NDCG@10 {result.base_val_ndcg:.4f} (base) -> {result.val_ndcg:.4f}; "
               f"{result.minutes_per_epoch:.1f} min/epoch\nuse it in the encode stage: model = \"{shown}\"")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--queries", "-q", required=True, type=click.Path(path_type=Path),
              help="Parquet file or folder of shards with query_id and query (or history).")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="Output: a .parquet file, or a folder that receives shards part-00000.parquet, part-00001...")
@click.option("--top", type=click.IntRange(min=1), help="Candidates per query to write (overrides the display stage).")
@click.option("--device", type=DEVICE_CHOICE, help="Device for every stage that has a `device` parameter.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Queries per batch (default: config's or 256).")
@click.option("--strict", is_flag=True, help="Fail on the first row a stage cannot process instead of quarantining it.")
@click.option("--explain", type=click.IntRange(min=1), is_flag=False, flag_value=5, default=None,
              help="Add an `explanation` column: the N (default 5) features that moved each item's ranker score "
                   "most, plus the rest and bias (LightGBM TreeSHAP; costs about one more scoring pass per tree level).")
@click.option("--shard-rows", type=click.IntRange(min=1),
              help="Queries per output shard and unit of resumption (default 50000 locally, 16 batches on Ray; "
                   "rounded up to whole batches).")
@click.option("--overwrite", is_flag=True, help="Discard a finished or unfinished earlier run into OUT and start over.")
@click.option("--lock", "lock", type=click.Path(dir_okay=False, path_type=Path),
              help="A lock file of an earlier run (OUT/_funnel.lock.json or x.lock.json): refuse to run unless the "
                   "pipeline, its artifacts and the library versions match it.")
@click.option("--skip-bad-shards", is_flag=True,
              help="Skip query shards that are not readable Parquet or lack needed columns; list them in the "
                   "quarantine file instead of failing.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process, resumable. ray: Ray Data actors (pip install 'funnel-rank[ray]').")
@click.option("--address", help="Ray cluster to join (e.g. ray://head:10001 or auto); default: start a local Ray.")
@click.option("--actors", type=click.IntRange(min=1), help="Ray engine: pipeline actors (default: one per GPU when stages run on CUDA, else one per CPU "
                   "of the cluster but one, at least 1).")
@click.option("--version", "version", help=VERSION_HELP)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def run(config: Path, queries: Path, out: Path, top: int | None, device: str | None, batch_size: int | None,
        strict: bool, explain: int | None, shard_rows: int | None, overwrite: bool, lock: Path | None,
        skip_bad_shards: bool, engine: str, address: str | None, actors: int | None, version: str | None,
        quiet: bool) -> None:
    """Batch candidate generation: run CONFIG over every query and write ranked candidates.

    OUT has one row per shown candidate: query_id, item_id, rank (1-based), score, plus
    provenance columns (source, recall_score, recall_rank, ...). OUT is a folder of shards
    (part-NNNNN.parquet) or one .parquet file; a lock file (resolved config, artifact hashes,
    library versions) is written next to it when the run completes.

    Resumable: rerun the same command after a crash or kill to continue where it stopped; a
    finished run is not redone (--overwrite to force); a changed config, artifact or input
    refuses to resume into the old output.
    """
    if engine == "local" and (address is not None or actors is not None):
        raise click.UsageError("--address and --actors need --engine ray")
    if engine == "ray":
        from .extras import require_extra

        require_extra("ray", ["ray", "ray.data"], needed_by="--engine ray")
    _check_device(device)
    cfg = _load(config, version)
    pipe = cfg.build().with_device(device)
    _check_device(None, pipe)
    if top is not None:
        pipe = pipe.with_top(top)
    if explain is not None:
        pipe = _with_explain(pipe, explain)
    common = dict(batch_size=batch_size or cfg.batch_size or 256, progress=_progress(quiet), strict=strict,
                  shard_rows=shard_rows, overwrite=overwrite, skip_bad_shards=skip_bad_shards, lock=lock,
                  name=cfg.name, inputs=cfg.inputs)
    if engine == "ray":
        from .ray_engine import run_on_ray

        summary = run_on_ray(pipe, queries, out, address=address, actors=actors, **common)
    else:
        from .runner import run_to_parquet

        summary = run_to_parquet(pipe, queries, out, **common)
    if summary.skipped:
        click.echo(f"{summary.out} is complete ({summary.rows} rows for {summary.queries} queries, lock "
                   f"{summary.lock}); nothing to do (--overwrite to run again)")
        return
    resumed = f", resumed after {summary.resumed_units} of {summary.units} shards" if summary.resumed_units else ""
    if not summary.processed:
        timing = "no query to run"
    elif summary.load_seconds:
        timing = (f"loading {summary.load_seconds:.1f} s, then {summary.processed} queries in "
                  f"{summary.seconds - summary.load_seconds:.1f} s: {summary.queries_per_s:.1f} queries/s")
    else:  # the Ray engine loads models inside its actors: start-up is in the time
        timing = f"{summary.queries_per_s:.1f} queries/s including start-up"
    click.echo(f"wrote {summary.rows} rows for {summary.queries} queries to {summary.out} with the {summary.engine} "
               f"engine in {summary.seconds:.1f} s ({timing}{resumed}); lock: {summary.lock}")
    if summary.quarantined:
        click.echo(f"quarantined {summary.quarantined} row(s) that could not be processed: {summary.quarantine}")
    if summary.bad_shards:
        click.echo(f"skipped {len(summary.bad_shards)} bad query shard(s), listed in {summary.quarantine}: "
                   + "; ".join(summary.bad_shards))
    if summary.stages:
        from .stage import stage_table

        click.echo(stage_table(summary.stages))


def _with_explain(pipe, n: int):
    from .stage import Pipeline

    if not any("explain" in s.get_params() for s in pipe.stages):
        raise click.UsageError("--explain needs a stage with an `explain` parameter (rank.lightgbm) in the pipeline")
    return Pipeline([s.clone(explain=n) if "explain" in s.get_params() else s for s in pipe.stages], inputs=pipe.inputs)


@main.command("eval")
@click.option("--run", "run_path", type=click.Path(path_type=Path), help="Output of `funnel run`.")
@click.option("--funnel", "funnel_config", type=click.Path(dir_okay=False, path_type=Path),
              help="Instead of --run: run this CONFIG on --queries and report recall after every stage, which "
                   "stage lost each relevant item, and recall by query rarity (long tail).")
@click.option("--queries", "-q", type=click.Path(path_type=Path), help="Queries for --funnel (Parquet file or folder).")
@click.option("--judgments", "-j", required=True, type=click.Path(path_type=Path),
              help="Parquet with query_id, item_id (or product_id), relevance.")
@click.option("--k", "ks", multiple=True, type=click.IntRange(min=1), default=(10, 100), show_default=True,
              help="Cut-offs (repeatable).")
@click.option("--relevant-threshold", type=float,
              help="Relevance at or above which a judged item counts as relevant (recall, MRR, MAP). "
                   "Default: from the label scale: 1 for 0/1 and 0-based grades, 2.67 for 1-3 grades.")
@click.option("--gain-offset", type=float,
              help="NDCG gain = relevance - offset. Default: from the label scale: 0 for 0/1 and 0-based "
                   "grades, 1 for 1-3 grades.")
@click.option("--all-judged", is_flag=True,
              help="Average over every judged query, a judged query missing from the run scoring 0 "
                   "(default: over the judged queries the run covers).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the metrics as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar (--funnel).")
def eval_(run_path: Path | None, funnel_config: Path | None, queries: Path | None, judgments: Path,
          ks: tuple[int, ...], relevant_threshold: float | None, gain_offset: float | None, all_judged: bool,
          json_out: Path | None, quiet: bool) -> None:
    """NDCG@k, Recall@k, Precision@k, MRR and MAP of a run against graded judgments.

    The label scale (0/1, 1-3 grades, 0-based grades) is read from the judgments and sets the
    NDCG gain and the relevance threshold unless --gain-offset/--relevant-threshold are given;
    other scales need both. Metrics are averaged over the judged queries the run covers (a run on
    part of the queries), and the output says how many that is; --all-judged counts every judged
    query, those missing from the run as 0.

    With --funnel CONFIG --queries Q: a per-stage recall funnel instead (see pipeline/funnel_eval.py):
    recall@k after each stage, every lost relevant item blamed on a stage (not retrieved, filtered,
    ranked below the cut), and recall per quartile of the queries' rarest-term catalog frequency.
    """
    from .data import open_dataset, read_parquet
    from .errors import DataError
    from .metrics import LabelScale, evaluate, label_scale

    if (run_path is None) == (funnel_config is None):
        raise click.UsageError("give exactly one of --run RUN and --funnel CONFIG")
    judged = read_parquet(judgments, what="judgments")
    scale = None
    if gain_offset is None or relevant_threshold is None:
        if "relevance" not in judged.column_names:
            raise DataError(f"eval: judgments file {judgments} needs a 'relevance' column; it has: "
                            f"{', '.join(judged.column_names)}")
        try:
            scale = label_scale(judged.column("relevance"), what=f"judgments file {judgments}")
        except DataError as exc:
            raise DataError(f"eval: {exc}") from exc
        gain_offset = scale.gain_offset if gain_offset is None else gain_offset
        relevant_threshold = scale.relevant_threshold if relevant_threshold is None else relevant_threshold
    used = LabelScale(scale.name if scale else "given", gain_offset, relevant_threshold)
    click.echo(used.describe() + ("" if scale is None else " (set --gain-offset/--relevant-threshold to change)"))
    if funnel_config is not None:
        if queries is None:
            raise click.UsageError("--funnel needs --queries")
        _funnel(funnel_config, queries, judged, ks, relevant_threshold, json_out, quiet)
        return

    run_table = open_dataset(run_path).to_table()
    order = "score"
    if "rank" in run_table.column_names:  # the shown order, which caps and de-duplication may set
        import pyarrow.compute as pc

        run_table, order = run_table.append_column("__order", pc.negate(run_table.column("rank"))), "__order"
    try:
        metrics = evaluate(run_table, judged, k_values=ks, score_col=order, gain_offset=gain_offset,
                           relevant_threshold=relevant_threshold, queries="judged" if all_judged else "run")
    except DataError as exc:
        raise DataError(f"eval: {exc} (run {run_path}, judgments {judgments})") from exc
    judged_n, covered = metrics["queries_judged"], metrics["queries_in_run"]
    if covered == 0:
        raise DataError(f"eval: the run {run_path} covers none of the {judged_n} judged queries in {judgments}; "
                        "are the query_id values the same?")
    if metrics["queries"] == 0 and metrics["queries_relevant"] == 0:
        raise DataError(f"eval: no judged item of the evaluated queries has relevance above --gain-offset "
                        f"{gain_offset:g} or at least --relevant-threshold {relevant_threshold:g}, so every metric "
                        f"would be NaN; check the label scale of {judgments}")
    over = f"all {judged_n} judged queries (those missing from the run score 0)" if all_judged else \
        f"those {covered}" + ("" if covered == judged_n else " (--all-judged: over all, the others scoring 0)")
    click.echo(f"the run covers {covered} of the {judged_n} judged queries; metrics over {over}")
    for name, value in metrics.items():
        click.echo(f"{name:>16}  {value:.4f}" if isinstance(value, float) else f"{name:>16}  {value}")
    if json_out:
        json_out.write_text(json.dumps(metrics, indent=2) + "\n")


def _funnel(config: Path, queries: Path, judgments, ks: tuple[int, ...], relevant_threshold: float,
            json_out: Path | None, quiet: bool) -> None:
    import pyarrow.parquet as pq

    from .config import load_config
    from .funnel_eval import funnel_eval

    cfg = load_config(config)
    titles = None  # the long-tail view needs the catalog's titles
    if "catalog" in cfg.data and cfg.data_path("catalog").exists():
        path = cfg.data_path("catalog")
        if "title" in pq.read_schema(path).names:
            titles = pq.read_table(path, columns=["title"]).column("title").to_pylist()
    report = funnel_eval(cfg.build(), queries, judgments, ks=ks, relevant_threshold=relevant_threshold,
                         batch_size=cfg.batch_size or 256, progress=_progress(quiet), catalog_texts=titles)
    click.echo(report.to_text())
    if json_out:
        json_out.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")


class _ValidateCommand(click.Command):
    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from .validate import describe_thresholds

        with formatter.section("Checks (name, default limits, what it measures)"):
            formatter.write_text("\b\n" + describe_thresholds())
        formatter.write_paragraph()
        formatter.write_text("Exit codes: 0 pass, 3 warn, 4 fail (a limit exceeded), 2 the file could not be "
                             "checked (missing, not Parquet, unknown kind, bad thresholds), 1 an unexpected error.")


@main.command(cls=_ValidateCommand)
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--kind", type=click.Choice(["auto", "catalog", "judgments", "interactions", "sequences"]),
              default="auto", show_default=True, help="What PATH holds; auto guesses from its columns.")
@click.option("--items", "--catalog", "items", type=click.Path(dir_okay=True, path_type=Path),
              help="Catalog (item_id or product_id) that judgments, interactions or sequences must refer to.")
@click.option("--vector-column", "vector_columns", multiple=True, metavar="COLUMN",
              help="Catalog column that must hold a vector per item (repeatable); lists of floats are checked as "
                   "vectors anyway: dimension, NaN/inf, zero and odd norms, items without one.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for report.json, report.md and PNG plots.")
@click.option("--thresholds", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML file of limits, one table per check: [null_share] warn = 0.3, fail = 0.9 (false: off).")
@click.option("--max-null-share", type=click.FloatRange(0, 1), help="Fail when a column has more nulls than this share.")
@click.option("--max-duplicate-share", type=click.FloatRange(0, 1),
              help="Fail above this share of repeated ids (catalog, sequences) or repeated rows (judgments, interactions).")
@click.option("--max-near-duplicate-share", type=click.FloatRange(0, 1), help="Fail above this share of near-duplicate titles.")
@click.option("--max-outlier-share", type=click.FloatRange(0, 1), help="Fail above this share of outliers in a numeric column.")
@click.option("--max-encoding-share", type=click.FloatRange(0, 1), help="Fail above this share of badly encoded text values.")
@click.option("--max-unknown-share", type=click.FloatRange(0, 1), help="Fail above this share of references to unknown items.")
@click.option("--max-no-relevant-share", type=click.FloatRange(0, 1), help="Fail above this share of queries with no relevant item.")
@click.option("--max-imbalance", type=click.FloatRange(min=1), help="Fail above this relevant/not-relevant count ratio.")
@click.option("--relevant-threshold", default=2.67, show_default=True, help="Relevance at or above which a judgment is relevant.")
@click.option("--all", "all_checks", is_flag=True, help="List every check, not only those that warn or fail.")
@click.pass_context
def validate(ctx: click.Context, path: Path, kind: str, items: Path | None, vector_columns: tuple[str, ...],
             report_dir: Path | None,
             thresholds: Path | None, max_null_share, max_duplicate_share, max_near_duplicate_share, max_outlier_share,
             max_encoding_share, max_unknown_share, max_no_relevant_share, max_imbalance, relevant_threshold: float,
             all_checks: bool) -> None:
    """Data-quality report on a catalog, judgments, interactions or sequences (Parquet file or folder).

    Checks nulls, duplicate and near-duplicate records, outliers, text encoding, mixed units,
    labels, unknown item ids and a catalog's vector columns, prints a summary and (with --report) writes JSON, Markdown and
    plots. Each check has a warn and a fail limit (listed below); --max-* options set fail limits.
    """
    from .validate import DEFAULT_THRESHOLDS, load_thresholds, validate_file, with_fail_limits

    limits = load_thresholds(thresholds) if thresholds else dict(DEFAULT_THRESHOLDS)
    limits = with_fail_limits(
        limits, null_share=max_null_share, duplicate_id_share=max_duplicate_share, duplicate_row_share=max_duplicate_share,
        near_duplicate_title_share=max_near_duplicate_share, outlier_share=max_outlier_share,
        encoding_share=max_encoding_share, unknown_item_share=max_unknown_share,
        no_relevant_query_share=max_no_relevant_share, label_imbalance=max_imbalance)
    report = validate_file(path, kind, items=items, thresholds=limits, relevant_threshold=relevant_threshold,
                           vector_columns=vector_columns)
    click.echo(report.summary(all_checks=all_checks))
    if report_dir is not None:
        written = report.write(report_dir)
        click.echo(f"report: {written[1]} ({len(written) - 2} plot(s), JSON in {written[0].name})")
    ctx.exit(report.exit_code)


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

    _check_device(device)
    run_demo(workdir, n_items=items, n_queries=queries, seed=seed, device=device, progress=_progress(quiet),
             echo=click.echo)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--queries", "-q", required=True, type=click.Path(path_type=Path),
              help="Parquet file or folder of shards with the pipeline's input columns (query_id, query ...).")
@click.option("--judgments", "-j", type=click.Path(path_type=Path),
              help="Graded judgments (query_id, item_id or product_id, relevance): adds recall@k per stage and NDCG.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for report.json, report.md and the PNG plots.")
@click.option("--device", type=DEVICE_CHOICE, help="Device for every stage that has a `device` parameter.")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1), help="Timed passes over the queries.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(min=0), help="Untimed passes first.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Queries per batch (default: config's or 256).")
@click.option("--top", type=click.IntRange(min=1), help="Candidates shown per query (overrides the display stage).")
@click.option("--max-queries", type=click.IntRange(min=1), help="Use only the first N queries.")
@click.option("--bare/--no-bare", default=None,
              help="Time the bare-library baseline (pipeline/bench/bare.py) interleaved and report overhead_ratio "
                   "[default: when it covers the config].")
@click.option("--encoder-texts", default=2000, show_default=True, type=click.IntRange(min=0),
              help="Texts per set (queries, item texts) for the encoder comparison; 0 skips it.")
@click.option("--sweep", is_flag=True,
              help="Also sweep index types and efSearch/nprobe, candidates k and batch size; Pareto plots.")
@click.option("--ann-size", default=0, show_default=True, type=click.IntRange(min=0),
              help="Also compare recall.faiss with faiss and hnswlib on N synthetic clustered vectors (0: off).")
@click.option("--ann-dim", default=384, show_default=True, type=click.IntRange(min=2), help="Dimension of those vectors.")
@click.option("--threads", type=click.IntRange(min=1), help="Pin torch and faiss to N threads (default: theirs).")
@click.option("--set", "overrides", multiple=True, metavar="TYPE.PARAM=VALUE",
              help="Replace a stage parameter for this run (repeatable), e.g. encode.sentence_transformers.precision=bf16; "
                   "the bare baseline gets the same.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def bench(config: Path, queries: Path, judgments: Path | None, out: Path, device: str | None, repeats: int, warmup: int,
          batch_size: int | None, top: int | None, max_queries: int | None, bare: bool | None, encoder_texts: int,
          sweep: bool, ann_size: int, ann_dim: int, threads: int | None, overrides: tuple[str, ...], quiet: bool) -> None:
    """Latency, throughput and recall of CONFIG per stage; overhead against the bare libraries.

    Runs the pipeline over QUERIES with warm-up and repeated timed passes and writes
    OUT/report.json, OUT/report.md and PNG plots: per stage rows in/out, p50/p95/p99 ms per batch
    and per query, rows/s, recall@k against --judgments and, for FAISS stages, recall against
    exact search; end to end queries/s, one-query latency, peak memory; the machine fingerprint.
    The bare-library baseline and the encoder comparison run in the same process, interleaved.
    Compare timings only within one report: other load on the machine shifts them all.
    """
    from .bench import BenchOptions, parse_override, run_bench
    from .extras import require_extra

    require_extra("bench", ["matplotlib"], needed_by="funnel bench (its plots)")
    _check_device(device)
    params: dict[str, dict] = {}
    for text in overrides:
        stage, param, value = parse_override(text)
        params.setdefault(stage, {})[param] = value
    options = BenchOptions(queries=queries, out=out, judgments=judgments, device=device, repeats=repeats,
                           warmup=warmup, batch_size=batch_size, top=top, max_queries=max_queries, bare=bare,
                           encoder_texts=encoder_texts, sweep=sweep, ann_size=ann_size, ann_dim=ann_dim,
                           threads=threads, overrides=params or None, progress=_progress(quiet))
    report = run_bench(config, options, echo=click.echo)
    e, o = report["end_to_end"], report.get("overhead") or {}
    line = f"{e['queries']} queries: {e['queries_per_s']:.1f} queries/s, p50 {e['p50_ms']:.1f} ms per batch of {e['batch_size']}"
    if o.get("overhead_ratio") is not None:
        line += f"; overhead_ratio {o['overhead_ratio']:.3f} against the bare libraries"
    click.echo(line)
    click.echo(f"wrote {out / 'report.md'}, {out / 'report.json'} and {len(report.get('plots', []))} plot(s)")


@main.group()
def stages() -> None:
    """Inspect the stage registry (built-in and plug-in stages)."""


@stages.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def stages_list(as_json: bool) -> None:
    """Every installed stage: registry key, class, package and version, devices, input and output columns.

    A plug-in whose class cannot be imported is listed with the reason below its row.
    """
    from .registry import format_stage_list

    click.echo(format_stage_list(as_json=as_json))


@stages.command("show")
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def stages_show(key: str, as_json: bool) -> None:
    """Everything about stage KEY (e.g. filter.rules): package, devices, tags, docs, parameters
    with types, defaults and constraints, and the columns it needs, adds and drops."""
    from .registry import format_stage_details

    click.echo(format_stage_details(key, as_json=as_json))


@main.group()
def config() -> None:
    """Check and normalise config files."""


@config.command("check")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def config_check(path: Path) -> None:
    """Validate PATH (types, parameters, columns) and print it with every parameter explicit."""
    from .config import PipelineConfig, load_config

    click.echo(PipelineConfig.normalised(load_config(path)).to_toml(), nl=False)


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="funnel")
