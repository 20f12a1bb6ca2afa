"""The cost model of one serving instance, as the engine and the runner use it: the interface every cost model
keeps, what a cost-model factory is given, and the built-in factory.

A cost model from outside lynxsim (a plug-in in the ``lynxsim.cost_models`` entry-point group, chosen by
``hardware.cost_model``) keeps this interface, as the built-in ones do: ``lynxsim.cost.CostModel`` (roofline),
``MeasuredCostModel`` (kernel tables) and ``lynxsim.parallel.ParallelCostModel`` (several GPUs). The engine
(``lynxsim.engine.compiled``) prices a plug-in's iterations through this interface, the built-ins' through their
formulas (``lynxsim.cost_formulas``) directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from lynxsim.datatypes import BatchShape, ExpertActivity, LatencyBreakdown
from lynxsim.hardware import HardwareProfile
from lynxsim.models.spec import ModelSpec
from lynxsim.parallel import ParallelPlan, make_instance_cost_model


class InstanceCostModel(Protocol):
    """How long one iteration of an instance takes, and how much memory its KV cache gets."""

    @property
    def source(self) -> str:
        """One line on what prices the iterations, shown with every run's summary ("measured", "roofline")."""
        ...

    @property
    def needs_expert_counts(self) -> bool:
        """Whether ``activity`` needs every expert's tokens; False lets a top-k iteration stop routing once its
        union of experts is full (each layer's distinct experts and assignments are then known)."""
        ...

    @property
    def kv_bytes_per_token_per_gpu(self) -> float:
        """KV-cache bytes one token takes on each GPU of the instance (the KV-cache size and transfers use it)."""
        ...

    def activity(self, expert_token_counts: np.ndarray) -> ExpertActivity:
        """What the experts' cost depends on, from tokens per expert ``[moe_layers, experts]``."""
        ...

    def iteration_activity(self, batch: BatchShape, activity: ExpertActivity) -> LatencyBreakdown:
        """The latency of one iteration running ``batch`` with ``activity``."""
        ...

    def kv_cache_capacity_bytes(self, gpu_memory_utilization: float, activation_reserve_bytes: float) -> int:
        """KV-cache bytes per GPU; ``InputError`` where the weights leave none."""
        ...

    def gpu_time_s(self, latency: LatencyBreakdown) -> float:
        """The part of ``latency`` spent on the GPU (what validation compares with measured kernels)."""
        ...


@dataclass(frozen=True)
class CostModelContext:
    """What a cost-model factory is given (as ``context=``): the model, the GPU profile as the experiment
    prices it, the catalog key of the model (None for a Hugging Face config) and the instance's parallelism."""

    model: ModelSpec
    hardware: HardwareProfile
    model_key: str | None
    plan: ParallelPlan


def profile_cost_model(*, context: CostModelContext) -> InstanceCostModel:
    """The built-in cost model (``profile``): the hardware profile's measured tables where it has those of the
    model (and of its shard over several GPUs), else the roofline (``lynxsim.parallel.make_instance_cost_model``)."""
    return make_instance_cost_model(context.model, context.hardware, context.model_key, context.plan)
