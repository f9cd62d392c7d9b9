import datetime
import tomllib

import polars as pl
import pyarrow as pa
import pytest

from pipeline.errors import ConfigError, DataError, SchemaError
from pipeline.schema import ANY
from pipeline.stage import Pipeline, Stage
from stages.rules import OPS, RuleFilter


def batch() -> pa.Table:
    return pa.table({
        "query_id": pa.array(["q1", "q1", "q1", "q1", "q2", "q2"], pa.large_string()),
        "item_id": pa.array([1, 2, 3, 4, 5, 6], pa.int64()),
        "rank": pa.array([1, 2, 3, 4, 1, 2], pa.int32()),
        "price": pa.array([1.0, 50.0, None, 200.0, 10.0, 20.0], pa.float32()),
        "brand": pa.array(["acme", "bosch", "acme", None, "Banned", "acme"], pa.string_view()),
        "title": pa.array(["Drill (Refurbished)", "saw", "a.b drill", None, "hammer", "refurbished saw"]),
        "in_stock": pa.array([True, False, True, True, None, True]),
        "group": pa.array(["g1", "g1", "g2", "g2", "g1", "g1"]).dictionary_encode(),
        "added": pa.array([datetime.date(2024, 1, 1), datetime.date(2024, 6, 1), None,
                           datetime.date(2025, 1, 1), datetime.date(2023, 1, 1), datetime.date(2024, 3, 1)]),
        "embedding": pa.array([[0.1, 0.2]] * 6, pa.list_(pa.float32(), 2)),
    }, metadata={b"source": b"test"})


def kept(rules, **params) -> list[int]:
    return RuleFilter(rules=rules, **params)(batch()).column("item_id").to_pylist()


@pytest.mark.parametrize("rule, expected", [
    ({"column": "in_stock", "op": "eq", "value": True}, [1, 3, 4, 6]),
    ({"column": "brand", "op": "eq", "value": "acme"}, [1, 3, 6]),
    ({"column": "group", "op": "eq", "value": "g2"}, [3, 4]),
    ({"column": "price", "op": "ne", "value": 50}, [1, 4, 5, 6]),
    ({"column": "price", "op": "lt", "value": 20}, [1, 5]),
    ({"column": "price", "op": "le", "value": 20}, [1, 5, 6]),
    ({"column": "price", "op": "gt", "value": 20.0}, [2, 4]),
    ({"column": "price", "op": "ge", "value": 20}, [2, 4, 6]),
    ({"column": "price", "op": "between", "min": 5.0, "max": 50}, [2, 5, 6]),
    ({"column": "price", "op": "between", "min": 20}, [2, 4, 6]),
    ({"column": "price", "op": "between", "max": 10}, [1, 5]),
    ({"column": "added", "op": "ge", "value": datetime.date(2024, 3, 1)}, [2, 4, 6]),
    ({"column": "brand", "op": "in", "values": ["acme", "bosch"]}, [1, 2, 3, 6]),
    ({"column": "brand", "op": "not_in", "values": ["Banned"]}, [1, 2, 3, 6]),
    ({"column": "item_id", "op": "in", "values": [2, 5, 99]}, [2, 5]),
    ({"column": "item_id", "op": "in", "values": [2.0, 2.5]}, [2]),
    ({"column": "price", "op": "in", "values": [1, 20]}, [1, 6]),
    ({"column": "rank", "op": "not_in", "values": [-1, 2**40]}, [1, 2, 3, 4, 5, 6]),
    ({"column": "group", "op": "in", "values": ["g1", "zz"]}, [1, 2, 5, 6]),
    ({"column": "brand", "op": "in", "values": []}, []),
    ({"column": "title", "op": "contains", "value": "drill"}, [3]),
    ({"column": "title", "op": "contains", "value": "DRILL", "ignore_case": True}, [1, 3]),
    ({"column": "title", "op": "contains", "value": "a.b"}, [3]),
    ({"column": "title", "op": "contains", "value": ".*"}, []),
    ({"column": "title", "op": "contains", "value": "(Refurb"}, [1]),
    ({"column": "title", "op": "is_null"}, [4]),
    ({"column": "title", "op": "not_null"}, [1, 2, 3, 5, 6]),
])
def test_each_op(rule, expected):
    assert kept([rule]) == expected


