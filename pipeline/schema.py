"""Column requirements and their checks.

A stage declares the columns it *needs* (``input_schema``) and the columns it *adds or
replaces* (``output_schema``) as :class:`pyarrow.Schema` objects. Types are matched by family,
not bit-for-bit: any integer satisfies an integer column, ``string``/``large_string`` are
interchangeable, and a field typed :data:`ANY` accepts every type (ids may be integers in one
shop and strings in another).
"""

from __future__ import annotations

from typing import Iterable

import pyarrow as pa

from .errors import MISSING_COLUMN, WRONG_TYPE, SchemaError

__all__ = ["ANY", "EMBEDDING", "compatible", "check_columns", "describe", "merge_schema", "keep_input_types", "take_rows"]

#: Field type meaning "any Arrow type".
ANY = pa.null()
#: Field type of an embedding column: a list of float32 (fixed size or not).
EMBEDDING = pa.list_(pa.float32())


def _family(t: pa.DataType) -> str:
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", lambda _: False)(t):
        return "string"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return "list"
    return str(t)


def compatible(expected: pa.DataType, found: pa.DataType) -> bool:
    """Whether a column of type ``found`` satisfies a requirement of type ``expected``."""
    if expected == ANY or found == ANY:
        return True
    fe, ff = _family(expected), _family(found)
    if fe != ff:
        # an integer column is an acceptable float feature
        return fe == "float" and ff == "int"
    if fe == "list":
        return compatible(expected.value_type, found.value_type)
    return True


def describe(t: pa.DataType) -> str:
    """Short human name of a type, ``any`` for :data:`ANY`."""
    return "any" if t == ANY else str(t)


def check_columns(required: pa.Schema, found: pa.Schema, *, stage: str, where: str) -> None:
    """Raise :class:`SchemaError` naming ``stage``, the column, and ``where`` it was looked for."""
    for field in required:
        idx = found.get_field_index(field.name)
        if idx < 0:
            raise SchemaError(
                MISSING_COLUMN.format(
                    stage=stage, column=field.name, type=describe(field.type), where=where,
                    found=", ".join(found.names) or "(no columns)",
                )
            )
        got = found.field(idx).type
        if not compatible(field.type, got):
            raise SchemaError(
                WRONG_TYPE.format(stage=stage, column=field.name, expected=describe(field.type), where=where, found=got)
            )


def merge_schema(base: pa.Schema, added: pa.Schema, dropped: Iterable[str] = ()) -> pa.Schema:
    """``base`` without ``dropped`` columns, with ``added`` columns appended or replacing."""
    drop = set(dropped) | set(added.names)
    kept = [f for f in base if f.name not in drop]
    return pa.schema(kept + list(added))


def keep_input_types(out: pa.Table, source: pa.Schema) -> pa.Table:
    """Cast columns that passed through a stage back to their input types.

    Engines such as Polars widen ``string`` to ``large_string`` on the way back to Arrow; a
    stage that passes a column through should not change its type.
    """
    fields = []
    for f in out.schema:
        idx = source.get_field_index(f.name)
        fields.append(source.field(idx) if idx >= 0 else f)
    target = pa.schema(fields)
    return out if target == out.schema else out.cast(target)


def take_rows(table: pa.Table, indices: pa.Array) -> pa.Table:
    """``table.take(indices)``, also for tables with view columns (``string_view`` from Polars),
    which Arrow has no take kernel for: those go through Polars and keep their types."""
    try:
        return table.take(indices)
    except pa.ArrowNotImplementedError:
        import polars as pl

        return pl.from_arrow(table)[pl.from_arrow(indices)].to_arrow().cast(table.schema)
