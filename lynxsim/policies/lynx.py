"""Lynx batch-aware expert selection (arXiv 2411.08982, AffinityBinning), exactly as DESIGN.md states it.

For one layer's router logits ``L[B, E]`` of one decode batch::

    q[t,e] = max(ceil(alpha * (L[t,e] - max_e' L[t,e'])), -beta)   # integer bins, argmax in bin 0
    h[t,e] = B ** q[t,e];   score[e] = sum_t h[t,e]
    v[t,e] = q[t,e] + (score[e] - h[t,e]) / B
    votes[t] = top-k of v[t];   kept = experts with at least one vote
    ids, w = top-k of softmax(L masked to kept)

Each token's k votes are distinct, so ``kept`` always holds at least k experts and every token gets k
distinct ids. Batches are vectorized over tokens and over stacked layers (each layer its own batch).

Points the formula leaves open, decided here so that the result is deterministic and reduces to top-k:

* Ties in ``v`` are broken by the token's own logit (higher first), then by lower expert id. The popularity
  term is ``< (B-1)/B``, so ``v`` orders first by the token's own bin, then by how much the *other* tokens
  like the expert; within one bin the token's own affinity is the natural last word. It is also what makes
  a one-token batch (popularity 0, ``v = q``) vote exactly its top-k, as it must.
* ``score`` is summed bin by bin from per-bin token counts, in a fixed bin order, instead of token by token:
  two experts whose other tokens fall into the same bins then get bit-identical ``v``, so a real tie stays a
  tie instead of being decided by float rounding order. Same formula, same value up to rounding.
* ``B ** q`` is float64; bins deep enough that ``B ** q`` is below float64's smallest subnormal count as
  exactly 0 (what the formula gives in float64 anyway, bar subnormal rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real

import numpy as np

from lynxsim.policies.base import Selection
from lynxsim.policies.topk import (
    as_layer_batches,
    chosen_exp,
    partition_function,
    topk_ids,
    topk_mask,
)

_MIN_SUBNORMAL_LOG2 = 1074
"""float64's smallest positive value is 2**-1074: the deepest bin whose weight B**-d is still representable."""


@dataclass
class Lynx:
    """Lynx with its per-model constants: ``alpha`` (bins per unit of logit gap) and ``beta`` (deepest bin,
    a positive integer; ``None`` for no floor). The paper's published values are listed in DESIGN.md.

    Treat instances as immutable. (Not a frozen dataclass only because the ``Policy`` protocol declares
    ``name`` as a plain attribute, which type checkers refuse to match with a frozen or class-level one.)
    """

    alpha: float
    beta: int | None
    name: str = field(default="lynx", init=False, repr=False)

    def __post_init__(self) -> None:
        alpha, beta = self.alpha, self.beta
        if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"lynx parameter alpha must be a finite number > 0, got {alpha!r}")
        self.alpha = float(alpha)
        if beta is None:
            return
        # beta is the floor of *integer* bins; a fractional floor would create a bin between two integers.
        if (
            isinstance(beta, bool)
            or not isinstance(beta, Real)
            or not math.isfinite(beta)
            or beta <= 0
            or beta != int(beta)
        ):
            raise ValueError(f"lynx parameter beta must be a positive integer or None (no floor), got {beta!r}")
        self.beta = int(beta)

    def select(self, logits: np.ndarray, top_k: int, *, renormalize: bool = True) -> Selection:
        """Lynx ids (ordered by logit, ties by lower id; int64) and float64 weights: ``p / sum(p)`` over the
        chosen ids when renormalizing, else the re-softmax weights rescaled to the token's original top-k
        mass, ``w * (original top-k mass) / sum(w)``."""
        x, lead = as_layer_batches(logits, top_k)
        num_layers, num_tokens, num_experts = x.shape
        out_shape = (*lead, num_tokens, top_k)
        if num_layers * num_tokens == 0:
            return Selection(np.zeros(out_shape, dtype=np.int64), np.zeros(out_shape, dtype=np.float64))

        votes = topk_mask(self.vote_scores(x), top_k, secondary=x)
        kept = votes.any(axis=1, keepdims=True)
        ids = topk_ids(np.where(kept, x, -np.inf), top_k)

        numer = chosen_exp(x, ids)
        chosen_sum = numer.sum(axis=-1, keepdims=True)
        if renormalize:
            weights = numer / chosen_sum
        else:
            # Original top-k numerators in descending order: the same values in the same order as a top-k
            # call's, so a batch whose selection is its top-k gets a factor of exactly 1.0 and top-k's weights.
            top = np.partition(x, num_experts - top_k, axis=-1)[..., num_experts - top_k :]
            top_numer = np.exp(-np.sort(-top, axis=-1) - x.max(axis=-1, keepdims=True))
            weights = numer / partition_function(x) * (top_numer.sum(axis=-1, keepdims=True) / chosen_sum)
        return Selection(ids.reshape(out_shape), weights.reshape(out_shape))

    def vote_scores(self, x: np.ndarray) -> np.ndarray:
        """``v[l, t, e]`` of the rule for float64 logits ``[layers, tokens, experts]`` (each layer one batch)."""
        num_layers, num_tokens, num_experts = x.shape
        # In-place steps: this runs on every decode iteration over [layers, tokens, experts] arrays.
        q: np.ndarray = x - x.max(axis=-1, keepdims=True)
        q *= self.alpha
        np.ceil(q, out=q)
        if self.beta is not None:
            np.maximum(q, -self.beta, out=q)
        if num_tokens == 1:
            return q  # no other tokens: popularity is 0

        # Depth d = -q >= 0 of every (token, expert); depths past float64's range share a last bin of weight 0.
        cap = int(_MIN_SUBNORMAL_LOG2 // math.log2(num_tokens))
        depth = np.negative(q)
        np.minimum(depth, cap + 1, out=depth)
        depth = depth.astype(np.int64)
        deepest = int(min(-q.min(), cap))
        num_bins = deepest + 2
        bin_weight = np.append(float(num_tokens) ** -np.arange(deepest + 1, dtype=np.float64), 0.0)
        v: np.ndarray = np.take(bin_weight, depth)  # h = B ** q, for now

        # counts[l, e, d]: tokens of layer l whose bin for expert e is -d; one bincount for all layers.
        depth += np.arange(num_layers * num_experts, dtype=np.int64).reshape(num_layers, 1, num_experts) * num_bins
        counts = np.bincount(depth.ravel(), minlength=num_layers * num_experts * num_bins).reshape(
            num_layers, num_experts, num_bins
        )
        score = np.zeros((num_layers, 1, num_experts))
        for d in range(deepest + 1):  # fixed order over bins, not tokens: equal counts give equal scores
            score[:, 0, :] += counts[..., d] * bin_weight[d]

        np.subtract(score, v, out=v)
        v /= num_tokens
        v += q
        return v
