"""The machine and software a benchmark runs on: the report's ``fingerprint`` and peak memory.

Timings mean little without the machine they came from, so every report carries the CPU (model,
cores this process may use, the SIMD flags that matter to faiss and torch), the threads torch,
faiss and Polars use, the GPU and its driver, and the versions of the libraries on the hot path.
``fingerprint()["id"]`` is the short machine name of a results folder
(``benchmarks/results/<date>-<id>``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import os
import platform
import re
import resource
import sys
from pathlib import Path

import polars as pl

__all__ = ["LIBRARIES", "fingerprint", "peak_rss_mb"]


LIBRARIES = ("funnel-rank", "torch", "sentence-transformers", "transformers", "faiss-cpu", "faiss-gpu-cu12",
             "lightgbm", "polars", "pyarrow", "numpy", "ranx", "hnswlib", "matplotlib")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "neon", "asimd")
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    return []


def _gpu() -> dict | None:
    import subprocess

    import torch

    if not torch.cuda.is_available():
        return None
    info = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(), "cuda": torch.version.cuda}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    return info


def _threads() -> dict:
    import faiss
    import torch

    return {"torch": torch.get_num_threads(), "faiss_omp": faiss.omp_get_max_threads(),
            "polars": pl.thread_pool_size()}


def _slug(text: str) -> str:
    text = re.sub(r"\(r\)|\(tm\)|cpu @.*|processor|\d+-core", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:40]


def fingerprint() -> dict:
    """The machine and software a benchmark ran on; ``id`` is a short name for results folders."""
    versions = {}
    for name in LIBRARIES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    cores = os.cpu_count() or 1
    with contextlib.suppress(AttributeError):
        cores = len(os.sched_getaffinity(0))
    gpu = _gpu()
    cpu = _cpu_model()
    ident = f"{_slug(cpu)}-{cores}c" + (f"-{_slug(gpu['name'])}" if gpu else "")
    mem = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {
        "id": ident, "date": _dt.date.today().isoformat(), "cpu": cpu, "cpu_flags": _cpu_flags(), "cores": cores,
        "memory_gb": mem, "threads": _threads(), "gpu": gpu, "os": platform.platform(),
        "python": platform.python_version(), "libraries": versions,
    }


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)
