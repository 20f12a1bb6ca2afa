"""Stubs shared by the engine tests: a constant-latency cost model that makes timelines computable by hand, and
the routing step and request specs those tests build on."""

from __future__ import annotations

import numpy as np

from lynxsim.datatypes import BatchShape, ExpertActivity, LatencyBreakdown, RequestSpec
from lynxsim.engine import RoutingStep
from lynxsim.policies import make
from lynxsim.routing import SyntheticRouting, SyntheticRoutingParams

LAYERS, EXPERTS, TOP_K = 2, 8, 2


class ConstantCost:
    """Every iteration takes ``latency_s``; the batch shapes it was asked about are kept for assertions."""

    source = "constant"
    needs_expert_counts = False

    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.shapes: list[BatchShape] = []

    def activity(self, expert_token_counts: np.ndarray) -> ExpertActivity:
        assert expert_token_counts.shape == (LAYERS, EXPERTS)
        return ExpertActivity.of_counts(expert_token_counts)

    def iteration_activity(self, batch: BatchShape, activity: ExpertActivity) -> LatencyBreakdown:
        assert activity.distinct.shape == (LAYERS,)
        self.shapes.append(batch)
        return LatencyBreakdown(attention_s=0.0, dense_s=0.0, moe_s=self.latency_s, communication_s=0.0, overhead_s=0.0)


def routing_step(policy: str = "topk") -> RoutingStep:
    return RoutingStep(
        routing=SyntheticRouting(LAYERS, EXPERTS, SyntheticRoutingParams(), seed=3),
        policy=make(policy, **({"alpha": 1.0, "beta": 2.0} if policy == "lynx" else {})),
        baseline=make("topk"),
        apply_to="decode_only",
        top_k=TOP_K,
        renormalize=True,
    )


def spec(request_id: int, arrival_s: float, prompt: int, output: int) -> RequestSpec:
    return RequestSpec(request_id=request_id, arrival_s=arrival_s, prompt_tokens=prompt, output_tokens=output)
