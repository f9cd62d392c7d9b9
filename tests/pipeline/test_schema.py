import pyarrow as pa

from pipeline.schema import keep_input_types, take_rows


def test_take_rows_also_takes_view_columns():
    table = pa.table({"a": pa.array(["x", "y", None], pa.string_view()), "b": [1, 2, 3]})
    out = take_rows(table, pa.array([2, 0]))
    assert out.schema == table.schema and out.to_pydict() == {"a": [None, "x"], "b": [3, 1]}
    plain = table.cast(pa.schema([("a", pa.string()), ("b", pa.int64())]))
    assert take_rows(plain, pa.array([1])).to_pydict() == {"a": ["y"], "b": [2]}


def test_keep_input_types_casts_passed_through_columns_back():
    source = pa.schema([("a", pa.string())])
    out = pa.table({"a": pa.array(["x"], pa.large_string()), "new": [1]})
    assert keep_input_types(out, source).schema == pa.schema([("a", pa.string()), ("new", pa.int64())])
