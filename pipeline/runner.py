"""Local batch runner: Parquet queries in, Parquet candidates out.

The queries (a Parquet file or a folder of shards) are read in batches, never whole; each batch
runs through the pipeline and is appended to the output, which is written to a temporary file
and renamed into place only when the run completes, so a failed run leaves no partial output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from .data import open_dataset
from .errors import DataError
from .schema import check_columns
from .stage import Pipeline, StageStats

__all__ = ["RunSummary", "run_to_parquet", "output_file", "quarantine_file"]


@dataclass
class RunSummary:
    queries: int = 0
    rows: int = 0
    quarantined: int = 0
    quarantine: Path | None = None
    seconds: float = 0.0
    out: Path | None = None
    stages: list[StageStats] = field(default_factory=list)


def output_file(out: str | Path) -> Path:
    """``OUT`` as a file: ``x.parquet`` itself, or ``part-00000.parquet`` inside a folder."""
    out = Path(out)
    return out if out.suffix == ".parquet" else out / "part-00000.parquet"


def quarantine_file(out: str | Path) -> Path:
    """Where rows that could not be processed go: beside the output file."""
    target = output_file(out)
    return target.with_name(target.stem + ".quarantine.parquet")


def run_to_parquet(pipe: Pipeline, queries: str | Path, out: str | Path, *, batch_size: int = 256,
                   progress: bool = True, observer: Callable[[int, pa.Table], None] | None = None,
                   strict: bool = False) -> RunSummary:
    """Run ``pipe`` over every query in ``queries`` and write the candidates to ``out``.

    Rows a stage cannot process (null text, a NaN embedding ...) are written with the stage and
    the reason to :func:`quarantine_file` and counted, never silently dropped; with ``strict``
    the first such row fails the run instead. ``observer(step, table)`` is called with the
    output of every stage of every batch (used by the per-stage recall table of ``funnel demo``).
    """
    import time

    from tqdm.auto import tqdm

    dataset = open_dataset(queries)
    check_columns(pipe.inputs, dataset.schema, stage=pipe.stages[0].name, where=f"queries file {queries}")
    target = output_file(out)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create output folder {target.parent}: {exc}") from exc
    if not os.access(target.parent, os.W_OK):
        raise DataError(f"output folder {target.parent} is not writable")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    summary = RunSummary(out=target)
    writer = None
    rejected: list[pa.Table] = []
    t0 = time.perf_counter()
    pipe.warm_up()
    try:
        with tqdm(total=dataset.count_rows(), desc="queries", unit="q", disable=not progress) as bar:
            for batch in dataset.to_batches(batch_size=batch_size):
                if batch.num_rows == 0:
                    continue
                result = pipe.run(batch, summary.stages, observer, quarantine=None if strict else rejected)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, result.schema)
                writer.write_table(result.cast(writer.schema) if result.schema != writer.schema else result)
                summary.queries += batch.num_rows
                summary.rows += result.num_rows
                bar.update(batch.num_rows)
        if writer is None:
            empty = pipe.run(pa.Table.from_batches([], schema=dataset.schema))
            writer = pq.ParquetWriter(tmp, empty.schema)
        writer.close()
        bad = quarantine_file(out)
        if rejected:
            table = pa.concat_tables(rejected)
            pq.write_table(table, tmp.with_name(tmp.name + ".q"))
            os.replace(tmp.with_name(tmp.name + ".q"), bad)
            summary.quarantined, summary.quarantine = table.num_rows, bad
        elif bad.exists():
            bad.unlink()
        os.replace(tmp, target)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".q")):
            if leftover.exists():
                leftover.unlink()
    summary.seconds = time.perf_counter() - t0
    return summary

