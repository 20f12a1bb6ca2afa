"""The engine: every serving instance simulated in one numba loop, and every deployment built from such instances.

``kernel`` is the loop of one instance's serving step (arrivals into its queue or, on a decode instance, its
incoming queue; vLLM's scheduling with KV-cache blocks and preemption; the iteration's routing, pricing and
completion; hand-offs and KV-cache transfers), stated once over arrays; ``instance`` holds one instance's arrays and
answers what the loop asks of Python (exact routing through ``RoutingStep``, a plug-in cost model's price or a
plug-in scheduler's batch, room in the log or the outbox); ``orchestrator`` runs a deployment: one instance alone
(``driver``), replicas behind a request router, or prefill and decode instances with KV-cache transfers between
them. Each iteration's latency comes from the cost model's own formulas (``pricing``, ``lynxsim.cost_formulas``).

tests/test_compiled_engine.py holds it to the first, simpy engine (tests/simpy_oracle), record for record. Set
``LYNXSIM_NO_NUMBA`` to run the loop as plain Python (``lynxsim.jit``).
"""

from __future__ import annotations

from lynxsim.cost import CostModel, MeasuredCostModel
from lynxsim.parallel import ParallelCostModel


def supported(cost_model: object) -> bool:
    """Whether the loop prices ``cost_model`` itself (``pricing.Pricing``): the one-GPU ``CostModel`` or
    ``MeasuredCostModel``, or a ``ParallelCostModel`` over one of them (tensor and expert parallelism)."""
    base = cost_model.base if isinstance(cost_model, ParallelCostModel) else cost_model
    return type(base) in (CostModel, MeasuredCostModel)
