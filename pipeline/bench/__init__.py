"""``funnel bench``: latency, throughput and quality of a pipeline, stage by stage.

A benchmark run answers four questions about one config on one machine, and writes the answers
to ``DIR/report.json``, ``DIR/report.md`` and PNG plots:

**How fast is each stage?** The queries are cut into batches of ``batch_size``; the pipeline
runs over all of them ``warmup`` times untimed, then ``repeats`` times timed. For every stage
the report gives the rows in and out of one pass, the 50th/95th/99th percentile of its
milliseconds per batch and per query (a batch's time divided by its queries), its rows per
second and its share of the pipeline's time; end to end, queries per second, the same
percentiles, the latency of one query sent alone, and the process' peak resident memory.

**How good is each stage?** With ``judgments``, every stage whose output has candidates is
scored by Recall@k against them (k = the most candidates a query has after that stage; metrics
from :mod:`pipeline.metrics`, i.e. ranx), and the final output by NDCG, Recall, MRR, MAP and
Precision. Every FAISS recall stage is also scored against exact search
(``ann_recall_at_k``): a ``faiss.IndexFlat`` of the index's metric over the vectors
reconstructed from the stored ``index.faiss``, compared with faiss' own
``knn_intersection_measure``.

**What does Funnel cost?** :mod:`pipeline.bench.bare` does the same work with the bare
libraries — sentence-transformers, ``faiss.read_index``,
``lightgbm.Booster(model_file=...)``, Polars — and no Funnel. Both run in this process,
interleaved batch by batch (alternating which goes first) so that a noisy machine slows both
alike; ``overhead_ratio`` is Funnel's total time over the bare one, and ``agreement`` the share
of queries for which both return the same top-N list. The encoder is compared the same way with
a bare fp32 ``SentenceTransformer.encode`` on the same texts (speed-up and cosine).

**What are the trade-offs?** With ``sweep``, search parameters and index types of each FAISS
stage (efSearch, nprobe, Flat / HNSW / IVF, and hnswlib on the same vectors when installed),
the candidates ``k`` of recall and the batch size are varied; each point records quality and
milliseconds per query, and only Pareto-best points are kept on the front (faiss'
``OperatingPoints``). With ``ann_size``, the same is done on a synthetic clustered vector set
of that size, comparing Funnel's ``recall.faiss`` stage with raw faiss and hnswlib.

Timings depend on the machine and on what else runs on it: the report carries a machine
fingerprint (CPU, cores, threads used, library versions, GPU and driver) and the load average
at start and end, and compares only numbers measured side by side in the same run. Nothing in
the tests asserts a timing.

The package is split by concern, and this module composes the parts in :func:`run_bench`:

* :mod:`~pipeline.bench.machine` -- the fingerprint and peak memory;
* :mod:`~pipeline.bench.timing` -- latency percentiles, interleaved timed passes, one query alone;
* :mod:`~pipeline.bench.quality` -- candidates per stage, Recall@k, agreement with the baseline;
* :mod:`~pipeline.bench.encoder` -- the encoder against bare sentence-transformers;
* :mod:`~pipeline.bench.bare` -- the bare-library baseline (it imports nothing from Funnel);
* :mod:`~pipeline.bench.pareto`, :mod:`~pipeline.bench.sweeps`, :mod:`~pipeline.bench.ann` --
  operating points and their Pareto front, the sweeps, ANN against exact search;
* :mod:`~pipeline.bench.report`, :mod:`~pipeline.bench.plots` -- ``report.json``/``report.md``
  and the PNG plots.

The baseline ships inside the installed package (it used to be ``benchmarks/bare_pipeline.py``,
which a top-level ``benchmarks`` package installed by other distributions could shadow).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import polars as pl

from ..columns import QUERY_ID
from ..errors import ConfigError, DataError
from ..stage import Pipeline
from .ann import ann_recall, ann_synthetic, stored_vectors, synthetic_vectors
from .encoder import encoder_bench, texts_for_encoder
from .machine import fingerprint, peak_rss_mb
from .pareto import pareto_front
from .plots import plots
from .quality import agreement, candidate_tables, quality
from .report import jsonable, markdown
from .sweeps import SWEEP_QUERIES, sweep_batch_size, sweep_index, sweep_pipeline
from .timing import latency_summary, median, single_query, split_batches, timed_passes

__all__ = ["BenchOptions", "run_bench", "parse_override", "fingerprint", "latency_summary", "pareto_front", "synthetic_vectors",
           "stored_vectors", "ann_recall", "BARE_SCRIPT"]

#: The bare-library baseline, as the report names it (a module of this package).
BARE_SCRIPT = "pipeline/bench/bare.py"


@dataclass
class BenchOptions:
    """What ``funnel bench`` measures; see :func:`run_bench` and ``funnel bench --help``."""

    queries: Path
    out: Path
    judgments: Path | None = None
    device: str | None = None
    repeats: int = 5
    warmup: int = 1
    batch_size: int | None = None
    top: int | None = None
    max_queries: int | None = None
    bare: bool | None = None
    encoder_texts: int = 2000
    sweep: bool = False
    ann_size: int = 0
    ann_dim: int = 384
    threads: int | None = None
    overrides: dict[str, dict[str, Any]] | None = None
    progress: bool = True
    seed: int = 0


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"encode.sentence_transformers.precision=bf16"`` -> ``(stage type, parameter, value)``.

    The value is read as a TOML value (``256``, ``true``, ``"text"``, ``[1, 2]``) and, when it is
    not one, taken as a plain string; it is never evaluated as code.
    """
    import tomllib

    key, sep, raw = text.partition("=")
    stage, dot, param = key.strip().rpartition(".")
    if not sep or not dot or "." not in stage or not param:
        raise ConfigError(f"--set expects STAGE_TYPE.PARAM=VALUE, such as encode.sentence_transformers.batch_size=256; got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return stage, param, value


def _with_overrides(pipe: Pipeline, overrides: dict[str, dict[str, Any]] | None) -> Pipeline:
    """``pipe`` with the parameters in ``overrides`` (``{stage type: {param: value}}``) replaced."""
    if not overrides:
        return pipe
    unknown = set(overrides) - {s.name for s in pipe.stages}
    if unknown:
        raise ConfigError(f"--set names stage type(s) {sorted(unknown)} that the pipeline does not have; "
                          f"it has {', '.join(dict.fromkeys(pipe.stage_names()))}")
    stages = [s.clone(**overrides[s.name]) if s.name in overrides else s for s in pipe.stages]
    return Pipeline(stages, inputs=pipe.inputs)


def run_bench(config: str | Path, options: BenchOptions, *, echo: Callable[[str], None] = print) -> dict:
    """Benchmark the pipeline of ``config``; write ``report.json``, ``report.md`` and plots to
    ``options.out``; return the report."""
    from ..config import load_config
    from ..data import open_dataset, read_parquet
    from ..schema import check_columns

    load_start = os.getloadavg()
    if options.threads:
        import faiss
        import torch

        torch.set_num_threads(options.threads)
        faiss.omp_set_num_threads(options.threads)
    if options.repeats < 1 or options.warmup < 0:
        raise ConfigError(f"bench needs repeats >= 1 and warmup >= 0; got {options.repeats} and {options.warmup}")
    cfg = load_config(config)
    pipe = _with_overrides(cfg.build(), options.overrides).with_device(options.device)
    if options.top is not None:
        pipe = pipe.with_top(options.top)
    top = next((getattr(s, s.top_param) for s in reversed(pipe.stages) if s.top_param), 10)
    batch_size = options.batch_size or cfg.batch_size or 256
    queries = open_dataset(options.queries).to_table()
    check_columns(pipe.inputs, queries.schema, stage=pipe.stages[0].name, where=f"queries file {options.queries}")
    if options.max_queries:
        queries = queries.slice(0, options.max_queries)
    if queries.num_rows == 0:
        raise DataError(f"queries file {options.queries} has no rows")
    judgments = None
    if options.judgments is not None:
        judgments = read_parquet(options.judgments, what="judgments")
        wanted = pl.from_arrow(queries.select([QUERY_ID])).get_column(QUERY_ID).cast(pl.String)
        judgments = pl.from_arrow(judgments).filter(pl.col(QUERY_ID).cast(pl.String).is_in(wanted.implode())).to_arrow()
    batches = split_batches(queries, batch_size)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)

    echo(f"[1/5] warming up {len(pipe)} stages of {config}")
    warm = []
    for stage in pipe.stages:
        t0 = time.perf_counter()
        stage.warm_up()
        warm.append(time.perf_counter() - t0)

    bare, bare_note = None, None
    if options.bare is not False:
        from .bare import BarePipeline, Unsupported  # here, so that `python -m pipeline.bench.bare` runs it fresh

        try:
            bare = BarePipeline(config, top=options.top, device=options.device, overrides=options.overrides)
        except Unsupported as exc:
            bare_note = f"the bare pipeline does not cover this config: {exc}"
        if bare_note and options.bare:
            raise ConfigError(f"--bare: {bare_note}")

    echo(f"[2/5] quality pass over {queries.num_rows} queries ({len(batches)} batches of {batch_size})")
    tables, vectors, bare_out = candidate_tables(pipe, batches, bare, options.progress)
    for _ in range(max(0, options.warmup - 1)):
        for b in batches:
            pipe.run(b)
            if bare is not None:
                bare.run(pl.from_arrow(b))

    echo(f"[3/5] timing: {options.repeats} passes" + (", interleaved with the bare pipeline" if bare else ""))
    timings = timed_passes(pipe, batches, repeats=options.repeats, bare=bare, progress=options.progress)
    stats = timings.stats
    single = single_query(pipe, queries, bare, n=min(64, queries.num_rows))
    peak = peak_rss_mb()

    last = len(pipe) - 1
    per_stage_q, final_q = quality(tables, judgments, last, top)
    n_queries = [b.num_rows for b in batches] * options.repeats
    total = sum(s.total_seconds for s in stats) or 1.0
    stage_rows = []
    for i, (stage, s) in enumerate(zip(pipe.stages, stats)):
        row = {"step": i + 1, "name": stage.name, "device": getattr(stage, "device_", None) or "cpu",
               "rows_in": s.rows_in // options.repeats, "rows_out": s.rows_out // options.repeats,
               "batches": len(batches), **latency_summary(s.seconds, n_queries),
               "throughput_rows_per_s": s.rows_in / s.total_seconds if s.total_seconds else None,
               "share_of_time": s.total_seconds / total, "warm_up_s": warm[i], "k": None, "recall_at_k": None}
        row.update(per_stage_q.get(i, {}))
        if stage.name == "recall.faiss" and i in vectors:
            ann = ann_recall(stage, vectors[i])
            row.update({"ann_k": ann["k"], "ann_recall_at_k": ann["ann_recall_at_k"], "ann_reference": ann["exact_reference"]})
            if ann["k"] > 10:
                row["ann_recall_at_10"] = ann_recall(stage, vectors[i], 10)["ann_recall_at_k"]
        bare_steps = [steps[i] for steps in timings.bare_steps if len(steps) == len(pipe)]
        if bare_steps:
            row.update({"bare_p50_ms": latency_summary(bare_steps)["p50_ms"],
                        "overhead_ratio": s.total_seconds / max(sum(bare_steps), 1e-12)})
        stage_rows.append(row)
    pass_s = median(timings.passes)
    end_to_end = {"queries": queries.num_rows, "batch_size": batch_size, "batches": len(batches), "top": top,
                  "seconds_per_pass": pass_s, "cpu_seconds_per_pass": median(timings.cpu_passes),
                  "queries_per_s": queries.num_rows / pass_s, **latency_summary(timings.batches, n_queries),
                  "single_query": single, "peak_rss_mb": peak, "quality": final_q}
    overhead = None
    if bare is not None:
        paired = [f / b for f, b in zip(timings.batches, timings.bare_batches) if b > 0]
        after_encoder = [r for r in stage_rows[1:] if "overhead_ratio" in r] if pipe.stages[0].name.startswith("encode.") else []
        funnel_rest = sum(stats[r["step"] - 1].total_seconds for r in after_encoder)
        bare_rest = sum(sum(steps[1:]) for steps in timings.bare_steps if len(steps) == len(pipe))
        overhead = {"bare_script": BARE_SCRIPT, "funnel_s_per_pass": pass_s,
                    "bare_s_per_pass": median(timings.bare_passes),
                    "overhead_ratio": sum(timings.passes) / sum(timings.bare_passes),
                    "paired_median_ratio": median(paired),
                    "cpu_overhead_ratio": sum(timings.cpu_passes) / max(sum(timings.bare_cpu_passes), 1e-9),
                    "bare_queries_per_s": queries.num_rows / median(timings.bare_passes),
                    "overhead_ratio_after_encoder": funnel_rest / bare_rest if after_encoder and bare_rest else None,
                    "agreement": agreement(tables[last], bare_out) if last in tables else None}
    elif bare_note:
        overhead = {"skipped": bare_note}

    encoder = next((s for s in pipe.stages if s.name == "encode.sentence_transformers"), None)
    enc_report = None
    if encoder is not None and options.encoder_texts > 0:
        echo("[4/5] encoder against bare sentence-transformers fp32")
        texts = texts_for_encoder(cfg, pipe, queries, encoder, options.encoder_texts, options.seed)
        enc_report = encoder_bench(encoder, texts, options.repeats, options.sweep, options.progress)

    sweeps = None
    if options.sweep:
        echo("[5/5] sweeps: index types and search parameters, candidates k, batch size")
        sweeps = {"index": [], "pipeline": None, "batch_size": None}
        for i, stage in enumerate(pipe.stages):
            if stage.name == "recall.faiss" and i in vectors:
                sweeps["index"].append(sweep_index(stage, vectors[i], repeats=max(1, min(options.repeats, 3)),
                                                    progress=options.progress, log=echo))
        sweep_repeats = max(1, min(options.repeats, 2))
        few = queries.slice(0, min(queries.num_rows, SWEEP_QUERIES))
        sweeps["pipeline"] = sweep_pipeline(pipe, split_batches(few, batch_size), judgments, top, sweep_repeats,
                                             options.progress)
        sweeps["batch_size"] = sweep_batch_size(pipe, few, sweep_repeats, options.progress)
    ann = None
    if options.ann_size:
        echo(f"[5/5] ANN on {options.ann_size} synthetic vectors")
        ann = ann_synthetic(options.ann_size, options.ann_dim, repeats=max(1, min(options.repeats, 3)),
                             seed=options.seed, log=echo)

    report = {
        "config": str(config), "config_name": cfg.name, "queries": str(options.queries),
        "judgments": str(options.judgments) if options.judgments else None, "repeats": options.repeats,
        "warmup": options.warmup, "device": options.device, "overrides": options.overrides, "fingerprint": fingerprint(),
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "end_to_end": end_to_end, "stages": stage_rows, "overhead": overhead, "encoder": enc_report,
        "sweeps": sweeps, "ann": ann, "peak_rss_mb_total": peak_rss_mb(),
    }
    report = jsonable(report)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    report["plots"] = plots(report, out)
    (out / "report.md").write_text(markdown(report) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
