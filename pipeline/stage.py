"""The one stage contract, and composition of stages into a pipeline.

A **stage** is one step of a retrieval and ranking pipeline — encode, recall, filter, rank,
display, or anything a plug-in adds. Every stage follows the same contract:

* **Arrow in, Arrow out.** ``stage(batch)`` takes a :class:`pyarrow.Table` or
  :class:`pyarrow.RecordBatch` and returns a new :class:`pyarrow.Table`. It never mutates its
  input. Columns it does not know about pass through unchanged, so a stage can be dropped into
  any pipeline whose upstream provides what it needs.
* **Declared columns.** ``input_schema`` lists the columns the stage needs, ``output_schema``
  the columns it adds or replaces, ``drops`` the columns it removes. These are class-level
  declarations; a stage whose needs depend on its parameters (a filter that reads the columns
  its rules name, a ranker that reads the features its model was trained on) extends them in
  :meth:`Stage.required_columns` / :meth:`Stage.produced_columns`. Declarations are checked when
  stages are composed — ``encode >> recall`` fails right there, naming both stages and the
  missing column — and the input of every call is checked against them again, cheaply.
* **Light construction.** ``__init__`` only stores its keyword arguments, under the same names,
  so :meth:`Stage.get_params` can return them and a config can recreate the stage. It loads
  nothing, opens no file and touches no device. A stage that needs parameter validation does it
  in :meth:`Stage.validate_params`, which composition calls.
* **Heavy work in ``warm_up()``.** Loading a model or index, moving it to a GPU and resolving
  ``device="auto"`` happen in :meth:`Stage.warm_up`, which is idempotent. State learned or
  loaded there ends in ``_`` (scikit-learn's convention); the resolved device is ``device_``.
  Calling a stage warms it up first if needed.
* **One class per algorithm.** The CPU and CUDA code paths of an algorithm live in the same
  class behind its ``device`` parameter; ``tags.devices`` says which exist.

Stages are composed with ``>>`` into a :class:`Pipeline`, itself callable on a batch::

    pipe = encode >> recall >> rules >> features >> ranker >> display
    out = pipe(queries)            # pa.Table, long form: one row per shown candidate

Subclasses implement :meth:`Stage.transform`. A subclass that does not, and does not mark
itself abstract, is rejected when it is defined.
"""

from __future__ import annotations

import copy
import inspect
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Sequence

import pyarrow as pa

from .errors import BAD_PARAM, ConfigError, DataError
from .schema import ANY, check_columns, merge_schema

__all__ = ["Stage", "StageTags", "Pipeline", "StageStats", "as_table"]


@dataclass(frozen=True)
class StageTags:
    """Facts about a stage that tools (the conformance kit, runners, benchmarks) act on.

    Attributes:
        devices: the devices this class has a code path for, ``("cpu",)`` or ``("cpu", "cuda")``.
        batch_invariant: running on a batch gives the same rows as running on each part of it
            split at query boundaries and concatenating (true for almost every stage; a stage
            that normalises across the whole batch is not).
        requires_build: needs artifacts (an index, a trained model) made by ``funnel build``.
        deterministic: the same input gives the same output, bit for bit, on one device.
        level: ``"query"`` when rows are queries, ``"candidate"`` when rows are (query, item)
            pairs after recall; the kit uses it to split batches at query boundaries.
    """

    devices: tuple[str, ...] = ("cpu",)
    batch_invariant: bool = True
    requires_build: bool = False
    deterministic: bool = True
    level: str = "candidate"


def as_table(batch: pa.Table | pa.RecordBatch) -> pa.Table:
    """Accept a RecordBatch or a Table, return a Table (zero-copy)."""
    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, pa.RecordBatch):
        return pa.Table.from_batches([batch])
    raise DataError(f"a stage takes a pyarrow Table or RecordBatch; got {type(batch).__name__}")


