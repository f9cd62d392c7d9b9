"""Device resolution: ``"cpu" | "cuda" | "auto"``.

Stages keep the *requested* device in their parameters (so a saved config says what was asked
for) and store the *resolved* one in ``device_`` during ``warm_up()``. Nothing here touches CUDA
at import time.
"""

from __future__ import annotations

from .errors import BAD_PARAM, DeviceError

__all__ = ["DEVICES", "cuda_available", "resolve_device"]

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
