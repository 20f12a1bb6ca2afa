"""Capacity-factor token dropping: every expert serves at most ``capacity`` of the batch's assignments.

Sources: D. Lepikhin et al., "GShard: Scaling Giant Models with Conditional Computation and Automatic
Sharding", arXiv 2006.16668, https://arxiv.org/abs/2006.16668 (top-2 gating with expert capacity 2N/E for a
group of N tokens and E experts: capacity factor 1 in the formula below; assignments beyond it overflow and
are dropped, the token passing through the residual connection); W. Fedus, B. Zoph, N. Shazeer, "Switch
Transformers: Scaling to Trillion Parameter Models with Simple and Efficient Sparsity", arXiv 2101.03961,
https://arxiv.org/abs/2101.03961 (expert capacity = (tokens per batch / experts) * capacity factor; overflowed
tokens are dropped).

The rule here, for one layer's batch of T tokens, each with its top-k assignments ``(t, e)``::

    capacity = ceil(cf * T * k / E)                 # per expert, the same for every layer of the batch
    for each expert e: order its assignments by
        1. router probability p[t, e] = softmax(L[t])[e], descending (the strongest claims keep their place),
        2. then the rank of e in token t's top-k (a first choice before a second),
        3. then the lower token index (only exact ties get here)
    keep the first ``capacity`` of them; the rest are DROPPED

Priority by router probability rather than by position in the batch (GShard and Switch fill an expert's
buffer in token order, first choices before second ones) because a decode batch has no meaningful token
order. It is the "probs" drop policy of DeepSpeed-MoE (``deepspeed/moe/sharded_moe.py``, ``topkgating(...,
drop_policy="probs")``: per expert, the ``capacity`` assignments with the largest gate probability) and of
Megatron-Core (``moe_token_drop_policy="probs"``). Probabilities of different tokens are compared as
log-softmax values, in which equal logit rows tie exactly; rules 2 and 3 only settle such exact ties.

Points decided here:

* ``capacity_factor`` > 0, default 1.0: GShard's top-2 capacity 2N/E (and Switch's cf = 1.0 point). The
  product ``cf * T * k / E`` is rounded to 9 decimals before the ceiling, so that float error cannot add an
  assignment (1.1 * 50 * 8 / 8 is 55.00000000000001 in floats: capacity 55, not 56); capacity is at least 1.
* A token may lose any of its assignments, its first choice included, or all of them (its slots are then all
  ``DROPPED``, weights 0: the token skips the MoE layer, as an overflowed token does in GShard/Switch).
  Kept assignments keep their top-k order and come first.
* A batch of one token never drops anything (capacity >= 1 and each expert has at most one of its
  assignments), so it gets exactly top-k. ``cf >= E / k`` gives capacity >= T: nothing is ever dropped.
* Weights: softmax over the kept ids, renormalized when the model renormalizes top-k weights (GShard
  normalizes its top-2 gates before dropping instead; lynxsim's contract is the same rule for every policy);
  otherwise each kept expert keeps its raw probability (the dropped mass is lost).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lynxsim.datatypes import DROPPED, Selection
from lynxsim.policies.params import parameter_error, real
from lynxsim.policies.topk import as_layer_batches, partition_function, selection_weights, topk_ids


@dataclass
class Capacity:
    """Capacity-factor token dropping with factor ``capacity_factor``. Treat instances as immutable."""

    capacity_factor: float = 1.0
    name: str = field(default="capacity", init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            self.capacity_factor = real(self.capacity_factor, low=0.0, low_inclusive=False)
        except ValueError as exc:
            raise parameter_error("capacity", "capacity_factor", exc) from None

    def capacity(self, num_tokens: int, top_k: int, num_experts: int) -> int:
        """Assignments one expert may serve in a batch of ``num_tokens`` tokens (at least 1)."""
        return max(1, math.ceil(round(self.capacity_factor * num_tokens * top_k / num_experts, 9)))

    def select(self, logits: np.ndarray, top_k: int, *, renormalize: bool = True) -> Selection:
        """Top-k ids with the assignments over an expert's capacity ``DROPPED`` (kept ones first, in top-k
        order) and float64 weights (see the module notes)."""
        x, lead = as_layer_batches(logits, top_k)
        num_layers, num_tokens, num_experts = x.shape
        ids = topk_ids(x, top_k)
        capacity = self.capacity(num_tokens, top_k, num_experts)
        out_shape = (*lead, num_tokens, top_k)
        if capacity >= num_tokens or ids.size == 0:  # no expert can overflow
            return Selection(ids.reshape(out_shape), selection_weights(x, ids, renormalize).reshape(out_shape))

        # Only the assignments of overflowing experts need ranking: one sort of all of them, by (layer, expert),
        # then the priority rule.
        group = (np.arange(num_layers).reshape(-1, 1, 1) * num_experts + ids).ravel()
        over = np.flatnonzero(np.bincount(group, minlength=num_layers * num_experts)[group] > capacity)
        if over.size == 0:
            return Selection(ids.reshape(out_shape), selection_weights(x, ids, renormalize).reshape(out_shape))
        row_max = x.max(axis=-1, keepdims=True)
        log_p = (np.take_along_axis(x, ids, axis=-1) - row_max - np.log(partition_function(x))).ravel()
        slot = over % top_k
        token = (over // top_k) % num_tokens
        order = over[np.lexsort((token, slot, -log_p[over], group[over]))]
        grouped = group[order]
        place = np.arange(grouped.size) - np.searchsorted(grouped, grouped, side="left")  # place in its expert
        kept_flat = np.ones(ids.size, dtype=bool)
        kept_flat[order] = place < capacity
        kept = kept_flat.reshape(ids.shape)

        ids = np.where(kept, ids, DROPPED)
        ids = np.take_along_axis(ids, np.argsort(~kept, axis=-1, kind="stable"), axis=-1)  # used slots first
        weights = selection_weights(x, ids, renormalize)
        return Selection(ids.reshape(out_shape), weights.reshape(out_shape))
