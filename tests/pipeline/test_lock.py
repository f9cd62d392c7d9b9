"""What a lock or a refused resume reports when two pipeline configs differ."""

from __future__ import annotations

from pipeline.lock import config_differences

OLD = '''
[pipeline.inputs]
query_id = "any"
query = "string"

[[stages]]
type = "encode.sentence_transformers"
[stages.params]
device = "auto"
batch_size = 64

[[stages]]
type = "recall.fused"
[stages.params]
k = 100
branches = [{name = "dense", weight = 1.0}, {name = "bm25", weight = 0.5}]
'''


def test_equal_configs_have_no_differences():
    assert config_differences(OLD, OLD) == []


def test_each_changed_parameter_is_named_with_its_stage_and_both_values():
    new = OLD.replace('device = "auto"', 'device = "cuda"').replace("weight = 0.5", "weight = 0.7")
    new = new.replace("batch_size = 64\n", "")
    assert config_differences(OLD, new) == [
        "stage 1 encode.sentence_transformers: batch_size 64 -> 'unset'",
        "stage 1 encode.sentence_transformers: device 'auto' -> 'cuda'",
        "stage 2 recall.fused branches[2]: weight 0.5 -> 0.7",
    ]


def test_added_removed_and_replaced_stages_and_inputs():
    extra = OLD + '\n[[stages]]\ntype = "display.topn"\n[stages.params]\nn = 10\n'
    assert config_differences(OLD, extra) == ["stage 3 display.topn added"]
    assert config_differences(extra, OLD) == ["stage 3 display.topn removed"]
    other = OLD.replace('type = "recall.fused"', 'type = "recall.faiss"').replace('query = "string"', "")
    assert config_differences(OLD, other) == [
        "pipeline inputs {'query_id': 'any', 'query': 'string'} -> {'query_id': 'any'}",
        "stage 2: recall.fused -> recall.faiss",
    ]
