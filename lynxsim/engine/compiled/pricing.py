"""An iteration's latency inside the compiled engine: the cost model's own formulas on its own arrays.

The formulas live in ``lynxsim.cost_formulas``, stated once for the Python cost models and for this engine; the
loop (``lynxsim.engine.compiled.kernel``) calls ``price_iteration`` inline each iteration, on the arrays the run's
cost model builds for its batches (``of``: ``CostModel.pricing``, ``ParallelCostModel.pricing``), with caches of
the run's own.
"""

from __future__ import annotations

from lynxsim.cost_formulas import Pricing, price_iteration
from lynxsim.engine.compiled import supported

__all__ = ["Pricing", "of", "price_iteration"]


def of(cost_model: object, *, max_tokens: int) -> Pricing:
    """The pricing arrays of ``cost_model`` for batches of at most ``max_tokens`` tokens. ``ValueError`` for a
    cost model whose formulas the engine does not evaluate (``supported`` says which; the runner then runs the
    simpy engine)."""
    if not supported(cost_model):
        raise ValueError(f"no compiled pricing for {type(cost_model).__name__}")
    return cost_model.pricing(max_tokens)  # type: ignore[attr-defined]
