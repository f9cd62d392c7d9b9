"""Timing: latency percentiles, timed passes interleaved with the bare baseline, one query alone.

Every comparison in ``funnel bench`` is timed *interleaved*: the contenders take turns within
each round (and the order flips every round), so that a change of load on a shared machine hits
them alike. Wall time is kept beside process CPU time (``time.process_time``, all threads),
which varies far less on a loaded machine.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import polars as pl
import pyarrow as pa

from ..stage import Pipeline, Stage, StageStats

__all__ = ["latency_summary", "median", "split_batches", "progress_bar", "clone_warm", "interleaved", "Timings",
           "timed_passes", "single_query"]


def latency_summary(seconds: list[float], queries: list[int] | None = None) -> dict:
    """p50/p95/p99 in milliseconds of ``seconds`` (one per batch), and per query when ``queries``
    gives the queries of each batch (a batch's time shared among its queries)."""
    out: dict[str, float | None] = {}
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    for p in (50, 95, 99):
        out[f"p{p}_ms"] = float(np.percentile(ms, p)) if len(ms) else None
    if queries is not None:
        per_q = ms / np.maximum(np.asarray(queries, dtype=np.float64), 1)
        for p in (50, 95, 99):
            out[f"p{p}_ms_per_query"] = float(np.percentile(per_q, p)) if len(per_q) else None
    return out


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def split_batches(table: pa.Table, size: int) -> list[pa.Table]:
    return [table.slice(i, size) for i in range(0, table.num_rows, size)]


def progress_bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", disable=not progress, leave=False)


def clone_warm(stage: Stage, **params: Any) -> Stage:
    """A clone with some search-time parameters changed that shares the loaded state (``*_``)."""
    new = stage.clone(**params)
    for key, value in vars(stage).items():
        if key.endswith("_") and not key.startswith("_"):
            setattr(new, key, value)
    return new


def device_sync(device: str) -> Callable[[], Any] | None:
    """What :func:`best_time` calls before reading the clock on ``device``
    (``torch.cuda.synchronize`` on ``cuda``/``cuda:N``); ``None`` where torch sees no CUDA device
    that ``device`` asks for, so that a script can say so instead of timing the CPU."""
    if not device.startswith("cuda"):
        return lambda: None
    import torch

    return torch.cuda.synchronize if torch.cuda.is_available() else None


def write_report(report: dict, out: str | None) -> None:
    """Print ``report`` as indented JSON on stdout and, with ``out``, write it there too."""
    import json
    from pathlib import Path

    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def best_time(fn: Callable[[], Any], repeats: int, sync: Callable[[], Any] | None = None) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn`` after one untimed warm-up call;
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock read so that queued GPU
    work is counted."""
    sync = sync or (lambda: None)
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def interleaved(calls: list[Callable[[], Any]], repeats: int, *, warm: bool = True) -> list[float]:
    """Median seconds of each call, timed in rounds that go through every call (alternating the
    direction), so that a change of load on the machine hits every call alike. ``warm`` runs
    each call once, untimed, first."""
    for call in calls if warm else ():
        call()
    times: list[list[float]] = [[] for _ in calls]
    for r in range(repeats):
        for i in (range(len(calls)) if r % 2 == 0 else reversed(range(len(calls)))):
            t0 = time.perf_counter()
            calls[i]()
            times[i].append(time.perf_counter() - t0)
    return [median(t) for t in times]


@dataclass
class Timings:
    """Seconds of the timed passes: wall clock per batch and per pass, and process CPU time per pass."""

    stats: list[StageStats]
    batches: list[float]
    passes: list[float]
    cpu_passes: list[float]
    bare_batches: list[float]
    bare_passes: list[float]
    bare_cpu_passes: list[float]
    bare_steps: list[list[float]]


def timed_passes(pipe: Pipeline, batches: list[pa.Table], *, repeats: int, bare=None, progress: bool = True) -> Timings:
    """``repeats`` timed passes; with ``bare``, each batch runs through both, alternating which goes
    first. CPU time (``time.process_time``, all threads) is kept beside wall time: on a loaded
    machine it varies far less."""
    t = Timings([], [], [], [], [], [], [], [])
    bare_inputs = [pl.from_arrow(b) for b in batches] if bare is not None else []
    runners = {"funnel": lambda j: pipe.run(batches[j], t.stats), "bare": lambda j: bare.run(bare_inputs[j])}
    with progress_bar(len(batches) * repeats, "timed passes", progress) as bar:
        for r in range(repeats):
            wall = {"funnel": 0.0, "bare": 0.0}
            cpu = {"funnel": 0.0, "bare": 0.0}
            for j in range(len(batches)):
                order = ("funnel",) if bare is None else (("funnel", "bare") if (r + j) % 2 == 0 else ("bare", "funnel"))
                for who in order:
                    c0, t0 = time.process_time(), time.perf_counter()
                    runners[who](j)
                    dt = time.perf_counter() - t0
                    cpu[who] += time.process_time() - c0
                    wall[who] += dt
                    (t.batches if who == "funnel" else t.bare_batches).append(dt)
                    if who == "bare":
                        t.bare_steps.append(list(getattr(bare, "step_seconds", [])))
                bar.update()
            t.passes.append(wall["funnel"])
            t.cpu_passes.append(cpu["funnel"])
            if bare is not None:
                t.bare_passes.append(wall["bare"])
                t.bare_cpu_passes.append(cpu["bare"])
    return t


def single_query(pipe: Pipeline, queries: pa.Table, bare, n: int) -> dict:
    """Latency of one query sent alone (first ``n`` queries), interleaved with the bare pipeline."""
    f, b = [], []
    rows = [queries.slice(i, 1) for i in range(min(n, queries.num_rows))]
    pipe.run(rows[0])
    if bare is not None:
        bare.run(pl.from_arrow(rows[0]))
    for i, row in enumerate(rows):
        for who in ((0, 1) if i % 2 == 0 else (1, 0)):
            if who == 0:
                t0 = time.perf_counter()
                pipe.run(row)
                f.append(time.perf_counter() - t0)
            elif bare is not None:
                frame = pl.from_arrow(row)
                t0 = time.perf_counter()
                bare.run(frame)
                b.append(time.perf_counter() - t0)
    out = {"queries": len(rows), **{f"funnel_{k}": v for k, v in latency_summary(f).items()}}
    if b:
        out.update({f"bare_{k}": v for k, v in latency_summary(b).items()})
        out["overhead_ratio_p50"] = out["funnel_p50_ms"] / out["bare_p50_ms"]
    return out
