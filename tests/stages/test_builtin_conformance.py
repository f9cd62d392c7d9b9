"""Every built-in stage passes the conformance kit, on the inputs it sees in the demo pipeline."""

from __future__ import annotations

import pytest

from pipeline.demo import demo_config
from pipeline.testing import CHECKS, StageCase

STEPS = [s["type"] for s in demo_config().stages]


def _params():
    for step, name in enumerate(STEPS):
        for check in CHECKS:
            marks = [pytest.mark.gpu] if check == "cpu_gpu_parity" else []
            yield pytest.param(step, check, id=f"{name}-{check}", marks=marks)


@pytest.mark.parametrize("step, check", list(_params()))
def test_builtin_stage_conforms(step, check, demo_pipeline, stage_inputs):
    case = StageCase(demo_pipeline.stages[step], stage_inputs[step])
    CHECKS[check](case)
