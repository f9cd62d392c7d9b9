"""Features after fused recall (per-source scores and ranks) and list-valued attribute mentions."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline import ConfigError
from pipeline.testing import CHECKS, StageCase
from stages.features import TextMatchFeatures

FUSED = pa.table({
    "query_id": [1, 1, 2, 2], "query": ["white gloss paint", "white gloss paint", "chrome faucet", "oak shelf"],
    "title": ["Paint", "Paint", "Faucet", "Shelf"],
    "colors": pa.array([["Gray", "White"], None, [], ["Chrome"]], pa.list_(pa.string())),
    "materials": pa.array([None, ["Oak", "Pine"], None, ["Oak"]], pa.list_(pa.string())),
    "score": pa.array([0.03, 0.02, 0.03, 0.01], pa.float32()), "rank": pa.array([1, 2, 1, 2], pa.int32()),
    "source": ["dense+bm25", "bm25", "dense", "dense"],
    "score_dense": pa.array([0.5, None, 0.4, 0.3], pa.float32()), "rank_dense": pa.array([1, None, 2, 5], pa.int32()),
    "score_bm25": pa.array([3.0, 1.0, None, None], pa.float32()), "rank_bm25": pa.array([2, 1, None, None], pa.int32()),
})
NAMES = ["source_scores", "source_ranks", "n_sources", "fusion_rank", "color_match", "material_match"]


def _stage(**kw):
    return TextMatchFeatures(features=NAMES, sources=["dense", "bm25"], color_column="colors",
                             material_column="materials", **kw)


def test_per_source_features_with_sentinels():
    stage = _stage()
    assert stage.produced_columns().names == ["f_score_dense", "f_score_bm25", "f_rank_dense", "f_rank_bm25",
                                              "f_n_sources", "f_fusion_rank", "f_color_match", "f_material_match"]
    out = stage(FUSED).to_pydict()
    assert out["f_score_bm25"] == [3.0, 1.0, -1.0, -1.0] and out["f_rank_dense"] == [1.0, 1000.0, 2.0, 5.0]
    assert out["f_n_sources"] == [2.0, 1.0, 1.0, 1.0] and out["f_fusion_rank"] == [1.0, 2.0, 1.0, 2.0]
    assert _stage(missing_rank=101)(FUSED).column("f_rank_bm25").to_pylist() == [2.0, 1.0, 101.0, 101.0]


def test_any_element_of_a_list_attribute_mentioned_in_the_query():
    out = _stage()(FUSED).to_pydict()
    assert out["f_color_match"] == [1.0, 0.0, 0.0, 0.0]
    assert out["f_material_match"] == [0.0, 0.0, 0.0, 1.0]
    text = FUSED.set_column(FUSED.column_names.index("colors"), "colors", pa.array(["White", None, "", "Chrome"]))
    assert _stage()(text).column("f_color_match").to_pylist() == [1.0, 0.0, 0.0, 0.0]


def test_required_columns_follow_sources_and_bad_params():
    assert {"score_dense", "rank_bm25", "source"} <= set(_stage().required_columns().names)
    with pytest.raises(ConfigError, match="'sources' parameter"):
        TextMatchFeatures(features=["source_scores"]).validate_params()
    with pytest.raises(ConfigError, match="'missing_rank' parameter"):
        _stage(missing_rank=1.5).validate_params()


@pytest.mark.parametrize("check", [c for c in CHECKS if c != "cpu_gpu_parity"])
def test_source_features_conform(check):
    CHECKS[check](StageCase(_stage(), FUSED))


def test_stemmed_overlap_matches_plurals():
    t = pa.table({"query_id": [1, 1], "query": ["cordless drills bits", "cordless drills bits"],
                  "title": ["DEWALT Cordless Drill Bit Set", None]})
    out = TextMatchFeatures(features=["overlap", "stem_overlap", "stem_coverage"])(t).to_pydict()
    assert out["f_overlap"] == [1.0, 0.0] and out["f_stem_overlap"] == [3.0, 0.0]
    assert out["f_stem_coverage"] == [1.0, 0.0]
