"""``scaled``: another registered cost model's latencies, every part times ``factor``.

A cost model keeps ``lynxsim.instance_cost.InstanceCostModel``; its factory is called with a
``CostModelContext`` as ``context=``. This one builds lynxsim's own (``base``, by default ``profile``: the
profile's measured tables, else the roofline) through the same registry and scales what it prices, as a GPU
``factor`` times slower would run (memory, and so the KV cache, unchanged): every iteration's ``dense_s`` and
``overhead_s`` in a run's records are ``factor`` times the base model's.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lynxsim.datatypes import BatchShape, ExpertActivity, LatencyBreakdown
from lynxsim.instance_cost import CostModelContext, InstanceCostModel
from lynxsim.plugins import COST_MODELS


class Scaled:
    """``base``'s latencies times ``factor`` (> 0)."""

    def __init__(self, *, context: CostModelContext, factor: float, base: str = "profile") -> None:
        if not float(factor) > 0:
            raise ValueError(f"factor must be positive, got {factor!r}")
        self.factor = float(factor)
        self.base: InstanceCostModel = COST_MODELS.bind(base, {})(context=context)
        self.source = f"{self.base.source}, scaled x{self.factor:g}"
        self.needs_expert_counts = self.base.needs_expert_counts
        self.kv_bytes_per_token_per_gpu = self.base.kv_bytes_per_token_per_gpu

    def activity(self, expert_token_counts: np.ndarray) -> ExpertActivity:
        return self.base.activity(expert_token_counts)

    def iteration_activity(self, batch: BatchShape, activity: ExpertActivity) -> LatencyBreakdown:
        return self._scale(self.base.iteration_activity(batch, activity), self.factor)

    def kv_cache_capacity_bytes(self, gpu_memory_utilization: float, activation_reserve_bytes: float) -> int:
        return self.base.kv_cache_capacity_bytes(gpu_memory_utilization, activation_reserve_bytes)

    def gpu_time_s(self, latency: LatencyBreakdown) -> float:
        return self.factor * self.base.gpu_time_s(self._scale(latency, 1.0 / self.factor))

    @staticmethod
    def _scale(latency: LatencyBreakdown, factor: float) -> LatencyBreakdown:
        return LatencyBreakdown(**{f.name: getattr(latency, f.name) * factor for f in dataclasses.fields(latency)})
