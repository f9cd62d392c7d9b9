"""Device resolution: ``"cpu" | "cuda" | "auto"``.

Stages keep the *requested* device in their parameters (so a saved config says what was asked
for) and store the *resolved* one in ``device_`` during ``warm_up()``. Nothing here touches CUDA
at import time.
"""

from __future__ import annotations

from pathlib import Path

from .errors import BAD_PARAM, ConfigError, DeviceError

__all__ = ["DEVICES", "cuda_available", "resolve_device", "cpu_has_bf16", "resolve_precision"]

DEVICES = ("cpu", "cuda", "auto")


def cuda_available() -> bool:
    """True when torch sees at least one CUDA device."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return bool(torch.cuda.is_available())


def resolve_device(requested: str, *, stage: str, supported: tuple[str, ...] = ("cpu", "cuda")) -> str:
    """Turn a requested device into the one that will run.

    ``"auto"`` picks ``"cuda"`` when a CUDA device is visible *and* the stage has a CUDA path,
    else ``"cpu"``. An explicit ``"cuda"`` on a machine or stage without one is an error, never a
    silent fall-back.
    """
    if requested not in DEVICES:
        raise DeviceError(BAD_PARAM.format(param="device", stage=stage, expected=f"one of {DEVICES}", found=requested))
    if requested == "auto":
        return "cuda" if "cuda" in supported and cuda_available() else "cpu"
    if requested not in supported:
        raise DeviceError(f"stage '{stage}' has no {requested} implementation (it supports {', '.join(supported)})")
    if requested == "cuda" and not cuda_available():
        raise DeviceError(f"stage '{stage}' was asked for device 'cuda' but torch sees no CUDA device; use 'cpu' or 'auto'")
    return requested


def cpu_has_bf16() -> bool:
    """True on a CPU whose matrix units run bf16 natively (AVX512-BF16 or AMX), where bf16 weights
    halve the cost of a forward pass; elsewhere PyTorch emulates bf16 and fp32 is faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str, device: str, *, stage: str) -> str:
    """The weight precision a transformer stage runs in on the resolved ``device``.

    ``"auto"`` is fp16 on CUDA, bf16 on a CPU with native bf16 (:func:`cpu_has_bf16`) and fp32
    elsewhere; ``"fp16"`` on a CPU is an error (PyTorch's CPU fp16 kernels are slower than fp32).
    """
    if requested == "fp16" and device != "cuda":
        raise ConfigError(BAD_PARAM.format(param="precision", stage=stage,
                                           expected="'auto', 'fp32' or 'bf16' on CPU ('fp16' needs device 'cuda')",
                                           found=requested))
    if requested != "auto":
        return requested
    if device == "cuda":
        return "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"
