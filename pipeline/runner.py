"""Batch runs: Parquet queries in, Parquet candidates out — streaming, resumable, atomic.

A batch run pushes every query of a dataset through a pipeline and writes the candidates. Runs
over millions of queries take hours and get interrupted (a pre-empted node, a ``kill -9``, an
out-of-memory kill elsewhere on the box), so the runner is built so that rerunning the same
command continues where the last one stopped and yields exactly the rows one uninterrupted run
yields — none lost, none duplicated:

**Input.** ``queries`` is a Parquet file or a folder of Parquet shards (files whose names start
with ``.`` or ``_`` are ignored, as ``pyarrow.dataset`` does). It is never loaded whole: each
shard is split into **units** of ``shard_rows`` queries, each unit is read in batches of
``batch_size`` rows from its row groups. A unit never spans two shards and always starts at a
multiple of ``batch_size`` within its shard, so the batches — and therefore the output, bit for
bit — depend only on the input and ``batch_size``, never on how the work was split or resumed
(the Ray engine, :mod:`pipeline.ray_engine`, cuts the same batches).

**Output.** ``OUT`` is a folder of shards, ``OUT/part-NNNNN.parquet`` (one per unit, readable
as one dataset with ``pyarrow.dataset``), or a single file ``x.parquet``, for which the shards
are staged in a hidden folder ``.x.parquet.funnel/`` beside it and merged, streaming, into a
temporary file renamed onto ``x.parquet`` at the end. Every file is written to a temporary name
and renamed into place, so a reader never sees half a file.

**Manifest.** ``_funnel_manifest.json`` in the work folder records the run's identity — the
config hash and artifact fingerprints (:mod:`pipeline.lock`), the input shards (name, rows, size,
hash of the footer) and ``batch_size`` — and the units done, each committed by one atomic rename
*after* its part file is in place. A crash between the two only costs redoing that unit, whose
part file is then overwritten. A rerun whose identity differs (another config, a rebuilt index,
changed queries) refuses to resume into the old output and says what changed; ``overwrite``
discards it.

**Finish.** When every unit is done, the rows a stage could not process (see
:meth:`~pipeline.stage.Stage.invalid_rows`) are merged into the quarantine file
(``OUT/_quarantine.parquet`` or ``x.quarantine.parquet``) and the lock file
(``OUT/_funnel.lock.json`` or ``x.lock.json``) is written: its presence marks the run complete.
Rerunning a complete run does nothing; ``overwrite`` runs it again.

**Bad shards.** A shard that is not Parquet, lacks a column the pipeline needs, has other
columns than the first shard, or fails while being read stops the run with an error naming it;
with ``skip_bad_shards`` it is skipped, listed in the summary and recorded in the quarantine
file (stage ``input``, the reason).

Two processes never write one output at once: the work folder is guarded by an advisory lock
(``flock``), released by the kernel even on ``kill -9``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ConfigError, DataError, FunnelError, FunnelWarning
from .lock import (ResolvedPipeline, check_lock, config_differences, pipeline_devices, read_lock, resolve_pipeline,
                   short_fingerprint, write_lock)
from .schema import check_columns
from .stage import QUARANTINE_SCHEMA, Pipeline, StageStats

__all__ = ["RunSummary", "run_to_parquet", "output_file", "quarantine_file", "lock_file", "QueryInput", "Unit",
           "BatchJob", "scan_queries", "DEFAULT_SHARD_ROWS"]

#: warned when the queries have no row, before any model is loaded
EMPTY_INPUT = "the queries in {queries} have no rows: writing an empty output without loading the pipeline"
MANIFEST_NAME = "_funnel_manifest.json"
MANIFEST_FORMAT = "funnel-run/1"
PART = "part-{:05d}.parquet"
#: queries per output shard unless ``shard_rows`` says otherwise (rounded up to whole batches)
DEFAULT_SHARD_ROWS = 50_000
#: rows buffered before a row group is written
ROW_GROUP_ROWS = 65_536


@dataclass
class RunSummary:
    """What a run did. ``skipped`` is true when the output was already complete.

    ``queries``, ``rows`` and ``quarantined`` count the whole output (units done by earlier,
    interrupted calls included); ``processed`` counts the queries this call ran. ``seconds`` is
    the whole call, ``load_seconds`` the part spent loading models and indexes (``warm_up``; 0
    where the engine loads them elsewhere, as Ray's actors do).
    """

    queries: int = 0
    processed: int = 0
    rows: int = 0
    quarantined: int = 0
    quarantine: Path | None = None
    seconds: float = 0.0
    load_seconds: float = 0.0
    out: Path | None = None
    stages: list[StageStats] = field(default_factory=list)
    engine: str = "local"
    skipped: bool = False
    resumed_units: int = 0
    units: int = 0
    bad_shards: list[str] = field(default_factory=list)
    lock: Path | None = None

    @property
    def queries_per_s(self) -> float:
        """Throughput of the queries this call ran, model loading left out."""
        return self.processed / max(self.seconds - self.load_seconds, 1e-9)


# -- output layout -----------------------------------------------------------------------------


def _single(out: Path) -> bool:
    return out.suffix == ".parquet"


def output_file(out: str | Path) -> Path:
    """``OUT`` as a file: ``x.parquet`` itself, or the first shard ``part-00000.parquet`` of a folder."""
    out = Path(out)
    return out if _single(out) else out / PART.format(0)


def quarantine_file(out: str | Path) -> Path:
    """Where rows that could not be processed go: ``x.quarantine.parquet``, or ``OUT/_quarantine.parquet``.

    Inside a folder the name starts with ``_`` so that ``pyarrow.dataset`` (and ``funnel eval``)
    reading ``OUT`` as a dataset skips it.
    """
    out = Path(out)
    return out.with_name(out.stem + ".quarantine.parquet") if _single(out) else out / "_quarantine.parquet"


def lock_file(out: str | Path) -> Path:
    """The lock file a complete run leaves: ``x.lock.json``, or ``OUT/_funnel.lock.json``."""
    out = Path(out)
    return out.with_name(out.stem + ".lock.json") if _single(out) else out / "_funnel.lock.json"


@dataclass(frozen=True)
class Layout:
    out: Path

    @property
    def single(self) -> bool:
        return _single(self.out)

    @property
    def work(self) -> Path:
        return self.out.with_name(f".{self.out.name}.funnel") if self.single else self.out

    @property
    def manifest(self) -> Path:
        return self.work / MANIFEST_NAME

    @property
    def lock(self) -> Path:
        return lock_file(self.out)

    @property
    def quarantine(self) -> Path:
        return quarantine_file(self.out)

    def part(self, index: int) -> Path:
        return self.work / PART.format(index)

    def quarantine_part(self, index: int | str) -> Path:
        name = PART.format(index) if isinstance(index, int) else f"{index}.parquet"
        return self.work / "_quarantine" / name

    def tmp(self, path: Path) -> Path:
        return path.with_name(f".{path.name}.{os.getpid()}.tmp")

    def parts(self) -> list[Path]:
        return sorted(self.work.glob("part-*.parquet")) if self.work.is_dir() else []

    def clean_tmp(self) -> None:
        """Remove temporary files a killed run left (ours only: hidden, ending in ``.tmp``)."""
        folders = [self.work, self.work / "_quarantine", self.out.parent]
        ours = (".part-", ".ray-", "._funnel", f".{self.out.name}.", f".{self.lock.name}.", f".{self.quarantine.name}.",
                "._quarantine")
        for folder in folders:
            if folder.is_dir():
                for p in folder.glob(".*.tmp"):
                    if p.name.startswith(ours):
                        p.unlink(missing_ok=True)

    def discard(self) -> None:
        """Delete a previous run's output (only files a run writes; a folder's other files stay)."""
        for p in (self.lock, self.quarantine):
            p.unlink(missing_ok=True)
        if self.single:
            self.out.unlink(missing_ok=True)
            for p in self.work.iterdir() if self.work.is_dir() else ():
                if p.name != ".run.pid":  # held by this run
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            return
        for p in self.parts():
            p.unlink()
        self.manifest.unlink(missing_ok=True)
        shutil.rmtree(self.work / "_quarantine", ignore_errors=True)
        shutil.rmtree(self.work / "_ray", ignore_errors=True)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


# -- input -------------------------------------------------------------------------------------


class BadShardError(DataError):
    """A query shard that cannot be used; ``shard`` names it, ``reason`` says why."""

    def __init__(self, message: str, shard: str, reason: str):
        super().__init__(message)
        self.shard, self.reason = shard, reason


@dataclass(frozen=True)
class Shard:
    path: Path
    name: str
    rows: int
    size: int
    digest: str

    def fingerprint(self) -> list:
        return [self.name, self.rows, self.size, self.digest]


@dataclass(frozen=True)
class Unit:
    """Rows ``[start, stop)`` of shard ``shard``; its output is part ``index``."""

    index: int
    shard: int
    start: int
    stop: int


def _footer_digest(path: Path, size: int) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, size - (1 << 16)))
        return hashlib.sha256(f.read()).hexdigest()[:16]


@dataclass
class QueryInput:
    """The shards of a queries dataset, checked; batches of any unit read on demand."""

    root: Path
    shards: list[Shard]
    bad: list[tuple[str, str]]
    schema: pa.Schema

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def fingerprint(self) -> dict[str, Any]:
        return {"shards": [s.fingerprint() for s in self.shards], "bad_shards": [list(b) for b in self.bad]}

    def units(self, shard_rows: int) -> list[Unit]:
        out: list[Unit] = []
        for i, shard in enumerate(self.shards):
            for start in range(0, shard.rows, shard_rows):
                out.append(Unit(len(out), i, start, min(start + shard_rows, shard.rows)))
        return out

    def batches(self, unit: Unit, batch_size: int) -> Iterator[pa.Table]:
        """The unit's rows as tables of exactly ``batch_size`` rows (the last may be shorter).

        Only the row groups that hold the unit are read, column chunks in 1 MiB buffers.
        """
        shard = self.shards[unit.shard]
        try:
            pf = pq.ParquetFile(shard.path, buffer_size=1 << 20, pre_buffer=False)
            groups, offset, first = [], 0, None
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if offset + n > unit.start and offset < unit.stop:
                    first = offset if first is None else first
                    groups.append(g)
                offset += n
            pos, pending, held = first or 0, [], 0
            for rb in pf.iter_batches(batch_size=batch_size, row_groups=groups, use_threads=False):
                lo, hi = max(unit.start - pos, 0), min(unit.stop - pos, rb.num_rows)
                pos += rb.num_rows
                if hi <= lo:
                    continue
                pending.append(rb.slice(lo, hi - lo))
                held += hi - lo
                while held >= batch_size:
                    table = pa.Table.from_batches(pending)
                    yield self._conform(table.slice(0, batch_size))
                    rest = table.slice(batch_size)
                    pending, held = rest.to_batches(), rest.num_rows
                if pos >= unit.stop:
                    break
            if held:
                yield self._conform(pa.Table.from_batches(pending))
        except (pa.ArrowException, OSError) as exc:
            reason = f"cannot read rows {unit.start}-{unit.stop}: {type(exc).__name__}: {exc}"
            raise BadShardError(f"queries shard {shard.path}: {reason}", shard.name, reason) from exc

    def _conform(self, table: pa.Table) -> pa.Table:
        if table.schema.equals(self.schema):
            return table
        return table.select(self.schema.names).cast(self.schema)


def _shard_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    hidden = lambda p: any(part.startswith((".", "_")) for part in p.relative_to(root).parts)  # noqa: E731
    return sorted(p for p in root.rglob("*") if p.is_file() and not hidden(p))


def scan_queries(queries: str | Path, pipe: Pipeline, *, skip_bad_shards: bool = False) -> QueryInput:
    """Check every shard of ``queries`` (readable Parquet, the columns ``pipe`` needs, one schema).

    Reads only footers. A bad shard raises :class:`BadShardError` naming it, or with
    ``skip_bad_shards`` is left out and listed in ``QueryInput.bad``.
    """
    root = Path(queries)
    if not root.exists():
        raise DataError(f"input {root} does not exist")
    shards, bad, schema = [], [], None
    where = "queries file" if root.is_file() else "queries shard"
    for path in _shard_files(root):
        name = path.name if root.is_file() else path.relative_to(root).as_posix()
        try:
            try:
                meta = pq.read_metadata(path)
                found = meta.schema.to_arrow_schema()
            except (pa.ArrowException, OSError) as exc:
                raise BadShardError(f"input {path} is not readable as Parquet: {exc}", name,
                                    f"not readable as Parquet: {exc}") from exc
            try:
                check_columns(pipe.inputs, found, stage=pipe.stages[0].name, where=f"{where} {path}")
            except FunnelError as exc:
                raise BadShardError(str(exc), name, str(exc)) from exc
            if schema is not None and sorted(found.names) != sorted(schema.names):
                reason = f"has columns {found.names} but the first shard has {schema.names}"
                raise BadShardError(f"queries shard {path} {reason}", name, reason)
        except BadShardError as exc:
            if not skip_bad_shards:
                if not root.is_file():
                    exc.args = (f"{exc.args[0]} (pass --skip-bad-shards to skip and quarantine bad shards)",)
                raise
            bad.append((exc.shard, exc.reason))
            continue
        schema = schema or found
        size = path.stat().st_size
        shards.append(Shard(path, name, meta.num_rows, size, _footer_digest(path, size)))
    if schema is None:
        detail = "; ".join(f"{n}: {r}" for n, r in bad) if bad else "it has no files"
        raise DataError(f"no readable query shard in {root}: {detail}")
    return QueryInput(root, shards, bad, schema)


# -- the job -----------------------------------------------------------------------------------


def conform_output(result: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast a batch's output to the run's output schema, so every shard has one schema."""
    if result.schema.equals(schema):
        return result
    if result.schema.names != schema.names:
        raise DataError(f"pipeline output columns changed between batches: {result.schema.names} vs {schema.names}")
    try:
        return result.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(f"pipeline output types changed between batches and cannot be unified: {exc}") from exc


