"""The compiled engine: one co-located serving instance simulated in a numba loop.

The simpy engine (``Cluster``, ``Replica``, ``Scheduler``) handles every deployment: replicas behind a router,
disaggregated prefill and decode with KV-cache transfers, tensor and expert parallelism. Its cost per iteration
is Python's: tens of microseconds of scheduling, pricing and bookkeeping, which bounds a simulation at a few
hundred times real time however little the routing costs (the statistical mode). The most common deployment, one
co-located instance (on one GPU, or on several with tensor and expert parallelism, priced by the one-GPU cost
models or the parallel one over them), is simulated here instead:
the same decisions, restated over arrays and compiled (``kernel``), with the per-iteration latency from the same
formulas (``pricing``). Exact routing still runs in Python between kernel calls, by the simpy engine's own
routing code, a decode run's iterations together as there.

The two engines give the same records (tests/test_compiled_engine.py compares every request and iteration
column, within 1e-12 relative where float sums are ordered differently). ``runner.simulate_policy`` takes this
engine wherever ``engine_for`` allows it; set ``LYNXSIM_ENGINE=simpy`` to always run the simpy engine, or
``LYNXSIM_NO_NUMBA`` to run without numba at all.
"""

from __future__ import annotations

import os
from types import ModuleType

from lynxsim.cost import CostModel, MeasuredCostModel
from lynxsim.errors import InputError
from lynxsim.jit import kernels
from lynxsim.parallel import ParallelCostModel

ENGINE_VARIABLE = "LYNXSIM_ENGINE"
"""``simpy`` forces the simpy engine; unset (or ``auto``) uses the compiled one wherever it applies."""


def supported(cost_model: object) -> bool:
    """Whether the compiled engine prices ``cost_model`` (``pricing.Pricing``): the one-GPU ``CostModel`` or
    ``MeasuredCostModel``, or a ``ParallelCostModel`` over one of them (tensor and expert parallelism)."""
    base = cost_model.base if isinstance(cost_model, ParallelCostModel) else cost_model
    return type(base) in (CostModel, MeasuredCostModel)


def compiled_engine() -> ModuleType | None:
    """The compiled engine's entry module (``lynxsim.engine.compiled.orchestrator``), which simulates every
    deployment under any cost model (a ``supported`` one priced in the loop, another, a plug-in's, through its
    Python code), unless numba is unavailable or switched off. None: use the simpy engine."""
    choice = os.environ.get(ENGINE_VARIABLE, "auto")
    if choice not in ("auto", "simpy"):
        raise InputError(ENGINE_VARIABLE, f"must be auto or simpy, got {choice!r}")
    if choice == "simpy":
        return None
    return kernels("lynxsim.engine.compiled.orchestrator")
