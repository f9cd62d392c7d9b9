"""The Ray Data engine: the same batch run, spread over an actor pool on one machine or a cluster.

``funnel run CONFIG --queries Q --out OUT --engine ray [--address ADDR]`` runs exactly the
pipeline the local runner (:mod:`pipeline.runner`) runs, as a Ray Data job::

    units of the queries ─map_batches(read)─► Arrow batches ─map_batches(PipelineActor)─► write_parquet
    (shard, start, stop)   task pool          tagged by batch  actor pool, warm stages     OUT shards

* **Same batches, same rows.** The job plans the same units as the local runner
  (:meth:`~pipeline.runner.QueryInput.units`) and its read tasks cut them into the same batches
  (``batch_size`` rows from a multiple of ``batch_size`` within each shard), tagging every row
  with its batch. The actors run the pipeline on each tagged batch separately, so an encoder
  sees exactly the batches it sees locally and the output is the local runner's, row for row,
  bit for bit — whatever blocks Ray Data bundles together.
* **Actors warm up once.** Each actor builds the pipeline from its normalised TOML (the text
  of the run's lock file) and calls ``warm_up()`` in its constructor: models and indexes load
  once per actor, not per batch. An actor asks Ray for ``num_gpus=1`` when a stage will run on
  CUDA (``device = "cuda"``, or ``"auto"`` on a cluster that has GPUs), so Ray places one actor
  per GPU.
* **Failures.** An actor that dies (a crashed process, a lost node) is restarted up to
  ``max_restarts`` times and its batches are retried (``max_task_retries``); the batches are
  pure functions of the input, so a retry writes the same rows. Rows a stage cannot process go
  to quarantine files named after their batch, so a retried batch overwrites its own file
  instead of duplicating it.
* **Output.** Ray Data writes Parquet files into a staging folder (``OUT/_ray/``); when the job
  finishes they become ``part-NNNNN.parquet`` shards and the run is finished exactly as a local
  run is (single-file merge, quarantine file, lock file), through the same
  :class:`~pipeline.runner.BatchJob`. The Ray engine commits all its units at once: an
  interrupted Ray job starts its units over on the next run (with either engine); a run the
  local engine left unfinished is completed by the Ray engine, which takes only the units left.

Without ``address`` a local Ray is started for the job (and stopped after); with one the job
joins that cluster, whose nodes need Funnel and the stage packages installed and ``OUT``, the
queries and the artifacts on a shared filesystem (see ``docs/batch.md``).

Stages registered in-process with :func:`pipeline.register_stage` are unknown to the actors'
processes; list the modules that register them in ``imports`` (and make them importable there,
e.g. through ``runtime_env={"env_vars": {"PYTHONPATH": ...}}``), or install them as plug-ins.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import ConfigError, FunnelError
from .runner import BatchJob, QueryInput, RunSummary, Unit, _held, conform_output
from .stage import Pipeline

__all__ = ["run_on_ray", "PipelineActor", "read_units", "BATCH_TAG", "DEFAULT_RAY_SHARD_BATCHES"]

#: column the read tasks add: which batch (unit << 20 | batch within the unit) a row belongs to
BATCH_TAG = "__funnel_batch"
#: batches per unit (one read task) unless ``shard_rows`` says otherwise
DEFAULT_RAY_SHARD_BATCHES = 16


def read_units(rows: pa.Table, *, source: QueryInput, batch_size: int) -> pa.Table:
    """Ray Data read step: the rows of the units described in ``rows``, tagged with their batch."""
    tables = []
    for u in rows.to_pylist():
        unit = Unit(u["index"], u["shard"], u["start"], u["stop"])
        for k, batch in enumerate(source.batches(unit, batch_size)):
            tag = pa.array([(unit.index << 20) | k] * batch.num_rows, pa.int64())
            tables.append(batch.append_column(BATCH_TAG, tag))
    if not tables:
        return source.schema.append(pa.field(BATCH_TAG, pa.int64())).empty_table()
    return pa.concat_tables(tables)


class PipelineActor:
    """A Ray Data actor: builds and warms the pipeline once, then runs it on each tagged batch."""

    def __init__(self, config_toml: str, base_dir: str | None, input_schema: pa.Schema, strict: bool,
                 quarantine_dir: str, imports: Sequence[str] = (), threads: int | None = None):
        import importlib
        import tomllib

        from .config import PipelineConfig

        if threads:
            import torch

            torch.set_num_threads(threads)
        for module in imports:
            importlib.import_module(module)
        cfg = PipelineConfig.from_dict(tomllib.loads(config_toml), base_dir=Path(base_dir) if base_dir else None)
        self.pipe = cfg.build().warm_up()
        self.schema = self.pipe.run(input_schema.empty_table()).schema
        self.strict, self.quarantine_dir = strict, Path(quarantine_dir)

    def __call__(self, table: pa.Table) -> pa.Table:
        from .runner import write_parquet_atomic
        from .stage import QUARANTINE_SCHEMA

        if table.num_rows == 0:
            return self.schema.empty_table()
        tags = table.column(BATCH_TAG).combine_chunks()
        ends = pc.run_end_encode(tags).run_ends.to_pylist()
        body, out, start = table.drop_columns([BATCH_TAG]), [], 0
        for end in ends:
            tag = tags[start].as_py()
            rejected: list[pa.Table] | None = None if self.strict else []
            out.append(conform_output(self.pipe.run(body.slice(start, end - start), quarantine=rejected), self.schema))
            path = self.quarantine_dir / f"ray-{tag >> 20:05d}-{tag & 0xFFFFF:05d}.parquet"
            if rejected:
                self.quarantine_dir.mkdir(parents=True, exist_ok=True)
                write_parquet_atomic(pa.concat_tables(rejected).cast(QUARANTINE_SCHEMA), path)
            start = end
        return pa.concat_tables(out)


def _wants_gpu(pipe: Pipeline, cluster_gpus: float) -> bool:
    from .lock import _walk

    for _, stage in _walk(pipe.stages):
        device = stage.get_params().get("device")
        if device == "cuda" or (device == "auto" and "cuda" in stage.tags.devices and cluster_gpus > 0):
            return True
    return False


def _base_dir(pipe: Pipeline) -> str | None:
    base = next((s._base_dir for s in pipe.stages if s._base_dir is not None), None)
    return str(Path(base).resolve()) if base is not None else None


def _init_ray(address: str | None, num_cpus: int | None, runtime_env: dict[str, Any] | None) -> bool:
    """Start or join Ray; ``True`` when this call started it (and should stop it)."""
    from .extras import require_extra

    require_extra("ray", ["ray", "ray.data"], needed_by="the Ray engine (--engine ray)")
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"runtime_env": runtime_env, "include_dashboard": False, "log_to_driver": True,
                              "configure_logging": True, "logging_level": "WARNING"}
    if address is None:
        kwargs["num_cpus"] = num_cpus or os.cpu_count()
    else:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except Exception as exc:  # ray raises ConnectionError, RuntimeError, ValueError ... for a bad address
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise ConfigError(f"cannot start {where}: {type(exc).__name__}: {exc}") from exc
    return True


def run_on_ray(pipe: Pipeline, queries: str | Path, out: str | Path, *, address: str | None = None,
               actors: int | None = None, batch_size: int = 256, progress: bool = True, strict: bool = False,
               shard_rows: int | None = None, overwrite: bool = False, skip_bad_shards: bool = False,
               lock: str | Path | None = None, name: str = "pipeline", inputs: dict[str, str] | None = None,
               num_cpus: int | None = None, cpus_per_actor: float = 1.0, threads_per_actor: int | None = None,
               imports: Sequence[str] = (), runtime_env: dict[str, Any] | None = None,
               max_restarts: int = 3, max_task_retries: int = 3) -> RunSummary:
    """Run ``pipe`` over ``queries`` with Ray Data and write ``out`` as :func:`run_to_parquet` would.

    ``actors`` pipeline actors (default: one per GPU when the stages run on CUDA, else one per
    ``cpus_per_actor`` CPUs of the cluster, keeping one CPU for reading and writing) each
    reserve ``cpus_per_actor`` CPUs and run torch with ``threads_per_actor`` threads (default:
    all CPUs of the machine for a single local actor, else ``cpus_per_actor``). ``num_cpus``
    sizes a local Ray (default: every core). ``imports`` are modules each actor imports before
    building the pipeline (stages registered in-process); ``runtime_env`` is passed to
    ``ray.init``. Returns the same :class:`RunSummary` (without per-stage timings).
    """
    t0 = time.perf_counter()
    job = BatchJob(pipe, queries, out, batch_size=batch_size,
                   shard_rows=shard_rows or batch_size * DEFAULT_RAY_SHARD_BATCHES,
                   overwrite=overwrite, skip_bad_shards=skip_bad_shards, lock=lock, name=name, inputs=inputs,
                   engine="ray")
    with _held(job):
        if job.prepare():
            job.summary.seconds = time.perf_counter() - t0
            return job.summary
        empty = job.empty_input_schema()
        if empty is not None:  # no query: no Ray, no model
            job.finish(empty)
            job.summary.seconds = time.perf_counter() - t0
            return job.summary
        started = _init_ray(address, num_cpus, runtime_env)
        try:
            _run_job(job, actors=actors, progress=progress, strict=strict, cpus_per_actor=cpus_per_actor,
                     threads_per_actor=threads_per_actor, imports=imports, local=address is None,
                     max_restarts=max_restarts, max_task_retries=max_task_retries)
        finally:
            if started:
                import ray

                ray.shutdown()
        job.summary.seconds = time.perf_counter() - t0
        return job.summary


def _run_job(job: BatchJob, *, actors: int | None, progress: bool, strict: bool, cpus_per_actor: float,
             threads_per_actor: int | None, imports: Sequence[str], local: bool, max_restarts: int,
             max_task_retries: int) -> None:
    import ray
    import ray.data as rd

    layout, todo = job.layout, job.todo()
    resources = ray.cluster_resources()
    gpu = _wants_gpu(job.pipe, resources.get("GPU", 0))
    if actors is None:
        actors = int(resources.get("GPU", 0)) if gpu else int(max(1, (resources.get("CPU", 1) - 1) // cpus_per_actor))
        actors = max(1, actors)
    if threads_per_actor is None:
        threads_per_actor = (os.cpu_count() or 1) if local and actors == 1 and not gpu else max(1, int(cpus_per_actor))
    ctx = rd.DataContext.get_current()
    ctx.enable_progress_bars = progress
    staging = layout.work / "_ray" / f"{os.getpid()}-{int(time.time())}"
    quarantine_dir = layout.work / "_quarantine"
    if todo:
        items = [{"index": u.index, "shard": u.shard, "start": u.start, "stop": u.stop} for u in todo]
        try:
            ds = rd.from_items(items, override_num_blocks=len(items))
        except TypeError:  # Ray < 2.10
            ds = rd.from_items(items, parallelism=len(items))
        ds = ds.map_batches(read_units, batch_size=1, batch_format="pyarrow",
                            fn_kwargs={"source": job.input, "batch_size": job.batch_size})
        with warnings.catch_warnings():  # Ray 2.60 deprecates passing max_restarts this way; it still works
            warnings.simplefilter("ignore")
            ds = _actor_map(ds, job, strict=strict, quarantine_dir=quarantine_dir, imports=imports,
                            threads=threads_per_actor, actors=actors, cpus=cpus_per_actor, gpu=gpu,
                            max_restarts=max_restarts, max_task_retries=max_task_retries)
        try:
            ds.write_parquet(str(staging))
        except Exception as exc:
            raise _explain(exc) from exc
    written = sorted(staging.glob("*.parquet")) if staging.is_dir() else []
    first = len(job.units)
    names = []
    for i, path in enumerate(written):
        target = layout.part(first + len(job.manifest.get("extra_parts", [])) + i)
        os.replace(path, target)
        names.append(target.name)
    job.manifest.setdefault("extra_parts", []).extend(names)
    rows = sum(pq.read_metadata(layout.work / n).num_rows for n in names)
    job.summary.processed = sum(u.stop - u.start for u in todo)
    for unit in todo:
        job.manifest["done"][str(unit.index)] = {"queries": unit.stop - unit.start, "rows": None, "quarantined": None}
    job.manifest["ray_rows"] = job.manifest.get("ray_rows", 0) + rows
    job._save_manifest()
    if staging.parent.is_dir():
        import shutil

        shutil.rmtree(staging.parent, ignore_errors=True)
    schema = pq.read_schema(layout.work / names[0]) if names else None
    if schema is None:
        parts = layout.parts()
        schema = pq.read_schema(parts[0]) if parts else job.pipe.warm_up().run(job.input.schema.empty_table()).schema
    job.finish(schema)


def _actor_map(ds, job: BatchJob, *, strict: bool, quarantine_dir: Path, imports: Sequence[str], threads: int,
               actors: int, cpus: float, gpu: bool, max_restarts: int, max_task_retries: int):
    import ray.data as rd

    from .lock import pipeline_toml

    return ds.map_batches(
        PipelineActor, batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
        fn_constructor_kwargs={"config_toml": pipeline_toml(job.pipe, name=job.name, inputs=job.inputs),
                               "base_dir": _base_dir(job.pipe), "input_schema": job.input.schema,
                               "strict": strict, "quarantine_dir": str(quarantine_dir),
                               "imports": tuple(imports), "threads": threads},
        compute=rd.ActorPoolStrategy(size=actors), num_cpus=cpus, num_gpus=1 if gpu else None,
        max_restarts=max_restarts, max_task_retries=max_task_retries)


def _explain(exc: Exception) -> Exception:
    """A failed Ray job as one line: the Funnel error raised in an actor when there is one.

    Ray re-raises a worker's exception in the driver as a ``RayTaskError`` whose text carries
    the worker's traceback; the original error class is rebuilt from its last line.
    """
    import re

    from . import errors

    cur, seen = exc, set()
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, FunnelError):
            return cur
        cur = cur.__cause__ or cur.__context__
    text = str(exc)
    for module, name, message in re.findall(r"^pipeline\.(errors|runner)\.(\w+): (.+)$", text, re.M):
        cls = getattr(errors, name, None) if module == "errors" else errors.DataError
        if isinstance(cls, type) and issubclass(cls, FunnelError):
            return cls(message)
    raised = [m for m in re.findall(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$", text, re.M)
              if not m[0].startswith("ray.")]
    if raised:
        return RuntimeError(f"a Ray actor failed: {raised[0][0]}: {raised[0][1]}")
    lines = text.strip().splitlines()
    return RuntimeError(f"the Ray job failed: {type(exc).__name__}: {lines[0] if lines else ''}")
