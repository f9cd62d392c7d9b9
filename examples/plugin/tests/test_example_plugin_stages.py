"""The plug-in's own tests: Funnel's conformance kit, used as any third party uses it, plus behaviour.

Run from this folder after `pip install -e .` (next to an installed funnel-rank): `python -m pytest`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from funnel_example_plugin import BrandQuotaFilter, PriceBandFeature
from pipeline import ConfigError, DataError, Pipeline, get_stage_class
from pipeline.testing import StageCase, parametrize_with_checks


def candidates() -> pa.Table:
    """Ranked candidates of three queries, as a ranker hands them on: brands repeat, some are null."""
    return pa.table({
        "query_id": pa.array(["q1"] * 5 + ["q2"] * 4 + ["q3"] * 3),
        "item_id": pa.array([f"i{n}" for n in range(12)]),
        "brand": pa.array(["acme", "acme", "bolt", "acme", None, "bolt", "bolt", "bolt", "acme", "acme", None, "acme"]),
        "price": pa.array([5.0, 25.0, 49.99, 50.0, None, 120.0, 600.0, 0.0, 99.0, 250.0, 18.5, 1000.0]),
        "score": pa.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.9, 0.8, 0.7, 0.6, 0.9, 0.8, 0.7], pa.float32()),
        "rank": pa.array([1, 2, 3, 4, 5, 1, 2, 3, 4, 1, 2, 3], pa.int32()),
    })


@parametrize_with_checks([
    StageCase(BrandQuotaFilter(per_brand=1), candidates()),
    StageCase(PriceBandFeature(edges=[25.0, 100.0, 500.0]), candidates()),
])
def test_conformance(case, check):
    check(case)


# -- filter.brand_quota ------------------------------------------------------------------------


def test_quota_keeps_the_best_ranked_per_brand_and_every_null_brand():
    out = BrandQuotaFilter(per_brand=1)(candidates())
    assert out.column("item_id").to_pylist() == ["i0", "i2", "i4", "i5", "i8", "i9", "i10"]
    assert out.schema == candidates().schema


def test_quota_orders_by_rank_not_by_position():
    shuffled = candidates().set_column(5, "rank", pa.array([4, 3, 2, 1, 5, 1, 2, 3, 4, 1, 2, 3], pa.int32()))
    out = BrandQuotaFilter(per_brand=1)(shuffled)
    assert out.column("item_id").to_pylist()[:3] == ["i2", "i3", "i4"]


def test_quota_reads_the_brand_column_it_is_given():
    table = candidates().rename_columns(["query_id", "item_id", "maker", "price", "score", "rank"])
    assert BrandQuotaFilter(per_brand=2, brand_column="maker")(table).num_rows == 10
    with pytest.raises(Exception, match="needs column 'brand'"):
        BrandQuotaFilter()(table)


@pytest.mark.parametrize("params, param", [({"per_brand": 0}, "per_brand"), ({"per_brand": True}, "per_brand"),
                                           ({"brand_column": "rank"}, "brand_column")])
def test_quota_rejects_bad_parameters_when_composed(params, param):
    with pytest.raises(ConfigError, match=f"the '{param}' parameter of stage 'filter.brand_quota' must be"):
        Pipeline([BrandQuotaFilter(**params)])


# -- features.price_band -----------------------------------------------------------------------


def test_price_bands_follow_the_edges_and_keep_nulls():
    table = pa.table({"price": pa.array([0.0, 9.99, 10.0, 49.9, 50.0, 1000.0, None])})
    out = PriceBandFeature(edges=[10, 50])(table)
    assert out.column("price_band").to_pylist() == [0, 0, 1, 1, 2, 2, None]
    assert out.schema.field("price_band").type == pa.int32()


def test_price_band_torch_path_gives_the_numpy_bands():
    torch = pytest.importorskip("torch")
    stage = PriceBandFeature(edges=[25.0, 100.0, 500.0])
    stage.warm_up()
    prices = np.array([0.0, 24.999, 25.0, 99.0, 100.0, 499.5, 500.0, 1e6])
    expected = stage.bands(prices)
    stage.edges_ = torch.tensor(stage.edges, dtype=torch.float64)  # the CUDA code path, on CPU tensors
    np.testing.assert_array_equal(stage.bands(prices), expected)


def test_price_band_quarantines_nan_and_negative_prices():
    table = pa.table({"query_id": ["a", "a", "b"], "item_id": ["x", "y", "z"], "price": [10.0, float("nan"), -1.0]})
    stage = PriceBandFeature()
    assert stage.invalid_rows(table).to_pylist() == [None, "price is NaN", "price is negative"]
    quarantine: list[pa.Table] = []
    out = Pipeline([stage]).run(table, quarantine=quarantine)
    assert out.column("item_id").to_pylist() == ["x"]
    assert quarantine[0].column("reason").to_pylist() == ["price is NaN", "price is negative"]
    with pytest.raises(DataError, match="features.price_band.*2 row"):
        stage(table)


@pytest.mark.parametrize("edges", [[], [50, 10], [1, "2"], [float("inf")], "10,20"])
def test_price_band_rejects_bad_edges(edges):
    with pytest.raises(ConfigError, match="the 'edges' parameter of stage 'features.price_band'"):
        Pipeline([PriceBandFeature(edges=edges)])


def test_price_band_has_no_cuda_without_a_gpu_and_says_so():
    from pipeline import cuda_available

    if cuda_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(Exception, match="no CUDA device"):
        PriceBandFeature(device="cuda").warm_up()


# -- registration ------------------------------------------------------------------------------


def test_both_stages_are_registered_under_their_names():
    assert get_stage_class("filter.brand_quota") is BrandQuotaFilter
    assert get_stage_class("features.price_band") is PriceBandFeature
