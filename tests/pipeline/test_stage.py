"""The stage contract and composition."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline import ANY, ConfigError, Pipeline, SchemaError, Stage, StageTags
from pipeline.errors import MISSING_COLUMN


class AddOne(Stage):
    name = "test.add_one"
    input_schema = pa.schema([pa.field("query_id", ANY), pa.field("x", pa.int64())])
    output_schema = pa.schema([pa.field("y", pa.int64())])
    tags = StageTags(level="query")

    def __init__(self, column: str = "x"):
        self.column = column

    def transform(self, table):
        import pyarrow.compute as pc

        y = pc.add(table.column("x"), 1)
        if "y" in table.column_names:
            y = pc.add(table.column("y"), 1)
            table = table.drop_columns(["y"])
        return table.append_column("y", y)


class NeedsZ(Stage):
    name = "test.needs_z"
    input_schema = pa.schema([pa.field("z", pa.string())])

    def transform(self, table):
        return table


def test_subclass_without_transform_is_rejected_when_defined():
    with pytest.raises(TypeError, match="must implement transform"):
        class Broken(Stage):  # noqa: F841
            name = "test.broken"


def test_subclass_without_registry_name_is_rejected():
    with pytest.raises(TypeError, match="role.backend"):
        class Nameless(Stage):  # noqa: F841
            def transform(self, table):
                return table


def test_composition_checks_columns_before_data_and_names_both_stages():
    with pytest.raises(SchemaError) as err:
        AddOne() >> NeedsZ()
    msg = str(err.value)
    assert "test.needs_z" in msg and "'z'" in msg and "test.add_one" in msg and "step 1" in msg
    assert msg.startswith(MISSING_COLUMN.split("{")[0])


def test_wrong_type_is_reported_at_composition():
    class WantsFloatY(NeedsZ):
        name = "test.wants_float_y"
        input_schema = pa.schema([pa.field("y", pa.string())])

    with pytest.raises(SchemaError, match="needs column 'y' of type string"):
        AddOne() >> WantsFloatY()


def test_pipeline_runs_and_collects_stats():
    pipe = AddOne() >> AddOne()
    stats = []
    out = pipe.run(pa.table({"query_id": [1, 2], "x": [1, 2]}), stats)
    assert out.column("y").to_pylist() == [3, 4]
    assert [s.rows_in for s in stats] == [2, 2] and len(stats[0].seconds) == 1


def test_pipeline_checks_its_input_at_run_time():
    with pytest.raises(SchemaError, match="the pipeline input"):
        Pipeline([AddOne()])(pa.table({"query_id": [1]}))


def test_get_params_and_clone():
    s = AddOne(column="x")
    assert s.get_params() == {"column": "x"}
    assert s.clone().get_params() == s.get_params()
    with pytest.raises(ConfigError, match="no parameter"):
        s.clone(nope=1)


def test_relative_paths_cannot_leave_the_config_folder(tmp_path):
    s = AddOne()
    s._base_dir = tmp_path
    assert s.resolve_path("artifacts/x") == tmp_path / "artifacts" / "x"
    assert s.resolve_path("/abs/elsewhere").as_posix() == "/abs/elsewhere"
    with pytest.raises(ConfigError, match="leaves the config folder"):
        s.resolve_path("../../etc/passwd")


def test_a_symbolic_link_inside_the_config_folder_is_followed_wherever_it_points(tmp_path):
    s = AddOne()
    s._base_dir = tmp_path / "config"
    (tmp_path / "shared" / "v1").mkdir(parents=True)
    (tmp_path / "config" / "artifacts").mkdir(parents=True)
    (tmp_path / "config" / "artifacts" / "v1").symlink_to(tmp_path / "shared" / "v1", target_is_directory=True)
    assert s.resolve_path("artifacts/v1") == (tmp_path / "shared" / "v1").resolve()
    with pytest.raises(ConfigError, match="leaves the config folder"):  # the written path is what is checked
        s.resolve_path("artifacts/v1/../../../shared/v1")


def test_recordbatch_input_is_accepted():
    batch = pa.RecordBatch.from_pydict({"query_id": [1], "x": [5]})
    assert AddOne()(batch).column("y").to_pylist() == [6]


def test_run_one():
    out = Pipeline([AddOne()]).run_one(query_id="q", x=3)
    assert out.to_pylist() == [{"query_id": "q", "x": 3, "y": 4}]