class Stage:
    """Base class of every stage. See the module docstring for the contract."""

    #: registry key, ``role.backend`` (``"recall.faiss"``); set by every concrete subclass
    name: ClassVar[str] = ""
    #: columns the stage needs
    input_schema: ClassVar[pa.Schema] = pa.schema([])
    #: columns the stage adds or replaces
    output_schema: ClassVar[pa.Schema] = pa.schema([])
    #: columns the stage removes
    drops: ClassVar[tuple[str, ...]] = ()
    tags: ClassVar[StageTags] = StageTags()
    #: name of the parameter that sets how many rows per query are shown (display stages)
    top_param: ClassVar[str | None] = None
    #: parameters holding file paths, resolved against the config file's folder
    path_params: ClassVar[tuple[str, ...]] = ()
    #: parameters that change the output by floating-point rounding at most (a kernel choice,
    #: compilation): build keys of artifacts made from this stage's output ignore them, so
    #: switching one does not make an index or a ranker stale
    same_results_params: ClassVar[tuple[str, ...]] = ()
    #: set ``True`` on intermediate base classes that do not implement ``transform``
    abstract: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("abstract", False):
            return
        if cls.transform is Stage.transform:
            raise TypeError(f"stage class {cls.__name__} must implement transform(self, table) -> pa.Table")
        if not cls.name or "." not in cls.name:
            raise TypeError(f"stage class {cls.__name__} must set name = 'role.backend' (got {cls.name!r})")

    # -- parameters ---------------------------------------------------------------------------

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        return [p.name for p in sig.parameters.values() if p.name != "self" and p.kind in kinds]

    def get_params(self) -> dict[str, Any]:
        """The ``__init__`` keyword arguments, as stored (never resolved or loaded state)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def clone(self, **overrides: Any) -> "Stage":
        """A new, cold stage of the same class with the same parameters, some replaced."""
        params = copy.deepcopy(self.get_params())
        unknown = set(overrides) - set(params)
        if unknown:
            raise ConfigError(f"stage '{self.name}' has no parameter(s) {sorted(unknown)}; it has {sorted(params)}")
        params.update(overrides)
        new = type(self)(**params)
        new._base_dir = self._base_dir
        return new

    def validate_params(self) -> None:
        """Check parameter values; raise :class:`ConfigError` built from :data:`BAD_PARAM`.

        Called when the stage is composed into a pipeline (before any data flows). The default
        checks ``device`` against ``tags.devices``.
        """
        device = getattr(self, "device", None)
        if device is not None and device != "auto" and device not in self.tags.devices:
            raise ConfigError(
                BAD_PARAM.format(param="device", stage=self.name, expected=f"one of {('auto',) + self.tags.devices}", found=device)
            )

    def _bad_param(self, param: str, expected: str) -> ConfigError:
        return ConfigError(BAD_PARAM.format(param=param, stage=self.name, expected=expected, found=getattr(self, param)))

    # -- files -------------------------------------------------------------------------------

    _base_dir: Path | None = None

    def resolve_path(self, value: str | Path) -> Path:
        """A path parameter made absolute against the config file's folder.

        A relative path may not climb out of that folder (``../../etc``); write an absolute
        path to point elsewhere on purpose. The check is on the path as written: symbolic links
        inside the folder are followed wherever they point (a model or index folder linked in
        from a shared disk is the user's choice, not an escape).
        """
        p = Path(value)
        if p.is_absolute():
            return p
        base = (self._base_dir or Path.cwd()).resolve()
        written = Path(os.path.normpath(base / p))
        if base != written and base not in written.parents:
            raise ConfigError(
                f"stage '{self.name}': relative path {str(value)!r} leaves the config folder {base}; "
                "write an absolute path to use a file outside it"
            )
        return written.resolve()

    # -- schemas -----------------------------------------------------------------------------

    def required_columns(self) -> pa.Schema:
        """Columns this instance needs (class declaration plus any its parameters add)."""
        return self.input_schema

    def produced_columns(self) -> pa.Schema:
        """Columns this instance adds or replaces."""
        return self.output_schema

    def dropped_columns(self) -> tuple[str, ...]:
        """Columns this instance removes."""
        return self.drops

    def output_schema_for(self, schema: pa.Schema, *, where: str = "the input") -> pa.Schema:
        """Check ``schema`` provides what this stage needs and return what it will output."""
        check_columns(self.required_columns(), schema, stage=self.name, where=where)
        return merge_schema(schema, self.produced_columns(), self.dropped_columns())

    # -- running -----------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Load models and indexes, resolve ``device`` into ``device_``. Idempotent.

        Subclasses extend this (calling ``super().warm_up()`` first) and return early when
        already warm.
        """
        from .device import resolve_device

        if getattr(self, "device_", None) is None:
            self.device_ = resolve_device(getattr(self, "device", "cpu") or "cpu", stage=self.name, supported=self.tags.devices)

    @property
    def is_warm(self) -> bool:
        return getattr(self, "device_", None) is not None

    def invalid_rows(self, table: pa.Table) -> pa.Array | None:
        """Why each row of ``table`` cannot be processed: a string per row, null when the row is fine.

        Return ``None`` when every row is fine (the default). A pipeline run with a quarantine
        moves such rows out, with the reason, before calling :meth:`transform`, so one bad
        row does not fail a batch of thousands; without a quarantine (``--strict``) the stage
        meets them in ``transform`` and raises. Keep it cheap and vectorised.
        """
        return None

    def transform(self, table: pa.Table) -> pa.Table:
        """Compute the output table from a checked, non-mutable input table."""
        raise NotImplementedError  # pragma: no cover - __init_subclass__ forbids reaching it

    def __call__(self, batch: pa.Table | pa.RecordBatch) -> pa.Table:
        table = as_table(batch)
        check_columns(self.required_columns(), table.schema, stage=self.name, where="the input batch")
        if not self.is_warm:
            self.warm_up()
        return self.transform(table)

    # -- composition and display -------------------------------------------------------------

    def __rshift__(self, other: "Stage | Pipeline") -> "Pipeline":
        return Pipeline([self, other])

    def __repr__(self) -> str:
        sig = inspect.signature(type(self).__init__)
        shown = []
        for name, value in self.get_params().items():
            default = sig.parameters[name].default
            if default is inspect.Parameter.empty or value != default:
                shown.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"


@dataclass
class StageStats:
    """What one stage did over a run: rows in and out, seconds per batch."""

    name: str
    rows_in: int = 0
    rows_out: int = 0
    seconds: list[float] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds))


