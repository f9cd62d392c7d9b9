from __future__ import annotations

import math

import pyarrow as pa
import pytest

from pipeline import ConfigError
from stages.features import FEATURES, TextMatchFeatures


def test_text_match_features_values():
    t = pa.table({"query_id": [1, 2], "query": ["Ironvale 3/4 in. drill", "led bulb"],
                  "title": ["Ironvale 3/4 in. Cordless Drill", None], "brand": ["Ironvale", None],
                  "score": pa.array([0.5, 0.1], pa.float32()), "rank": pa.array([1, 1], pa.int32())})
    row = TextMatchFeatures()(t).to_pylist()
    assert row[0]["f_overlap"] == 4 and row[0]["f_coverage"] == 1.0 and row[0]["f_number_match"] == 1.0
    assert row[0]["f_brand_match"] == 1.0 and row[1]["f_brand_match"] == 0.0
    assert row[1]["f_title_len"] == 0 and row[1]["f_coverage"] == 0.0
    assert t.column_names == ["query_id", "query", "title", "brand", "score", "rank"]


def test_unknown_feature_lists_known_ones():
    with pytest.raises(ConfigError, match="drawn from " + ", ".join(FEATURES)):
        TextMatchFeatures(features=["nope"]).validate_params()


def test_required_columns_follow_selected_features():
    stage = TextMatchFeatures(features=["title_len"], title_column="name")
    assert stage.required_columns().names == ["query_id", "name"]


def test_popularity_is_log1p_of_the_column_and_zero_where_missing():
    t = pa.table({"query_id": [1, 1, 1], "sales": [0.0, 9.0, None]})
    stage = TextMatchFeatures(features=["popularity"], popularity_column="sales")
    assert stage.required_columns().names == ["query_id", "sales"]
    assert stage(t).column("f_popularity").to_pylist() == pytest.approx([0.0, math.log(10.0), 0.0])
