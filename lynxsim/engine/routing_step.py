"""How an iteration's experts are chosen: the run's routing source, its policy where it applies and top-k
elsewhere, exactly or from the statistical mode's tables.

The compiled engine asks for a batch's (or a decode run's) expert activity from Python through
``RoutingStep.exact_activities`` wherever its loop does not route itself (``lynxsim.engine.compiled.routing``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from lynxsim.datatypes import ExpertActivity
from lynxsim.instance_cost import InstanceCostModel
from lynxsim.policies import Policy, TopK
from lynxsim.policies.kernels import route_counts
from lynxsim.policies.proxies import QualityProxies
from lynxsim.routing.base import RoutingSource
from lynxsim.routing.statistical import ActivityDraws

if TYPE_CHECKING:
    from lynxsim.engine.offloading import ExpertOffloading
    from lynxsim.engine.topk_unions import TopKUnions
    from lynxsim.routing.statistical import StatisticalRouting

SATURATION_TOKENS_PER_EXPERT = 8
"""The first chunk routed when an iteration's top-k union may fill before its last token (``union_of_topk``) holds
this many top-k assignments per expert (32 tokens for Mixtral's 8 experts and top-2, 256 for DeepSeek-V3): enough
to fill a layer's union with high probability when routing is spread evenly. Each further chunk doubles, so an
iteration routes at most about twice the tokens its union needs, in a few calls."""


@dataclass(frozen=True)
class RoutingStep:
    """How each iteration's experts are chosen: ``policy`` where it applies, ``baseline`` (top-k) elsewhere."""

    routing: RoutingSource
    policy: Policy
    baseline: Policy
    apply_to: Literal["decode_only", "all"]
    top_k: int
    renormalize: bool
    statistical: StatisticalRouting | None = None  # the statistical routing mode's tables; None: exact routing
    seed: int = 0  # of the statistical mode's sampling
    unions: TopKUnions | None = None  # top-k unions of token blocks, shared by the policies of one run
    offloading: ExpertOffloading | None = None  # experts in host memory (needs each iteration's active experts)

    def union_of_topk(self, request_ids: np.ndarray, positions: np.ndarray) -> np.ndarray | None:
        """The active experts (``bool [layers, experts]``) of a top-k-routed iteration, without routing every token
        where that can be avoided: top-k assigns exactly ``tokens * top_k``, so the union of the tokens' experts
        is all the iteration's activity needs. With the run's shared block unions (``unions``), whole blocks of a
        request's tokens come from there; otherwise the tokens are routed chunk by chunk. Either way the routing
        stops once every layer has all its experts active, since more tokens cannot change a full union. None when
        the chunks never fill it (the caller then routes everything)."""
        if self.unions is not None:
            return self.unions.union(request_ids, positions, self._topk_active)
        active: np.ndarray | None = None
        start, size = 0, self.first_saturation_chunk
        while start < request_ids.size:
            end = start + size
            chunk_active = self._topk_active(request_ids[start:end], positions[start:end])
            active = chunk_active if active is None else active | chunk_active
            if active.all():
                return active
            start, size = end, 2 * size
        return None

    @property
    def first_saturation_chunk(self) -> int:
        """Tokens of the first chunk ``union_of_topk`` routes (``SATURATION_TOKENS_PER_EXPERT``)."""
        return max(1, SATURATION_TOKENS_PER_EXPERT * self.routing.num_experts // self.top_k)

    def _topk_active(self, request_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Which experts of each layer the tokens' top-k choices use (``bool [layers, experts]``)."""
        logits = self.routing.logits(request_ids, positions)
        return route_counts(logits, self.baseline, self.top_k, self.renormalize)[0] > 0

    def exact_activities(
        self, cost_model: InstanceCostModel, request_ids: np.ndarray, positions: np.ndarray, groups: int, applied: bool,
        active: np.ndarray | None = None,
    ) -> ActivityDraws:
        """Exact routing of ``groups`` iterations whose tokens are ``request_ids``/``positions`` in equal
        consecutive parts: each one's expert activity as ``cost_model`` reduces it, their distinct experts and
        quality proxies stacked. A single top-k iteration stops routing once its union of experts is full, where
        the cost model needs no per-expert counts (``union_of_topk``). ``active`` (expert offloading): rows
        ``0 .. groups - 1`` get each iteration's tokens per expert ``[layers, experts]`` (a full union's: 1 per
        active expert), by which offloading knows the experts by identity."""
        policy = self.policy if applied else self.baseline
        if (
            groups == 1
            and isinstance(policy, TopK)  # the baseline, or top-k configured as the policy
            and request_ids.size > self.first_saturation_chunk
            and not cost_model.needs_expert_counts
        ):
            union = self.union_of_topk(request_ids, positions)
            if union is not None:
                if active is not None:
                    active[0] = union
                distinct = union.sum(axis=1)
                activity = ExpertActivity(distinct, np.full_like(distinct, request_ids.size * self.top_k))
                proxies = np.stack(QualityProxies.of_topk(distinct.size))[:, None, :]
                return ActivityDraws([activity], distinct[None, :], proxies)
        counts, proxies = self.route(request_ids, positions, groups, applied)
        if active is not None:
            active[:groups] = counts
        activities = [cost_model.activity(c) for c in counts]
        return ActivityDraws(activities, np.stack([a.distinct for a in activities]), proxies)

    def route(
        self, request_ids: np.ndarray, positions: np.ndarray, groups: int, applied: bool
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """Tokens per expert ``[layers, experts]`` and the quality proxies (``[4, groups, layers]``, the
        ``QualityProxies`` fields in order) of ``groups`` batches whose tokens are
        ``request_ids``/``positions`` in ``groups`` equal consecutive parts (one per iteration of a decode run)."""
        logits = self.routing.logits(request_ids, positions)
        layers, tokens, experts = logits.shape
        per_group = logits.reshape(layers, groups, tokens // groups, experts)
        policy = self.policy if applied else self.baseline
        counts, proxies = route_counts(per_group, policy, self.top_k, self.renormalize)
        return list(counts), np.asarray(proxies)