def test_rules_are_anded_and_no_rules_keeps_everything():
    assert kept([{"column": "brand", "op": "eq", "value": "acme"}, {"column": "price", "op": "lt", "value": 10}]) == [1]
    assert kept(None) == kept([]) == [1, 2, 3, 4, 5, 6]


def test_negate_and_any():
    assert kept([{"column": "title", "op": "contains", "value": "refurbished", "ignore_case": True, "negate": True}]) == [2, 3, 5]
    either = {"any": [{"column": "price", "op": "lt", "value": 5}, {"column": "brand", "op": "eq", "value": "bosch"}]}
    assert kept([either]) == [1, 2]
    assert kept([{**either, "negate": True}]) == [5, 6]
    nested = {"any": [{"column": "item_id", "op": "eq", "value": 6}, {"any": [{"column": "item_id", "op": "eq", "value": 2}]}]}
    assert kept([nested]) == [2, 6]


def test_nulls_fail_comparisons_even_negated_but_any_can_rescue_them():
    assert kept([{"column": "brand", "op": "ne", "value": "acme"}]) == [2, 5]
    assert kept([{"column": "brand", "op": "not_in", "values": ["x"]}]) == [1, 2, 3, 5, 6]
    assert kept([{"column": "brand", "op": "eq", "value": "acme", "negate": True}]) == [2, 5]
    assert kept([{"column": "in_stock", "op": "eq", "value": False, "negate": True}]) == [1, 3, 4, 6]
    keep_missing = {"any": [{"column": "brand", "op": "is_null"}, {"column": "brand", "op": "not_in", "values": ["Banned"]}]}
    assert kept([keep_missing]) == [1, 2, 3, 4, 6]


def test_values_file(tmp_path):
    (tmp_path / "ids.txt").write_text("# banned items\n2\n\n 5 \n")
    (tmp_path / "brands.txt").write_text("acme\nbosch\n")
    stage = RuleFilter(rules=[{"column": "item_id", "op": "not_in", "values_file": "ids.txt"},
                              {"column": "brand", "op": "in", "values_file": str(tmp_path / "brands.txt")}])
    stage._base_dir = tmp_path
    stage.validate_params()
    assert stage(batch()).column("item_id").to_pylist() == [1, 3, 6]


def test_values_file_errors(tmp_path):
    stage = RuleFilter(rules=[{"column": "item_id", "op": "in", "values_file": "missing.txt"}])
    stage._base_dir = tmp_path
    with pytest.raises(ConfigError, match="rule 1 .*missing.txt.* does not exist"):
        stage.validate_params()
    stage = RuleFilter(rules=[{"column": "item_id", "op": "in", "values_file": "../../etc/passwd"}])
    stage._base_dir = tmp_path
    with pytest.raises(ConfigError, match="leaves the config folder"):
        stage.validate_params()
    (tmp_path / "ids.txt").write_text("1\nnot-a-number\n")
    stage = RuleFilter(rules=[{"column": "item_id", "op": "in", "values_file": "ids.txt"}])
    stage._base_dir = tmp_path
    with pytest.raises(DataError, match="filter.rules"):
        stage(batch())


def test_dedupe_keeps_best_rank_per_query_in_input_order():
    table = pa.table({
        "query_id": ["q1", "q1", "q1", "q1", "q2", "q2", "q2"],
        "item_id": [10, 11, 12, 13, 20, 21, 22],
        "rank": pa.array([3, 1, 2, None, 2, 1, 3], pa.int64()),
        "group": ["a", "a", "b", "b", "a", "b", "a"],
    })
    out = RuleFilter(dedupe_by="group")(table)
    assert out.column("item_id").to_pylist() == [11, 12, 20, 21]
    out = RuleFilter(rules=[{"column": "item_id", "op": "ne", "value": 11}], dedupe_by="group")(table)
    assert out.column("item_id").to_pylist() == [10, 12, 20, 21]
    out = RuleFilter(dedupe_by="group", group_by="item_id", order_by="rank")(table)
    assert out.num_rows == 7
    assert out.equals(table)


def test_dedupe_ties_and_null_ranks():
    table = pa.table({"query_id": ["q"] * 4, "item_id": [1, 2, 3, 4], "rank": [None, 5, 5, None], "group": ["a", "a", "a", "b"]})
    assert RuleFilter(dedupe_by="group")(table).column("item_id").to_pylist() == [2, 4]


