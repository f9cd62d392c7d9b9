"""Device and precision resolution (pipeline/device.py)."""

from __future__ import annotations

import pytest

from pipeline import ConfigError
from pipeline.device import cpu_has_bf16, resolve_device, resolve_precision


def test_resolve_precision():
    assert resolve_precision("auto", "cuda", stage="s") == "fp16"
    assert resolve_precision("auto", "cpu", stage="s") == ("bf16" if cpu_has_bf16() else "fp32")
    assert resolve_precision("bf16", "cpu", stage="s") == "bf16"
    with pytest.raises(ConfigError, match=r"'precision' parameter of stage 's' must be 'auto', 'fp32' or 'bf16' on "
                                          r"CPU \('fp16' needs device 'cuda'\); got 'fp16'"):
        resolve_precision("fp16", "cpu", stage="s")


def test_resolve_device_auto_is_cpu_without_cuda(monkeypatch):
    import pipeline.device as device

    monkeypatch.setattr(device, "cuda_available", lambda: False)
    assert resolve_device("auto", stage="s") == "cpu"
    assert resolve_device("auto", stage="s", supported=("cpu",)) == "cpu"
