"""The Pareto front of variants: which ones no other variant beats on both size and error.

A point (x, y), both to be minimised (size in bytes, quick KL), is on the front when no other point is
at most as large on both and strictly smaller on one. Equal points do not dominate each other, so
duplicates are on the front together. Sort-and-sweep, O(n log n).
"""

from __future__ import annotations

import math


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices (into `points`, ascending) of the non-dominated points, both coordinates minimised.
    Points with a NaN coordinate are never on the front (nothing can be said of them)."""
    valid = [i for i, (x, y) in enumerate(points) if not (math.isnan(x) or math.isnan(y))]
    order = sorted(valid, key=lambda i: (points[i][0], points[i][1]))
    front: list[int] = []
    best_y = math.inf  # lowest y among points with a strictly smaller x
    k = 0
    while k < len(order):
        x = points[order[k]][0]
        same = [order[j] for j in range(k, len(order)) if points[order[j]][0] == x]  # one x, y ascending
        low = points[same[0]][1]
        if low < best_y:  # the lowest y at this x beats everything to its left; its equals tie with it
            front += [i for i in same if points[i][1] == low]
        best_y = min(best_y, low)
        k += len(same)
    return sorted(front)
