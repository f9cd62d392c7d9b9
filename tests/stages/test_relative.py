"""Query-relative features (features.relative) on hand-made candidate lists."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from pipeline.errors import ConfigError
from pipeline.testing import CHECKS, StageCase
from stages.relative import RelativeFeatures

BATCH = pa.table({"query_id": ["u", "u", "u", "v", "v", "w"], "item_id": ["a", "b", "c", "a", "d", "e"],
                  "f_x": pa.array([2.0, 4.0, 4.0, 0.0, 0.0, float("nan")], pa.float32()),
                  "f_y": pa.array([1.0, None, 3.0, -1.0, 2.0, 5.0], pa.float32())})


def test_values_against_the_query_s_largest_and_ranks_by_hand():
    out = RelativeFeatures(columns=["f_x", "f_y"])(BATCH).to_pydict()
    assert out["f_x_rel"][:5] == [0.5, 1.0, 1.0, 0.0, 0.0]          # v's largest is 0: 0, not NaN
    assert out["f_x_qrank"][:5] == [3, 1, 1, 1, 1]                  # ties share the best rank
    assert out["f_x_rel"][5] is None and out["f_x_qrank"][5] is None  # NaN is missing, and stays missing
    assert out["f_y_rel"] == [pytest.approx(1 / 3), None, 1.0, -0.5, 1.0, 1.0]
    assert out["f_y_qrank"] == [2, None, 1, 2, 1, 1]
    assert out["item_id"] == BATCH.column("item_id").to_pylist()    # rows and input columns unchanged


def test_one_kind_and_a_recomputed_column():
    once = RelativeFeatures(columns=["f_y"], kinds=["qrank"])(BATCH)
    assert once.column_names == [*BATCH.column_names, "f_y_qrank"]
    again = RelativeFeatures(columns=["f_y"], kinds=["qrank"])(once.slice(0, 3))
    assert again.column_names == once.column_names and again.column("f_y_qrank").to_pylist() == [2, None, 1]


def test_bad_parameters_name_the_parameter():
    for params, name in (({"columns": []}, "columns"), ({"columns": "f_x"}, "columns"), ({"kinds": ["max"]}, "kinds"),
                         ({"kinds": []}, "kinds")):
        with pytest.raises(ConfigError, match=f"'{name}' parameter of stage 'features.relative'"):
            RelativeFeatures(**params).validate_params()


@pytest.mark.parametrize("check", [c for c in CHECKS if c != "cpu_gpu_parity"])
def test_conformance(check):
    batch = BATCH.set_column(2, "f_x", pa.array([2.0, 4.0, 4.0, 0.0, 0.0, None], pa.float32()))  # NaN != NaN
    CHECKS[check](StageCase(RelativeFeatures(columns=["f_x", "f_y"]), batch))


def test_missing_stays_nan_free():
    out = RelativeFeatures(columns=["f_x"])(BATCH).column("f_x_rel").to_pylist()
    assert not any(isinstance(v, float) and math.isnan(v) for v in out)