def test_schema_preserved_input_not_mutated_and_record_batch_accepted():
    table = batch()
    before = table.to_pydict()
    stage = RuleFilter(rules=[{"column": "brand", "op": "eq", "value": "acme"}, {"column": "group", "op": "ne", "value": "zz"}],
                       dedupe_by="group")
    out = stage(table)
    assert out.schema.equals(table.schema, check_metadata=True)
    assert out.column("item_id").to_pylist() == [1, 3, 6]
    assert table.to_pydict() == before
    assert stage(table.to_batches()[0]).equals(out)


def test_empty_batch_keeps_schema():
    empty = batch().slice(0, 0)
    out = RuleFilter(rules=[{"column": "price", "op": "lt", "value": 3}], dedupe_by="group")(empty)
    assert out.num_rows == 0
    assert out.schema.equals(empty.schema, check_metadata=True)


def test_expression_compiled_once_and_params_stored_as_given():
    rules = [{"column": "price", "op": "lt", "value": 3}]
    stage = RuleFilter(rules=rules)
    assert stage.get_params()["rules"] is rules
    assert not hasattr(stage, "expr_")
    stage.warm_up()
    expr = stage.expr_
    assert isinstance(expr, pl.Expr)
    stage(batch())
    stage.warm_up()
    assert stage.expr_ is expr
    assert stage.clone().get_params() == stage.get_params()


def test_toml_rules_as_documented():
    config = tomllib.loads("""
        rules = [
            {column = "in_stock", op = "eq", value = true},
            {column = "brand", op = "not_in", values = ["Banned"]},
            {column = "price", op = "between", min = 0.5, max = 100.0},
            {column = "title", op = "contains", value = "DRILL", ignore_case = true, negate = true},
            {any = [{column = "added", op = "ge", value = 2024-01-01}, {column = "rank", op = "eq", value = 1}]},
        ]
    """)
    assert kept(config["rules"]) == [6]


# -- build-time errors --------------------------------------------------------------------------


class Source(Stage):
    name = "test.source"
    output_schema = pa.schema([pa.field("item_id", pa.int64()), pa.field("rank", pa.int32()), pa.field("price", pa.float64())])

    def transform(self, table):
        return table


QUERIES = pa.schema([pa.field("query_id", ANY)])


@pytest.mark.parametrize("rules, message", [
    ([{"column": "price", "op": "like", "value": 1}], "rule 1 .*op 'like' is not one of " + ", ".join(OPS)),
    ([{"column": "price", "value": 1}], "rule 1 .*missing key 'op'"),
    ([{"column": "price", "op": "lt", "value": 1}, {"op": "eq", "value": 1}], "rule 2 .*missing key 'column'"),
    ([{"column": "price", "op": "eq"}], "rule 1 .*missing key 'value'"),
    ([{"column": "price", "op": "in"}], "rule 1 .*missing key 'values'"),
    ([{"column": "price", "op": "in", "values": [1], "values_file": "x.txt"}], "exactly one"),
    ([{"column": "price", "op": "in", "values": "acme"}], "'values' must be a list"),
    ([{"column": "price", "op": "in", "values": [1, "a"]}], "all of one kind"),
    ([{"column": "price", "op": "in", "values": [[1]]}], "'values' must be a list"),
    ([{"column": "price", "op": "eq", "value": {"a": 1}}], "'value' must be"),
    ([{"column": "price", "op": "contains", "value": 3}], "'value' must be text"),
    ([{"column": "price", "op": "contains", "value": "a", "ignore_case": "yes"}], "'ignore_case' must be"),
    ([{"column": "price", "op": "between", "min": 10, "max": 5}], "'min' \\(10\\) is greater than 'max' \\(5\\)"),
    ([{"column": "price", "op": "between", "min": 1, "max": "z"}], "same kind"),
    ([{"column": "price", "op": "between"}], "needs 'min', 'max' or both"),
    ([{"column": "price", "op": "eq", "value": 1, "vlaue": 2}], "unknown key\\(s\\) 'vlaue'; allowed keys here: column, op, negate, value"),
    ([{"column": "price", "op": "eq", "value": 1, "negate": "yes"}], "'negate' must be true or false"),
    ([{"column": "", "op": "is_null"}], "'column' must be a column name"),
    ([{"any": []}], "'any' must be a non-empty list"),
    ([{"any": [{"column": "price", "op": "is_null"}], "op": "eq"}], "unknown key\\(s\\) 'op'"),
    ([{"column": "price", "op": "is_null"}, {"any": [{"column": "price", "op": "nope"}]}], "rule 2.1 .*op 'nope'"),
    (["price < 3"], "rule 1 'price < 3': a rule must be a table"),
    ({"column": "price"}, "'rules' parameter of stage 'filter.rules' must be a list"),
])
def test_bad_rules_fail_at_pipeline_build(rules, message):
    with pytest.raises(ConfigError, match=message) as info:
        Pipeline([Source(), RuleFilter(rules=rules)], inputs=QUERIES)
    assert "filter.rules" in str(info.value)