def stage_table(stats: Sequence[StageStats], quality: dict[str, dict[int, float]] | None = None) -> str:
    """Per-stage rows in/out and latency, plus one column per ``quality`` entry (``{header: {step: value}}``,
    0-based steps; a step without a value is left blank), as text."""
    import statistics

    quality = quality or {}
    head = f"{'step':<4} {'stage':<30} {'rows in':>9} {'rows out':>9} {'p50 ms/batch':>13} {'total s':>8}"
    head += "".join(f" {name:>7}" for name in quality)
    lines = [head, "-" * len(head)]
    for i, s in enumerate(stats):
        p50 = statistics.median(s.seconds) * 1000 if s.seconds else 0.0
        line = f"{i + 1:<4} {s.name:<30} {s.rows_in:>9} {s.rows_out:>9} {p50:>13.2f} {s.total_seconds:>8.2f}"
        line += "".join(f" {values[i]:>7.3f}" if i in values else f" {'':>7}" for values in quality.values())
        lines.append(line.rstrip())
    return "\n".join(lines)


QUARANTINE_SCHEMA = pa.schema([pa.field("query_id", pa.string()), pa.field("item_id", pa.string()),
                               pa.field("stage", pa.string()), pa.field("reason", pa.string())])


def _quarantine(stage: Stage, table: pa.Table, out: list[pa.Table]) -> pa.Table:
    """Move the rows ``stage`` cannot process into ``out``; return the others."""
    import pyarrow.compute as pc

    if table.num_rows == 0:
        return table
    reasons = stage.invalid_rows(table)
    if reasons is None or reasons.null_count == len(reasons):
        return table
    bad = pc.is_valid(reasons)
    rejected = table.filter(bad)

    def ids(col: str) -> pa.Array:
        if col not in rejected.column_names:
            return pa.nulls(rejected.num_rows, pa.string())
        return pc.cast(rejected.column(col), pa.string())

    out.append(pa.table([ids("query_id"), ids("item_id"), pa.repeat(pa.scalar(stage.name), rejected.num_rows),
                         reasons.filter(bad).cast(pa.string())], schema=QUARANTINE_SCHEMA))
    return table.filter(pc.invert(bad))


DEFAULT_INPUTS = pa.schema([pa.field("query_id", ANY)])


