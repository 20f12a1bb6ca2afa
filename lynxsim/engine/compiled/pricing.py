"""An iteration's latency inside the compiled engine: the cost model's own formulas on its own arrays.

The formulas live in ``lynxsim.cost_formulas``, stated once for the Python cost models and for this engine; the
loop (``lynxsim.engine.compiled.kernel``) calls ``price_iteration`` inline each iteration, on the arrays the run's
cost model builds for its batches (``of``: ``CostModel.pricing``, ``ParallelCostModel.pricing``), with caches of
the run's own.
"""

from __future__ import annotations

import numpy as np

from lynxsim.cost_formulas import RANK_MOE, ROOFLINE, TERM_NAMES, Pricing, price_iteration
from lynxsim.engine.compiled import supported

__all__ = ["Pricing", "of", "price_iteration"]


def of(cost_model: object, *, max_tokens: int) -> Pricing | None:
    """The pricing arrays of ``cost_model`` for batches of at most ``max_tokens`` tokens; None for a cost model
    whose formulas the loop does not evaluate (a plug-in's: ``supported`` says which), which the caller prices
    in Python instead (``kernel.NEED_PRICE``)."""
    if not supported(cost_model):
        return None
    return cost_model.pricing(max_tokens)  # type: ignore[attr-defined]


def placeholder() -> Pricing:
    """Pricing arrays of the loop's types that price nothing: the loop's argument where the caller prices
    (one set of argument types, so the loop is compiled once)."""
    return Pricing(ROOFLINE, np.zeros((2, len(TERM_NAMES))), np.zeros(0), np.full(RANK_MOE + 1, -1, dtype=np.int64),
                   np.zeros((2, 1)), np.zeros(1), np.zeros(1), np.zeros((1, 1)), 0, ROOFLINE)