def test_bad_dedupe_params():
    with pytest.raises(ConfigError, match="'dedupe_by' parameter"):
        RuleFilter(dedupe_by=3).validate_params()
    with pytest.raises(ConfigError, match="'order_by' parameter"):
        RuleFilter(dedupe_by="group", order_by=None).validate_params()


def test_unknown_column_fails_at_pipeline_build():
    Pipeline([Source(), RuleFilter(rules=[{"column": "price", "op": "lt", "value": 3}])], inputs=QUERIES)
    with pytest.raises(SchemaError, match="stage 'filter.rules' needs column 'brand'"):
        Pipeline([Source(), RuleFilter(rules=[{"any": [{"column": "brand", "op": "is_null"}]}])], inputs=QUERIES)
    with pytest.raises(SchemaError, match="stage 'filter.rules' needs column 'group'"):
        Pipeline([Source(), RuleFilter(dedupe_by="group")], inputs=QUERIES)
    with pytest.raises(SchemaError, match="needs column 'score'"):
        RuleFilter(dedupe_by="item_id", order_by="score").output_schema_for(Source.output_schema.insert(0, QUERIES.field(0)))


# -- run-time type errors -----------------------------------------------------------------------


@pytest.mark.parametrize("rule, column, arrow_type", [
    ({"column": "price", "op": "eq", "value": "abc"}, "price", "float"),
    ({"column": "brand", "op": "gt", "value": 3}, "brand", "string_view"),
    ({"column": "item_id", "op": "in", "values": ["1", "2"]}, "item_id", "int64"),
    ({"column": "in_stock", "op": "eq", "value": 1}, "in_stock", "bool"),
    ({"column": "item_id", "op": "contains", "value": "1"}, "item_id", "int64"),
    ({"column": "added", "op": "between", "min": 1, "max": 2}, "added", "date32"),
    ({"any": [{"column": "item_id", "op": "eq", "value": 1}, {"column": "price", "op": "lt", "value": "x"}]}, "price", "float"),
])
def test_type_mismatch_raises_data_error(rule, column, arrow_type):
    with pytest.raises(DataError) as info:
        RuleFilter(rules=[rule])(batch())
    text = str(info.value)
    assert "stage 'filter.rules'" in text and "rule 1" in text
    assert f"column '{column}' has type {arrow_type}" in text


# -- injection attempts -------------------------------------------------------------------------


def test_injection_attempts_do_nothing(tmp_path):
    marker = tmp_path / "pwned"
    code = f"__import__('os').system('touch {marker}')"
    with pytest.raises(ConfigError, match="is not one of"):
        Pipeline([Source(), RuleFilter(rules=[{"column": "price", "op": code, "value": 1}])], inputs=QUERIES)
    with pytest.raises(SchemaError, match="needs column"):
        Pipeline([Source(), RuleFilter(rules=[{"column": f"x); {code}; (", "op": "is_null"}])], inputs=QUERIES)
    with pytest.raises(ConfigError, match="unknown key"):
        RuleFilter(rules=[{"column": "price", "op": "eq", "value": 1, code: 1}]).validate_params()
    for value in (code, "pl.col('price') > 0", "1 or 1 == 1", "'; DROP TABLE items; --", ".*"):
        assert kept([{"column": "brand", "op": "eq", "value": value}]) == []
        assert kept([{"column": "brand", "op": "in", "values": [value]}]) == []
        assert kept([{"column": "title", "op": "contains", "value": value}]) == []
    weird = pa.table({"query_id": ["q"], f"x); {code}; (": [1]})
    assert RuleFilter(rules=[{"column": f"x); {code}; (", "op": "eq", "value": 1}])(weird).num_rows == 1
    assert not marker.exists()
