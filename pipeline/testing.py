"""Conformance kit: the checks every stage — built-in or plug-in — must pass.

Modelled on scikit-learn's ``parametrize_with_checks``. Give it example cases (a stage and a
valid input batch) and it yields one pytest case per check::

    from pipeline.testing import StageCase, parametrize_with_checks

    @parametrize_with_checks([StageCase(MyFilter(max_per_brand=2), example_batch())])
    def test_my_stage(case, check):
        check(case)

The checks:

=========================  ==================================================================
``declared_schemas``       ``name`` is ``role.backend``; schemas are :class:`pyarrow.Schema`;
                           tags are :class:`StageTags`; ``device`` choices match the tags
``params``                 ``get_params()`` returns the ``__init__`` arguments; ``clone()`` is
                           equal; construction loaded nothing (no ``*_`` attributes)
``config_round_trip``      spec → TOML → stage gives equal parameters, and TOML is a fixed point
``output_schema``          the output has exactly the columns composition predicted, of
                           compatible types
``empty_batch``            zero rows in → zero rows out, same columns
``missing_column``         dropping any required column raises :class:`SchemaError` naming the
                           stage and the column
``no_input_mutation``      the input batch is unchanged after the call
``deterministic``          two calls give equal output (if ``tags.deterministic``)
``batch_split``            output on the batch == concatenated outputs on its halves, split at a
                           query boundary (if ``tags.batch_invariant``)
``warm_up_idempotent``     calling ``warm_up()`` again changes nothing
``cpu_gpu_parity``         CPU and CUDA outputs agree within tolerance, rankings tie-aware
                           (skipped without a CUDA device or a CUDA path)
=========================  ==================================================================

A case can mark checks as expected failures with a reason (``xfail={"batch_split": "..."}``),
as scikit-learn's tags do.
"""

from __future__ import annotations

import copy
import inspect
import tomllib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import tomli_w

from .columns import QUERY_ID, RANK, SCORE
from .config import stage_from_spec, stage_to_spec
from .errors import SchemaError
from .schema import compatible
from .stage import Stage, StageTags

__all__ = ["StageCase", "stage_checks", "check_stage", "parametrize_with_checks", "assert_tables_close",
           "split_at_query_boundary", "CHECKS"]

FLOAT_RTOL = 1e-4
FLOAT_ATOL = 1e-5


@dataclass
class StageCase:
    """A stage and a valid example input for it (several queries, so it can be split)."""

    stage: Stage
    batch: pa.Table
    id: str | None = None
    xfail: dict[str, str] = field(default_factory=dict)
    #: score tolerance for CPU/GPU parity (fp16/bf16 paths need more)
    parity_atol: float = 1e-3

    def __post_init__(self) -> None:
        if isinstance(self.batch, pa.RecordBatch):
            self.batch = pa.Table.from_batches([self.batch])
        if self.id is None:
            self.id = self.stage.name


# -- helpers ---------------------------------------------------------------------------------


def _is_float_like(t: pa.DataType) -> bool:
    if pa.types.is_floating(t):
        return True
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _is_float_like(t.value_type)
    return False


def _float_values(col: pa.ChunkedArray) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    while not pa.types.is_floating(arr.type):
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=False).astype(np.float64)


def assert_tables_close(actual: pa.Table, expected: pa.Table, *, rtol: float = FLOAT_RTOL, atol: float = FLOAT_ATOL,
                        what: str = "output") -> None:
    """Same columns and rows; float columns (and lists of floats) within tolerance."""
    assert actual.column_names == expected.column_names, f"{what}: columns {actual.column_names} != {expected.column_names}"
    assert actual.num_rows == expected.num_rows, f"{what}: {actual.num_rows} rows != {expected.num_rows}"
    for name in expected.column_names:
        a, e = actual.column(name), expected.column(name)
        if _is_float_like(e.type) and _is_float_like(a.type):
            np.testing.assert_allclose(_float_values(a), _float_values(e), rtol=rtol, atol=atol,
                                       err_msg=f"{what}: column {name!r}")
        else:
            assert a.to_pylist() == e.to_pylist(), f"{what}: column {name!r} differs"


