"""Operating points: time contenders interleaved, score them against exact results, keep the
Pareto-best (faiss' ``OperatingPoints``)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .timing import interleaved

__all__ = ["pareto_front", "measure"]


def _operating_points():
    """faiss' ``OperatingPoints`` with keys that are never compared (every point is measured)."""
    from faiss.contrib.evaluation import OperatingPoints

    class Points(OperatingPoints):
        def compare_keys(self, k1, k2):
            return 0

        def do_nothing_key(self):
            return None

    return Points()


def pareto_front(points: list[dict], *, quality: str, cost: str) -> list[dict]:
    """The points no other point beats on both ``quality`` (higher) and ``cost`` (lower),
    by cost; kept with faiss' ``OperatingPoints``."""
    ops = _operating_points()
    for i, p in enumerate(points):
        if p.get(quality) is not None and p.get(cost) is not None:
            ops.add_operating_point(i, p[quality], p[cost])
    return sorted((points[i] for i, _, _ in ops.operating_points), key=lambda p: p[cost])


def measure(contenders: list[tuple[dict, Callable[[], Any], Callable[[], np.ndarray]]], ref: np.ndarray,
             nq: int, repeats: int) -> list[dict]:
    """Time ``(point, timed call, call returning result positions)`` contenders interleaved; add
    recall against ``ref`` and milliseconds and queries per second to each point."""
    from faiss.contrib.evaluation import knn_intersection_measure

    seconds = interleaved([c[1] for c in contenders], repeats)
    points = []
    for (point, _, result), t in zip(contenders, seconds):
        points.append({**point, "recall_at_k": knn_intersection_measure(result(), ref),
                       "ms_per_query": t * 1000 / nq, "queries_per_s": nq / t})
    return points
