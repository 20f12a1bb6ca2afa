"""Opportunistic Expert Activation (OEA): each token keeps its top-k0, then piggybacks on experts the batch
loads anyway.

Source: C.-A. Oncescu, Q. Wu, W. T. Chung, R. Wu, B. Gopal, J. Wang, T. Dao, B. Athiwaratkun, "Opportunistic
Expert Activation: Batch-Aware Expert Routing for Faster Decode Without Retraining", arXiv 2511.02237 (2025),
https://arxiv.org/abs/2511.02237. Two phases per layer and decode batch: a per-token quality baseline (every
token keeps its k0 top-ranked experts), then opportunistic piggybacking on experts that are loaded anyway
because another token of the batch needs them (evaluated on Qwen3-30B-A3B and Qwen3-235B-A22B at batch 16).

The rule here, for one layer's logits ``L[B, E]``::

    union  = experts in some token's top-k0
    ids[t] = token t's top-k0, then its next-ranked experts that are in ``union``, up to k slots

That is exactly "each token's top-k of L restricted to ``union``": its own top-k0 are in the union and rank
above everything else, so the restricted top-k starts with them and continues in the token's own rank order.
The union holds at least k0 experts; when it holds fewer than k, no token can fill k distinct slots and the
remaining slots are ``DROPPED`` (a batch of one token with k0 < k, for instance, runs only its top-k0).

Points decided here:

* Default ``k0 = 1``: the only value valid for every model (k0 <= top_k), the most aggressive setting of the
  rule (the union is the set of top-1 experts), and for top-1 models OEA is then top-k itself. Sweep k0 for
  a model with large k (Qwen3: k = 8): k0 = k is top-k exactly. ``select`` refuses k0 > top_k.
* Ties (in the top-k0 that forms the union and in the fill order): lower expert id, as in ``topk``.
* Weights: softmax over the chosen ids, renormalized when the model renormalizes top-k weights; otherwise
  OEA re-picks inside a kept set like Lynx, so the raw probabilities are rescaled to the token's original
  top-k mass (README.md, "Policies": the weight rule), the same mass carried by k experts or, when slots are
  dropped, fewer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lynxsim.datatypes import Selection
from lynxsim.policies.params import parameter_error, positive_int
from lynxsim.policies.topk import as_layer_batches, selection_weights, topk_mask, topk_within


@dataclass
class OEA:
    """OEA with baseline size ``k0`` (each token's guaranteed top experts). Treat instances as immutable."""

    k0: int = 1
    name: str = field(default="oea", init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            self.k0 = positive_int(self.k0)
        except ValueError as exc:
            raise parameter_error("oea", "k0", exc) from None

    def select(self, logits: np.ndarray, top_k: int, *, renormalize: bool = True) -> Selection:
        """OEA ids (strongest first; ``DROPPED`` after the used ones when the union has fewer than k experts)
        and float64 weights (see the module notes). ``ValueError`` when ``k0 > top_k``."""
        x, lead = as_layer_batches(logits, top_k)
        if self.k0 > top_k:
            raise ValueError(f"policy 'oea': k0={self.k0} exceeds top_k={top_k} (k0 must be in [1, top_k])")
        union = np.asarray(topk_mask(x, self.k0).any(axis=1, keepdims=True))  # [layers, 1, experts]
        ids = topk_within(x, union, top_k)
        weights = selection_weights(x, ids, renormalize, keep_topk_mass=True)
        out_shape = (*lead, x.shape[1], top_k)
        return Selection(ids.reshape(out_shape), weights.reshape(out_shape))