def split_at_query_boundary(batch: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Two parts of ``batch``, cut where a new query starts, near the middle."""
    if QUERY_ID not in batch.column_names or batch.num_rows < 2:
        half = batch.num_rows // 2
        return batch.slice(0, half), batch.slice(half)
    ids = batch.column(QUERY_ID).to_pylist()
    starts = [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]]
    if not starts:
        return batch, batch.slice(0, 0)
    cut = min(starts, key=lambda i: abs(i - len(ids) / 2))
    return batch.slice(0, cut), batch.slice(cut)


def _run(stage: Stage, batch: pa.Table) -> pa.Table:
    return stage(batch)


# -- checks ----------------------------------------------------------------------------------


def check_declared_schemas(case: StageCase) -> None:
    cls = type(case.stage)
    assert isinstance(cls.name, str) and cls.name.count(".") >= 1, f"name must be 'role.backend'; got {cls.name!r}"
    for attr in ("input_schema", "output_schema"):
        assert isinstance(getattr(cls, attr), pa.Schema), f"{attr} must be a pyarrow.Schema"
    assert isinstance(cls.tags, StageTags), "tags must be a StageTags"
    assert set(cls.tags.devices) <= {"cpu", "cuda"} and "cpu" in cls.tags.devices, f"bad devices {cls.tags.devices}"
    assert isinstance(case.stage.required_columns(), pa.Schema)
    assert isinstance(case.stage.produced_columns(), pa.Schema)


def check_params(case: StageCase) -> None:
    stage = case.stage.clone()
    params = stage.get_params()
    names = list(inspect.signature(type(stage).__init__).parameters)[1:]
    assert list(params) == names, f"get_params() keys {list(params)} != __init__ parameters {names}"
    leaked = [a for a in vars(stage) if a.endswith("_") and not a.startswith("_")]
    assert not leaked, f"__init__ must only store parameters; it set {leaked}"
    assert stage.clone().get_params() == params, "clone() changed the parameters"


def check_config_round_trip(case: StageCase) -> None:
    spec = stage_to_spec(case.stage)
    text = tomli_w.dumps({"stages": [spec]})
    back = stage_from_spec(tomllib.loads(text)["stages"][0], index=1)
    assert type(back) is type(case.stage)
    assert stage_to_spec(back) == spec, f"round trip changed the spec: {stage_to_spec(back)} != {spec}"
    assert tomli_w.dumps({"stages": [stage_to_spec(back)]}) == text, "TOML is not a fixed point"


def check_output_schema(case: StageCase) -> None:
    out = _run(case.stage, case.batch)
    predicted = case.stage.output_schema_for(case.batch.schema)
    assert set(out.column_names) == set(predicted.names), (
        f"output columns {sorted(out.column_names)} != predicted {sorted(predicted.names)}")
    for f in predicted:
        got = out.schema.field(f.name).type
        assert compatible(f.type, got), f"column {f.name!r}: declared {f.type}, produced {got}"


def check_empty_batch(case: StageCase) -> None:
    empty = case.batch.slice(0, 0)
    out = _run(case.stage, empty)
    assert out.num_rows == 0, f"empty input gave {out.num_rows} rows"
    full = _run(case.stage, case.batch)
    assert set(out.column_names) == set(full.column_names), f"empty output columns {out.column_names} != {full.column_names}"


def check_missing_column(case: StageCase) -> None:
    for field_ in case.stage.required_columns():
        if field_.name not in case.batch.column_names:
            continue
        broken = case.batch.drop_columns([field_.name])
        try:
            _run(case.stage, broken)
        except SchemaError as exc:
            msg = str(exc)
            assert case.stage.name in msg and field_.name in msg, f"error must name stage and column: {msg}"
        else:
            raise AssertionError(f"dropping required column {field_.name!r} raised no SchemaError")


def check_no_input_mutation(case: StageCase) -> None:
    before = copy.deepcopy(case.batch.to_pydict())
    schema = case.batch.schema
    _run(case.stage, case.batch)
    assert case.batch.schema == schema, "the input schema changed"
    assert case.batch.to_pydict() == before, "the input batch was modified"


def check_deterministic(case: StageCase) -> None:
    if not case.stage.tags.deterministic:
        return
    assert_tables_close(_run(case.stage, case.batch), _run(case.stage, case.batch), what="second call")


def check_batch_split(case: StageCase) -> None:
    if not case.stage.tags.batch_invariant:
        return
    first, second = split_at_query_boundary(case.batch)
    whole = _run(case.stage, case.batch)
    parts = pa.concat_tables([_run(case.stage, first), _run(case.stage, second)], promote_options="permissive")
    assert_tables_close(parts.select(whole.column_names), whole, what="split batch")


def check_warm_up_idempotent(case: StageCase) -> None:
    stage = case.stage
    stage.warm_up()
    state = {k: id(v) for k, v in vars(stage).items() if k.endswith("_")}
    stage.warm_up()
    after = {k: id(v) for k, v in vars(stage).items() if k.endswith("_")}
    assert state == after, "a second warm_up() replaced loaded state"


def _cuda() -> bool:
    from .device import cuda_available

    return cuda_available()


def check_cpu_gpu_parity(case: StageCase) -> None:
    import pytest

    if "cuda" not in case.stage.tags.devices:
        pytest.skip(f"stage '{case.stage.name}' has no CUDA path")
    if not _cuda():
        pytest.skip("no CUDA device visible")
    cpu = _run(case.stage.clone(device="cpu"), case.batch)
    gpu = _run(case.stage.clone(device="cuda"), case.batch)
    assert_parity(cpu, gpu, atol=case.parity_atol)


def assert_parity(cpu: pa.Table, gpu: pa.Table, *, atol: float) -> None:
    """CPU vs GPU: float columns within ``atol``; per-query rankings equal up to ties.

    Like faiss' ``check_ref_knn_with_draws``: items whose scores lie within ``atol`` of the
    score at the cut may swap in or out of the list.
    """
    assert set(cpu.column_names) == set(gpu.column_names), "CPU and GPU outputs have different columns"
    if not {QUERY_ID, SCORE, RANK} <= set(cpu.column_names) or "item_id" not in cpu.column_names:
        assert_tables_close(gpu.select(cpu.column_names), cpu, rtol=0, atol=atol, what="GPU output")
        return
    by_q: dict = {}
    for name, table in (("cpu", cpu), ("gpu", gpu)):
        for q, item, score in zip(table.column(QUERY_ID).to_pylist(), table.column("item_id").to_pylist(),
                                  table.column(SCORE).to_pylist()):
            by_q.setdefault(q, {}).setdefault(name, {})[item] = score
    for q, sides in by_q.items():
        c, g = sides.get("cpu", {}), sides.get("gpu", {})
        cs, gs = sorted(c.values(), reverse=True), sorted(g.values(), reverse=True)
        assert len(cs) == len(gs), f"query {q!r}: {len(cs)} CPU rows vs {len(gs)} GPU rows"
        np.testing.assert_allclose(gs, cs, atol=atol, err_msg=f"query {q!r}: sorted scores differ")
        if not cs:
            continue
        cut = cs[-1]
        firm_c = {i for i, s in c.items() if s > cut + atol}
        firm_g = {i for i, s in g.items() if s > cut + atol}
        assert firm_c == firm_g, f"query {q!r}: items above the tie band differ: {firm_c ^ firm_g}"


CHECKS: dict[str, Callable[[StageCase], None]] = {
    "declared_schemas": check_declared_schemas,
    "params": check_params,
    "config_round_trip": check_config_round_trip,
    "output_schema": check_output_schema,
    "empty_batch": check_empty_batch,
    "missing_column": check_missing_column,
    "no_input_mutation": check_no_input_mutation,
    "deterministic": check_deterministic,
    "batch_split": check_batch_split,
    "warm_up_idempotent": check_warm_up_idempotent,
    "cpu_gpu_parity": check_cpu_gpu_parity,
}


def stage_checks(case: StageCase) -> Iterator[tuple[str, Callable[[StageCase], None]]]:
    """``(name, check)`` pairs for one case."""
    yield from CHECKS.items()


def check_stage(case: StageCase) -> None:
    """Run every check on ``case`` outside pytest; raise the first failure."""
    for name, check in stage_checks(case):
        if name in case.xfail or name == "cpu_gpu_parity":
            continue
        check(case)


def parametrize_with_checks(cases: Iterable[StageCase]):
    """A ``pytest.mark.parametrize`` over ``(case, check)`` with readable ids."""
    import pytest

    params = []
    for case in cases:
        for name, check in stage_checks(case):
            marks = [pytest.mark.xfail(reason=case.xfail[name], strict=False)] if name in case.xfail else []
            if name == "cpu_gpu_parity":
                marks.append(pytest.mark.gpu)
            params.append(pytest.param(case, check, id=f"{case.id}-{name}", marks=marks))
    return pytest.mark.parametrize("case, check", params)
