"""The Pareto front of the latency-quality figure, by hand."""

from __future__ import annotations

import numpy as np

from lynxsim.plots import pareto_front


def test_pareto_front_hand_example() -> None:
    # (latency, quality): A (10, 1.0) top-k; B (8, 0.95); C (9, 0.90) is beaten by B; D (6, 0.80); E (6, 0.70)
    latency = np.array([10.0, 8.0, 9.0, 6.0, 6.0])
    quality = np.array([1.0, 0.95, 0.90, 0.80, 0.70])
    assert pareto_front(latency, quality).tolist() == [3, 1, 0]


def test_pareto_front_single_point() -> None:
    assert pareto_front(np.array([5.0]), np.array([0.5])).tolist() == [0]
