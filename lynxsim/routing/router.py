"""The router a model applies to its gate's logits before any top-k: group-limited routing of DeepSeek-V2/V3.

Most routers choose each token's experts among all of them: top-k of the gate's logits (softmax or sigmoid
scores rank the experts alike, both being increasing functions of the logit). DeepSeek-V2 and -V3 first limit
every token to a few expert groups: the experts are split into ``num_groups`` contiguous groups of equal size,
each group gets a score from its experts' affinities, and only the best ``topk_groups`` groups stay eligible
(DeepSeek-V2's ``group_limited_greedy``, a group scored by its best expert: 8 groups, 3 kept, of 160 experts;
DeepSeek-V3's ``noaux_tc``, a group scored by the sum of its two best experts' sigmoid scores: 8 groups, 4 kept,
of 256 experts). ``GroupLimit.apply`` makes the routing logits say that: every expert outside a token's kept
groups gets the token's best logit minus ``MASKED_GAP``, so no top-k can choose it and its softmax weight is
below 1e-27 of the best expert's, and every policy downstream (top-k, Lynx, the others) sees the token's
eligible experts only, as the model's router does.

A sigmoid router's group score is the sum of its two best experts' sigmoid scores, computed with
``hashing.exp_exact`` so that the kernels repeat it bit for bit. Simplifications, stated where the profiles and
docs use them: DeepSeek-V3's per-expert selection bias is not a separate term (it is part of each expert's
popularity, the generator's ``expert_bias``, and so ranks the experts by the biased score), and Lynx bins the
gate logits of a sigmoid
router as it bins a softmax router's (DeepSeek-V3's weights are its sigmoid scores renormalised over the chosen
experts, which the softmax of the chosen experts' logits only approximates). For Lynx a masked expert lies in
the deepest bin, like any expert far below the token's best: the batch's popularity can still move a token
onto it, as it can onto any low-affinity expert; vLLM's grouped top-k would not offer it.

The numpy implementation here is the reference; ``synthetic_kernels`` repeats it for the compiled logits, bit
for bit (the same float32 maxima, sums and subtraction), and the tests compare them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lynxsim.routing.hashing import exp_exact

MASKED_GAP = np.float32(64.0)
"""How far below a token's best logit its ineligible experts are put (nats): exp(-64) ~ 1.6e-28."""

GROUP_SCORES = ("max", "top2_sigmoid_sum")
"""How a group is scored: by its best expert's logit (a softmax router: the best probability), or by the sum of
its two best experts' sigmoid scores (DeepSeek-V3's ``noaux_tc``)."""


@dataclass(frozen=True)
class GroupLimit:
    """Group-limited routing: ``num_groups`` contiguous expert groups, the best ``topk_groups`` eligible."""

    num_groups: int
    topk_groups: int
    score: str = "max"

    def __post_init__(self) -> None:
        if self.score not in GROUP_SCORES:
            raise ValueError(f"group score must be one of {GROUP_SCORES}, got {self.score!r}")
        if not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(f"topk_groups must be in [1, {self.num_groups}], got {self.topk_groups}")

    @property
    def score_code(self) -> int:
        """The score as the kernels take it: 0 max, 1 top-2 sum."""
        return GROUP_SCORES.index(self.score)

    def check(self, num_experts: int) -> None:
        """``ValueError`` where ``num_experts`` do not split into equal groups of two or more (a group's score
        may read its two best experts)."""
        if num_experts % self.num_groups or num_experts // self.num_groups < 2:
            raise ValueError(f"{num_experts} experts do not split into {self.num_groups} groups of 2 or more")

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Mask, in place, every expert outside each token's best groups of ``logits [L, T, E]`` (float32);
        returns ``logits``."""
        if not logits.flags.c_contiguous:
            raise ValueError("group limiting works in place on C-contiguous logits")
        layers, tokens, experts = logits.shape
        size = experts // self.num_groups
        grouped = logits.reshape(layers, tokens, self.num_groups, size)
        if self.score == "max":
            scores = grouped.max(axis=-1)
        else:
            two = np.sort(grouped, axis=-1)[..., -2:]
            sig = sigmoid_exact(two)
            scores = sig[..., 1] + sig[..., 0]
        # the best groups, ties to the lower group index (a stable sort of the negated scores)
        order = np.argsort(-scores, axis=-1, kind="stable")
        eligible = np.zeros(scores.shape, dtype=bool)
        np.put_along_axis(eligible, order[..., : self.topk_groups], True, axis=-1)
        masked = logits.max(axis=-1, keepdims=True) - MASKED_GAP
        floor = np.broadcast_to(masked[..., None], grouped.shape)
        np.copyto(grouped, floor, where=~eligible[..., None])
        return logits


def sigmoid_exact(x: np.ndarray) -> np.ndarray:
    """float32 ``1 / (1 + exp(-x))`` of float32 ``x``, its exponential from ``hashing.exp_exact`` rounded to
    float32 and the rest in float32 operations: the same bits as the kernels' (``synthetic_kernels``)."""
    e = exp_exact(-np.asarray(x, dtype=np.float64)).astype(np.float32)
    return np.float32(1.0) / (np.float32(1.0) + e)


def group_limit_of(model: Any) -> GroupLimit | None:
    """The group limit the routing applies for a ``ModelSpec`` (duck-typed: ``router``, ``num_expert_groups``,
    ``topk_groups``): DeepSeek-V3's (``router: grouped_topk``), else None.

    DeepSeek-V2's softmax ``group_limited_greedy`` (its catalog entries keep the two group fields) is not
    applied: the only public log of Lynx on such a model (DeepSeek-Coder-V2, lynxsim/routing/data/statistics/) is
    reproduced by an unconstrained router and is out of reach of a group-limited one (with 3 of 8 groups eligible,
    Lynx's union of a batch of 16 cannot pass about 47 experts, where the log shows 52 in layers 20-39), so the
    routing that stands behind its profile is the unconstrained one; docs/routing_evidence.md says so."""
    groups, kept = getattr(model, "num_expert_groups", None), getattr(model, "topk_groups", None)
    if getattr(model, "router", None) != "grouped_topk" or not groups or groups < 2 or kept is None or kept >= groups:
        return None
    return GroupLimit(int(groups), int(kept), "top2_sigmoid_sum")
