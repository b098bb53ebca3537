"""engine.pareto against a naive O(n^2) dominance check."""

from __future__ import annotations

import random

from workbench.engine.pareto import pareto_front


def naive_front(points):
    def dominates(a, b):
        return a[0] <= b[0] and a[1] <= b[1] and (a[0] < b[0] or a[1] < b[1])

    return [i for i, p in enumerate(points) if all(v == v for v in p) and not any(dominates(q, p) for j, q in enumerate(points) if j != i)]


def test_hand_case():
    pts = [(10.0, 0.0), (5.0, 0.5), (6.0, 0.6), (5.0, 0.5), (3.0, 2.0), (3.0, 2.5), (8.0, 0.1)]
    # (6, 0.6) is beaten by (5, 0.5); (3, 2.5) by (3, 2.0); the duplicates (5, 0.5) tie and both stay
    assert pareto_front(pts) == [0, 1, 3, 4, 6]
    assert pareto_front([]) == [] and pareto_front([(1.0, 1.0)]) == [0]


def test_matches_naive_reference_on_random_sets_with_ties():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 25)
        pts = [(float(rng.randint(0, 6)), float(rng.randint(0, 6))) for _ in range(n)]  # many ties
        assert pareto_front(pts) == naive_front(pts), pts
    for _ in range(100):
        pts = [(rng.random(), rng.random()) for _ in range(rng.randint(1, 60))]
        assert pareto_front(pts) == naive_front(pts)


def test_nan_points_are_left_out():
    pts = [(1.0, float("nan")), (2.0, 1.0), (3.0, 0.5)]
    assert pareto_front(pts) == naive_front(pts) == [1, 2]
