"""TOML configs: load into the same objects as the Python API, save back identically."""

from __future__ import annotations

import pytest

from pipeline import ConfigError, PipelineConfig, SchemaError, load_config
from pipeline.config import stage_to_spec
from pipeline.demo import demo_config

from stages.display import TopNDisplay
from stages.features import TextMatchFeatures


def test_demo_config_round_trips_byte_for_byte(tmp_path):
    path = tmp_path / "pipeline.toml"
    PipelineConfig.normalised(demo_config()).save(path)
    text = path.read_text()
    loaded = load_config(path)
    assert loaded.to_toml() == text
    assert PipelineConfig.normalised(loaded).to_toml() == text


def test_loaded_config_builds_the_objects_the_python_api_builds(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(
        '[pipeline]\ninputs = { query_id = "any", query = "string", title = "string", score = "float32", '
        'rank = "int64" }\n\n'
        '[[stages]]\ntype = "features.text"\nparams = { features = ["overlap"] }\n\n'
        '[[stages]]\ntype = "display.topn"\nparams = { n = 5 }\n'
    )
    pipe = load_config(path).build()
    assert [stage_to_spec(s) for s in pipe] == [stage_to_spec(TextMatchFeatures(features=["overlap"])),
                                                stage_to_spec(TopNDisplay(n=5))]


def test_unknown_stage_type_lists_known_types(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[[stages]]\ntype = "recall.nope"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path).build()
    assert "unknown stage type 'recall.nope'" in str(err.value)
    assert "recall.faiss" in str(err.value) and "rank.lightgbm" in str(err.value)


def test_unknown_parameter_lists_the_stage_parameters(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[[stages]]\ntype = "display.topn"\nparams = { top = 5 }\n')
    with pytest.raises(ConfigError, match=r"has no parameter\(s\) top; its parameters are: n, cap_column, cap"):
        load_config(path).build()


def test_out_of_range_parameter_is_reported_with_the_template(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[[stages]]\ntype = "display.topn"\nparams = { n = 0 }\n')
    with pytest.raises(ConfigError, match=r"the 'n' parameter of stage 'display.topn' must be an int >= 1; got 0 instead"):
        load_config(path).build()


def test_invalid_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[stages]\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_config_values_are_data_never_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "p.toml"
    path.write_text(
        '[[stages]]\ntype = "display.topn"\n'
        f'params = {{ n = 3, cap_column = "__import__(\'os\').system(\'touch {marker}\')", cap = 1 }}\n'
    )
    import pyarrow as pa

    pipe = load_config(path).build()
    with pytest.raises(SchemaError, match="needs column"):
        pipe(pa.table({"query_id": [1], "score": pa.array([1.0], pa.float32()), "rank": pa.array([1], pa.int32())}))
    assert not marker.exists()