class Pipeline:
    """Stages run one after another; built with ``a >> b`` or ``Pipeline([a, b, ...])``.

    Composition checks, before any data flows, that every stage finds the columns it needs in
    what the pipeline's inputs and the stages before it provide; the error names the stage that
    needs the column, the stage (or input) that should have provided it, and what it has.

    Args:
        stages: stages or pipelines (flattened).
        inputs: the columns the pipeline's input batches have. Defaults to ``query_id`` plus
            whatever the first stage needs. Declare extra query columns here (a user segment, a
            history) when a later stage reads them.
    """

    def __init__(self, stages: Sequence["Stage | Pipeline"], inputs: pa.Schema | None = None):
        flat: list[Stage] = []
        for s in stages:
            if isinstance(s, Pipeline):
                flat.extend(s.stages)
            elif isinstance(s, Stage):
                flat.append(s)
            else:
                raise ConfigError(f"a pipeline is built from stages; got {type(s).__name__}")
        if not flat:
            raise ConfigError("a pipeline needs at least one stage")
        self.stages: list[Stage] = flat
        if inputs is None:
            inputs = merge_schema(DEFAULT_INPUTS, flat[0].required_columns())
        self.inputs = inputs
        self.schemas = self.check()

    def check(self) -> list[pa.Schema]:
        """Validate parameters and columns of every stage; return the schema after each."""
        schema, where, out = self.inputs, "the pipeline input", []
        for i, stage in enumerate(self.stages, start=1):
            stage.validate_params()
            schema = stage.output_schema_for(schema, where=where)
            if i > 1 and hasattr(stage, "check_upstream"):
                stage.check_upstream(Pipeline(self.stages[: i - 1], inputs=self.inputs))
            out.append(schema)
            where = f"the output of stage '{stage.name}' (step {i})"
        return out

    @property
    def output_schema(self) -> pa.Schema:
        return self.schemas[-1]

    def __rshift__(self, other: "Stage | Pipeline") -> "Pipeline":
        return Pipeline([self, other], inputs=self.inputs)

    def __iter__(self):
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Pipeline(self.stages[i], inputs=self.inputs if (i.start or 0) == 0 else None)
        return self.stages[i]

    def __repr__(self) -> str:
        return " >> ".join(repr(s) for s in self.stages)

    def warm_up(self) -> "Pipeline":
        for stage in self.stages:
            stage.warm_up()
        return self

    def __call__(self, batch: pa.Table | pa.RecordBatch) -> pa.Table:
        return self.run(batch)

    def run(self, batch: pa.Table | pa.RecordBatch, stats: list[StageStats] | None = None,
            observer: Callable[[int, pa.Table], None] | None = None,
            quarantine: list[pa.Table] | None = None) -> pa.Table:
        """Run every stage on ``batch``.

        ``stats`` (a list, filled on first use) accumulates rows and seconds per stage;
        ``observer(step, table)`` sees each stage's output (per-stage recall, debugging).
        With ``quarantine`` (a list), rows a stage reports through :meth:`Stage.invalid_rows`
        are moved there — as ``query_id``, ``stage``, ``reason`` (and ``item_id`` after recall) —
        instead of reaching the stage; without it, the stage raises on them.
        """
        table = as_table(batch)
        check_columns(self.inputs, table.schema, stage=self.stages[0].name, where="the pipeline input")
        if stats is not None and not stats:
            stats.extend(StageStats(s.name) for s in self.stages)
        for i, stage in enumerate(self.stages):
            if not stage.is_warm:
                stage.warm_up()
            t0 = time.perf_counter()
            rows_in = table.num_rows
            if quarantine is not None:
                table = _quarantine(stage, table, quarantine)
            table = stage(table)
            if stats is not None:
                stats[i].seconds.append(time.perf_counter() - t0)
                stats[i].rows_in += rows_in
                stats[i].rows_out += table.num_rows
            if observer is not None:
                observer(i, table)
        return table

    def run_one(self, **query: Any) -> pa.Table:
        """Answer one query in process: ``pipe.run_one(query_id="q1", query="drill bits")``."""
        return self.run(pa.Table.from_pylist([query]))

    def with_top(self, n: int) -> "Pipeline":
        """A copy whose last display stage shows ``n`` rows per query."""
        stages = list(self.stages)
        for i in range(len(stages) - 1, -1, -1):
            if stages[i].top_param:
                stages[i] = stages[i].clone(**{stages[i].top_param: n})
                return Pipeline(stages, inputs=self.inputs)
        raise ConfigError("--top needs a display stage (one with a top-N parameter) in the pipeline")

    def with_device(self, device: str | None) -> "Pipeline":
        """A copy whose stages run on ``device`` (``cpu``, ``cuda`` or ``auto``); ``None`` keeps them.

        Only stages that have a ``device`` parameter and list that device in their tags (or are
        asked for ``auto``) change; the others keep running where they ran.
        """
        if device is None:
            return self
        stages = [s.clone(device=device) if "device" in s.get_params() and device in (("auto",) + s.tags.devices) else s
                  for s in self.stages]
        return Pipeline(stages, inputs=self.inputs)

    def stage_names(self) -> Iterable[str]:
        return (s.name for s in self.stages)