def _input_differences(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """Which query shards were added, removed or changed (rows, size or contents)."""
    old_shards = {s[0]: s[1:] for s in (old or {}).get("shards", [])}
    new_shards = {s[0]: s[1:] for s in new.get("shards", [])}
    parts = []
    for name in sorted(set(old_shards) | set(new_shards)):
        a, b = old_shards.get(name), new_shards.get(name)
        if a is None:
            parts.append(f"{name} added")
        elif b is None:
            parts.append(f"{name} removed")
        elif a[0] != b[0]:
            parts.append(f"{name}: {a[0]} -> {b[0]} rows")
        elif a != b:
            parts.append(f"{name}: contents changed")
    if not parts:
        parts.append("the bad shards skipped differ")
    return "; ".join(parts[:5]) + (f" and {len(parts) - 5} more" if len(parts) > 5 else "")


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


class BatchJob:
    """One batch run's bookkeeping, shared by the local runner and the Ray engine.

    ``prepare()`` checks the input, the output folder and any earlier run of the same command
    (resume, nothing to do, or refuse); the engine then processes :meth:`todo` units and
    :meth:`finish` merges, writes the quarantine and the lock. See the module docstring.
    """

    def __init__(self, pipe: Pipeline, queries: str | Path, out: str | Path, *, batch_size: int = 256,
                 shard_rows: int | None = None, overwrite: bool = False, skip_bad_shards: bool = False,
                 lock: str | Path | None = None, name: str = "pipeline", inputs: dict[str, str] | None = None,
                 engine: str = "local"):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1; got {batch_size!r}")
        if shard_rows is not None and (not isinstance(shard_rows, int) or shard_rows < 1):
            raise ConfigError(f"shard_rows must be an int >= 1; got {shard_rows!r}")
        self.pipe, self.queries, self.layout = pipe, Path(queries), Layout(Path(out))
        self.batch_size, self.shard_rows_arg = batch_size, shard_rows
        self.overwrite, self.skip_bad_shards, self.lock_arg = overwrite, skip_bad_shards, lock
        self.name, self.inputs, self.engine = name, inputs, engine
        self.summary = RunSummary(out=self.layout.out, engine=engine)
        self.manifest: dict[str, Any] = {}
        self._mutex = None
        self._made_work = False  # this call created the work folder
        self._keep = False  # an earlier run's output this call refused to touch

    # -- preparing ---------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """What a resumed run must match; ``config_toml`` is kept to say *what* changed, the hash decides."""
        return {"config_hash": self.resolved.config_hash, "config_toml": self.resolved.config_toml,
                "artifacts": self.resolved.artifacts, "input": self.input.fingerprint(), "batch_size": self.batch_size}

    def _differences(self, old: dict[str, Any]) -> list[str]:
        new, diffs = self.identity(), []
        if old.get("config_hash") != new["config_hash"]:
            changed = config_differences(old["config_toml"], new["config_toml"]) if old.get("config_toml") else []
            diffs.append(f"the pipeline config changed ({'; '.join(changed)})" if changed else
                         f"the pipeline config changed (config hash {old.get('config_hash')} -> {new['config_hash']})")
        for key in sorted(set(old.get("artifacts", {})) | set(new["artifacts"])):
            a, b = old.get("artifacts", {}).get(key), new["artifacts"].get(key)
            if a != b:
                diffs.append(f"artifact {key} changed ({short_fingerprint(a)} -> {short_fingerprint(b)})")
        if old.get("input") != new["input"]:
            changed = _input_differences(old.get("input"), new["input"])
            diffs.append(f"the queries in {self.queries} changed ({changed})")
        if old.get("batch_size") != new["batch_size"]:
            diffs.append(f"batch size {old.get('batch_size')} -> {new['batch_size']}")
        return diffs

    def _refuse(self, what: str, diffs: list[str]) -> None:
        self._keep = True
        raise ConfigError(f"{self.layout.out} holds {what} that does not match this one: {'; '.join(diffs)}; "
                          "pass --overwrite to discard it and start over, or write to another --out")

    def prepare(self) -> bool:
        """Check everything before any work; return ``True`` when the output is already complete."""
        layout = self.layout
        self.input = scan_queries(self.queries, self.pipe, skip_bad_shards=self.skip_bad_shards)
        self.summary.bad_shards = [f"{n} ({r})" for n, r in self.input.bad]
        try:
            layout.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"cannot create output folder {layout.out.parent}: {exc}") from exc
        parent = layout.work if layout.work.exists() else layout.out.parent
        if not os.access(parent, os.W_OK):
            raise DataError(f"output folder {parent} is not writable")
        if not layout.single and layout.out.exists() and not layout.out.is_dir():
            raise DataError(f"output {layout.out} exists and is not a folder (name a .parquet file for one file)")
        self.resolved: ResolvedPipeline = resolve_pipeline(self.pipe, name=self.name, inputs=self.inputs)
        if self.lock_arg is not None:
            check_lock(self.lock_arg, self.resolved)
        self._acquire()
        layout.clean_tmp()
        if self.overwrite:
            layout.discard()
        elif self._complete():
            return True
        self._load_or_start_manifest()
        return False

    def _acquire(self) -> None:
        work = self.layout.work
        try:
            self._made_work = not work.exists()
            work.mkdir(parents=True, exist_ok=True)
            handle = open(work / ".run.pid", "a+")
        except OSError as exc:  # a path under /proc, a read-only mount, a file where a folder should be ...
            raise DataError(f"cannot write the output {self.layout.out}: {exc.strerror or exc} "
                            f"({exc.filename or work})") from exc
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise DataError(f"another funnel run (pid {holder}) is writing {self.layout.out}; wait for it or stop it")
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._mutex = handle

    def release(self) -> None:
        """Unlock the work folder. A run that failed before its first unit (no GPU, a missing
        model, a bad option) leaves nothing behind, so the corrected command starts cleanly."""
        if self._mutex is None:
            return
        started = bool(self.manifest) and not self.manifest.get("done") and not self.manifest.get("complete")
        if started and not self._keep:
            self.layout.discard()
        self._mutex.close()
        self._mutex = None
        work = self.layout.work
        if not work.is_dir() or self._keep:
            return
        left = {p.name for p in work.iterdir()}
        if self.layout.single and left <= {".run.pid"}:
            shutil.rmtree(work, ignore_errors=True)
        elif started and left <= {".run.pid"} and self._made_work:  # an OUT folder this call made and left empty
            shutil.rmtree(work, ignore_errors=True)
        elif started and left <= {".run.pid"}:
            (work / ".run.pid").unlink(missing_ok=True)

    def _complete(self) -> bool:
        layout = self.layout
        target_there = layout.out.is_file() if layout.single else bool(layout.parts())
        if layout.lock.is_file() and target_there:
            lock = read_lock(layout.lock)
            output = lock.get("output", {})
            old = {"config_hash": lock.get("config_hash"), "config_toml": lock.get("config_toml"),
                   "artifacts": lock.get("artifacts", {}),
                   "input": output.get("input"), "batch_size": output.get("batch_size")}
            diffs = self._differences(old)
            if diffs:
                self._refuse("a finished run", diffs)
            if layout.single:
                shutil.rmtree(layout.work, ignore_errors=True)
            s = self.summary
            s.skipped, s.queries, s.rows = True, output.get("queries", 0), output.get("rows", 0)
            s.quarantined, s.units = output.get("quarantined", 0), output.get("units", 0)
            s.quarantine = layout.quarantine if layout.quarantine.exists() else None
            s.lock = layout.lock
            return True
        if layout.manifest.is_file():
            return False
        if layout.single and layout.out.exists():
            raise DataError(f"{layout.out} exists and has no lock file {layout.lock.name} (it was not written by a "
                            "complete funnel run); pass --overwrite to replace it")
        if not layout.single and layout.parts():
            raise DataError(f"{layout.out} already has part files but no {MANIFEST_NAME} (they were not written by "
                            "funnel run); pass --overwrite to replace them, or write to another --out")
        return False

    def _load_or_start_manifest(self) -> None:
        layout = self.layout
        if layout.manifest.is_file():
            try:
                manifest = json.loads(layout.manifest.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(f"run manifest {layout.manifest} is unreadable ({exc}); "
                                "pass --overwrite to start over") from exc
            diffs = self._differences(manifest.get("identity", {}))
            if diffs and manifest.get("done"):
                self._refuse("an unfinished run", diffs)
            if diffs:  # it stopped before its first unit: nothing to lose, start over
                layout.discard()
            else:
                self.manifest = manifest
        if not self.manifest:
            shard_rows = _round_up(self.shard_rows_arg or DEFAULT_SHARD_ROWS, self.batch_size)
            self.manifest = {"format": MANIFEST_FORMAT, "identity": self.identity(), "engine": self.engine,
                             "shard_rows": shard_rows, "done": {}, "bad_ranges": []}
            self._save_manifest()
        self.units = self.input.units(self.manifest["shard_rows"])
        self.manifest["units"] = len(self.units)
        kept = set(self.manifest.setdefault("extra_parts", []))
        for p in layout.parts():
            if int(p.stem.split("-")[1]) >= len(self.units) and p.name not in kept:
                p.unlink()  # written by an engine that did not get to commit them
        shutil.rmtree(layout.work / "_ray", ignore_errors=True)
        qdir = layout.work / "_quarantine"
        for p in qdir.glob("*.parquet") if qdir.is_dir() else ():
            if str(int(p.stem.split("-")[1])) not in self.manifest["done"]:
                p.unlink()  # quarantine of a unit that was not committed; it is redone
        self.summary.units = len(self.units)
        self.summary.resumed_units = len(self.manifest["done"])

    def _save_manifest(self) -> None:
        from .artifacts import write_json_atomic

        write_json_atomic(self.layout.manifest, self.manifest)

    # -- running -----------------------------------------------------------------------------

    @property
    def shard_rows(self) -> int:
        return self.manifest["shard_rows"]

    def todo(self) -> list[Unit]:
        return [u for u in self.units if str(u.index) not in self.manifest["done"]]

    @property
    def done_queries(self) -> int:
        return sum(d["queries"] for d in self.manifest["done"].values())

    def output_schema(self) -> pa.Schema:
        """The schema every output shard gets: the pipeline's output on an empty batch."""
        return self.pipe.run(self.input.schema.empty_table()).schema

    def empty_input_schema(self) -> pa.Schema | None:
        """When the input has no rows: warn (before any model is loaded) and return the output
        schema the stages declare, so the run writes an empty output without loading anything.
        ``None`` when there are rows to run."""
        if self.input.rows:
            return None
        warnings.warn(EMPTY_INPUT.format(queries=self.queries), FunnelWarning, stacklevel=3)
        schema, where = self.input.schema, f"queries {self.queries}"
        for i, stage in enumerate(self.pipe.stages, start=1):
            schema = stage.output_schema_for(schema, where=where)
            where = f"the output of stage '{stage.name}' (step {i})"
        return schema

    def commit_unit(self, unit: Unit, queries: int, rows: int, quarantined: int, bad: str | None = None) -> None:
        """Record a unit done (its part file is already in place)."""
        self.manifest["done"][str(unit.index)] = {"queries": queries, "rows": rows, "quarantined": quarantined}
        if bad is not None:
            self.manifest["bad_ranges"].append([self.input.shards[unit.shard].name, bad])
        self._save_manifest()

    def write_quarantine_part(self, key: int | str, tables: list[pa.Table]) -> int:
        path = self.layout.quarantine_part(key)
        if not tables:
            path.unlink(missing_ok=True)
            return 0
        path.parent.mkdir(exist_ok=True)
        table = pa.concat_tables(tables).cast(QUARANTINE_SCHEMA)
        write_parquet_atomic(table, path)
        return table.num_rows

    # -- finishing ---------------------------------------------------------------------------

    def finish(self, schema: pa.Schema, extra_parts: list[Path] | None = None) -> None:
        """Merge (single file), write the quarantine and the lock; idempotent after a crash."""
        layout, s = self.layout, self.summary
        parts = layout.parts()
        if not parts:
            write_parquet_atomic(schema.empty_table(), layout.part(0))
            parts = [layout.part(0)]
        bad_rows = [(None, None, "input", f"shard {n}: {r}") for n, r in self.input.bad]
        bad_rows += [(None, None, "input", f"shard {n}: {r}") for n, r in self.manifest.get("bad_ranges", [])]
        qdir = layout.work / "_quarantine"
        qparts = sorted(qdir.glob("*.parquet")) if qdir.is_dir() else []
        if qparts or bad_rows:
            tmp = layout.tmp(layout.quarantine)
            with pq.ParquetWriter(tmp, QUARANTINE_SCHEMA) as writer:
                for p in qparts:
                    writer.write_table(pq.read_table(p).cast(QUARANTINE_SCHEMA))
                if bad_rows:
                    writer.write_table(pa.Table.from_pylist(
                        [dict(zip(QUARANTINE_SCHEMA.names, r)) for r in bad_rows], schema=QUARANTINE_SCHEMA))
            os.replace(tmp, layout.quarantine)
            s.quarantine = layout.quarantine
        else:
            layout.quarantine.unlink(missing_ok=True)
        s.quarantined = sum(pq.read_metadata(p).num_rows for p in qparts)
        s.rows = sum(pq.read_metadata(p).num_rows for p in parts)
        if layout.single:
            tmp = layout.tmp(layout.out)
            with pq.ParquetWriter(tmp, schema) as writer:
                for p in parts:
                    pf = pq.ParquetFile(p)
                    for g in range(pf.metadata.num_row_groups):
                        writer.write_table(conform_output(pf.read_row_group(g), schema))
            os.replace(tmp, layout.out)
        done = self.manifest.get("done", {})
        s.queries = sum(d["queries"] for d in done.values()) if done else s.queries
        output = {"engine": self.engine, "input": self.input.fingerprint(), "queries_path": str(self.queries),
                  "batch_size": self.batch_size, "shard_rows": self.manifest.get("shard_rows"),
                  "queries": s.queries, "rows": s.rows, "quarantined": s.quarantined, "units": len(self.units),
                  "parts": 1 if layout.single else len(parts), "bad_shards": [list(b) for b in self.input.bad],
                  "bad_ranges": self.manifest.get("bad_ranges", []),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.resolved.devices = pipeline_devices(self.pipe)
        write_lock(layout.lock, self.resolved, output)
        s.lock = layout.lock
        self.manifest["complete"] = True
        if layout.single:
            shutil.rmtree(layout.work, ignore_errors=True)
        else:
            self.manifest["complete"] = True
            self._save_manifest()
            shutil.rmtree(layout.work / "_quarantine", ignore_errors=True)


@contextmanager
def _held(job: BatchJob):
    try:
        yield job
    finally:
        job.release()


# -- the local engine --------------------------------------------------------------------------


def run_to_parquet(pipe: Pipeline, queries: str | Path, out: str | Path, *, batch_size: int = 256,
                   progress: bool = True, observer: Callable[[int, pa.Table], None] | None = None,
                   strict: bool = False, shard_rows: int | None = None, overwrite: bool = False,
                   skip_bad_shards: bool = False, lock: str | Path | None = None, name: str = "pipeline",
                   inputs: dict[str, str] | None = None) -> RunSummary:
    """Run ``pipe`` over every query in ``queries`` and write the candidates to ``out``, resumably.

    Rerunning after an interruption continues from the manifest; rerunning a complete run does
    nothing (``summary.skipped``) unless ``overwrite``. Rows a stage cannot process (null text,
    a NaN embedding ...) go with the stage and the reason to :func:`quarantine_file`, counted,
    never silently dropped; with ``strict`` the first such row fails the run instead.
    ``observer(step, table)`` sees the output of every stage of every batch processed in this
    call (the per-stage recall table of ``funnel demo``). ``lock`` is a lock file the pipeline
    must match (:func:`pipeline.lock.check_lock`); ``name`` and ``inputs`` are written into the
    lock's config. See the module docstring for the layout and the guarantees.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    job = BatchJob(pipe, queries, out, batch_size=batch_size, shard_rows=shard_rows, overwrite=overwrite,
                   skip_bad_shards=skip_bad_shards, lock=lock, name=name, inputs=inputs)
    with _held(job):
        if job.prepare():
            job.summary.seconds = time.perf_counter() - t0
            return job.summary
        summary, layout = job.summary, job.layout
        schema = job.empty_input_schema()
        if schema is None:
            t_load = time.perf_counter()
            pipe.warm_up()
            summary.load_seconds = time.perf_counter() - t_load
            schema = job.output_schema()
        with tqdm(total=job.input.rows, initial=job.done_queries, desc="queries", unit="q", smoothing=0.1,
                  disable=not progress or not job.todo()) as bar:
            for unit in job.todo():
                part, tmp = layout.part(unit.index), layout.tmp(layout.part(unit.index))
                rejected: list[pa.Table] = []
                queries_done = rows = 0
                try:
                    with pq.ParquetWriter(tmp, schema) as writer:
                        held: list[pa.Table] = []
                        for batch in job.input.batches(unit, batch_size):
                            result = pipe.run(batch, summary.stages, observer, quarantine=None if strict else rejected)
                            held.append(conform_output(result, schema))
                            rows += result.num_rows
                            if sum(t.num_rows for t in held) >= ROW_GROUP_ROWS:
                                writer.write_table(pa.concat_tables(held))
                                held = []
                            queries_done += batch.num_rows
                            summary.processed += batch.num_rows
                            bar.update(batch.num_rows)
                        if held:
                            writer.write_table(pa.concat_tables(held))
                except BadShardError as exc:
                    tmp.unlink(missing_ok=True)
                    if not skip_bad_shards:
                        raise
                    write_parquet_atomic(schema.empty_table(), part)
                    job.write_quarantine_part(unit.index, [])
                    job.commit_unit(unit, 0, 0, 0, bad=exc.reason)
                    bar.update(unit.stop - unit.start - queries_done)
                    continue
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
                n_bad = job.write_quarantine_part(unit.index, rejected)
                os.replace(tmp, part)
                job.commit_unit(unit, queries_done, rows, n_bad)
        job.finish(schema)
        summary.seconds = time.perf_counter() - t0
        return summary
