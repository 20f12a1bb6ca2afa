"""Batch-vote budget: each layer of a decode batch runs at most M experts, the M most voted for.

Source: lynxsim's own baseline, not a published method: a simpler relative of Lynx (arXiv 2411.08982) with
a hard budget instead of Lynx's affinity bins. Lynx lets the number of kept experts adapt per batch and layer
and weighs each token's vote by how far the expert is from its best logit; this policy counts plain top-k
votes and keeps a fixed number. It answers "what if the server simply capped the experts per layer?".

The rule, for one layer's logits ``L[B, E]`` and budget M::

    votes[e] = number of tokens with e in their top-k
    kept     = the M experts with the most votes, among those with at least one vote
               (ties: larger summed router probability sum_t softmax(L[t])[e], then lower expert id)
    ids[t]   = token t's top-k of L restricted to kept; if kept has fewer than k experts, all of them and
               the remaining slots DROPPED

Points decided here:

* ``budget`` (M, an integer >= 1) is a cap, never a target: experts nobody voted for are never added, so a
  batch whose top-k uses at most M experts gets exactly top-k (a one-token batch with M >= k included).
  With M < k every token runs M experts (fewer than k), the rest ``DROPPED``.
* The summed probability in the tie rule is summed over the batch's tokens in token order (float64).
* Weights: softmax over the chosen ids, renormalized when the model renormalizes top-k weights; otherwise,
  as for every policy that re-picks inside a kept set, the raw probabilities are rescaled to the token's
  original top-k mass (README.md, "Policies": the weight rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lynxsim.datatypes import Selection
from lynxsim.policies.params import parameter_error, positive_int
from lynxsim.policies.topk import as_layer_batches, partition_function, selection_weights, topk_mask, topk_within


@dataclass
class Vote:
    """Batch-vote budget of ``budget`` experts per layer and batch. Treat instances as immutable."""

    budget: int
    name: str = field(default="vote", init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            self.budget = positive_int(self.budget)
        except ValueError as exc:
            raise parameter_error("vote", "budget", exc) from None

    def kept(self, x: np.ndarray, top_k: int) -> np.ndarray:
        """bool ``[layers, 1, experts]``: the kept experts of each layer, for float64 logits
        ``[layers, tokens, experts]``."""
        num_experts = x.shape[-1]
        votes = topk_mask(x, top_k).sum(axis=1, keepdims=True)  # [layers, 1, experts]
        voted: np.ndarray = votes > 0
        if self.budget >= num_experts:
            return voted
        mass = (np.exp(x - x.max(axis=-1, keepdims=True)) / partition_function(x)).sum(axis=1, keepdims=True)
        best: np.ndarray = topk_mask(votes.astype(np.float64), self.budget, secondary=mass)
        best &= voted
        return best

    def select(self, logits: np.ndarray, top_k: int, *, renormalize: bool = True) -> Selection:
        """Each token's top-k inside the batch's kept experts (strongest first; ``DROPPED`` when fewer than k
        are kept) and float64 weights (see the module notes)."""
        x, lead = as_layer_batches(logits, top_k)
        ids = topk_within(x, self.kept(x, top_k), top_k)
        weights = selection_weights(x, ids, renormalize, keep_topk_mass=True)
        out_shape = (*lead, x.shape[1], top_k)
        return Selection(ids.reshape(out_shape), weights.reshape(out_shape))
