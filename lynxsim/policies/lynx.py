"""Lynx batch-aware expert selection (arXiv 2411.08982, AffinityBinning), exactly as README.md ("Policies") states it.

For one layer's router logits ``L[B, E]`` of one decode batch::

    q[t,e] = max(ceil(alpha * (L[t,e] - max_e' L[t,e'])), -beta)   # integer bins, argmax in bin 0
    h[t,e] = B ** q[t,e];   score[e] = sum_t h[t,e]
    v[t,e] = q[t,e] + (score[e] - h[t,e]) / B
    votes[t] = top-k of v[t];   kept = experts with at least one vote
    ids, w = top-k of softmax(L masked to kept)

Each token's k votes are distinct, so ``kept`` always holds at least k experts and every token gets k
distinct ids. Batches are vectorized over tokens and over stacked layers (each layer its own batch).
``alpha`` and ``beta`` may be given per MoE layer (lists): the stacked input then carries each layer's own
constants, still in one vectorized pass.

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
from functools import cache
from numbers import Real
from typing import Any

import numpy as np

from lynxsim.datatypes import Selection
from lynxsim.policies.params import (
    layer_column,
    num_per_layer,
    parameter_error,
    require_layers,
    scalar_or_per_layer,
    shown,
)
from lynxsim.policies.topk import as_layer_batches, selection_weights, topk_mask, topk_within

_MIN_SUBNORMAL_LOG2 = 1074
"""float64's smallest positive value is 2**-1074: the deepest bin whose weight B**-d is still representable."""


@dataclass
class Lynx:
    """Lynx with its per-model constants: ``alpha`` (bins per unit of logit gap) and ``beta`` (deepest bin,
    a positive integer; ``None`` for no floor). The paper's published values are in the model catalog
    (`lynx_alpha`, `lynx_beta`).

    Either may be a list with one entry per MoE layer (stored as a tuple; ``beta`` entries may be ``None``);
    ``select`` then needs the stacked ``[layers, tokens, experts]`` logits with that many layers (``ValueError``
    otherwise), and two per-layer lists must have the same length.

    Treat instances as immutable. (Not a frozen dataclass only because the ``Policy`` protocol declares
    ``name`` as a plain attribute, which type checkers refuse to match with a frozen or class-level one.)
    """

    alpha: float | tuple[float, ...]
    beta: int | None | tuple[int | None, ...]
    name: str = field(default="lynx", init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            self.alpha = scalar_or_per_layer(self.alpha, _check_alpha)
        except ValueError as exc:
            raise parameter_error("lynx", "alpha", exc) from None
        try:
            self.beta = scalar_or_per_layer(self.beta, _check_beta)
        except ValueError as exc:
            raise parameter_error("lynx", "beta", exc) from None
        try:
            num_per_layer(self.alpha, self.beta)
        except ValueError as exc:
            raise ValueError(f"lynx parameters alpha and beta: {exc}") from None

    @property
    def num_layers(self) -> int | None:
        """The MoE layer count the per-layer parameters fix; ``None`` when both are scalars."""
        return num_per_layer(self.alpha, self.beta)

    def select(self, logits: np.ndarray, top_k: int, *, renormalize: bool = True) -> Selection:
        """Lynx ids (ordered by logit, ties by lower id; int64) and float64 weights: ``p / sum(p)`` over the
        chosen ids when renormalizing, else the re-softmax weights rescaled to the token's original top-k
        mass, ``w * (original top-k mass) / sum(w)``."""
        x, lead = as_layer_batches(logits, top_k)
        require_layers(self.name, self.num_layers, np.shape(logits), "alpha/beta")
        num_layers, num_tokens, _ = x.shape
        out_shape = (*lead, num_tokens, top_k)
        if num_layers * num_tokens == 0:
            return Selection(np.zeros(out_shape, dtype=np.int64), np.zeros(out_shape, dtype=np.float64))

        votes = topk_mask(self.vote_scores(x), top_k, secondary=x)
        kept = np.asarray(votes.any(axis=1, keepdims=True))
        ids = topk_within(x, kept, top_k)  # each token voted k distinct experts: kept holds >= k, none DROPPED
        weights = selection_weights(x, ids, renormalize, keep_topk_mass=True)
        return Selection(ids.reshape(out_shape), weights.reshape(out_shape))

    def vote_scores(self, x: np.ndarray) -> np.ndarray:
        """``v[l, t, e]`` of the rule for float64 logits ``[layers, tokens, experts]`` (each layer one batch;
        with per-layer parameters, ``layers`` must be their length)."""
        num_layers, num_tokens, num_experts = x.shape
        # In-place steps: this runs on every decode iteration over [layers, tokens, experts] arrays.
        q: np.ndarray = x - x.max(axis=-1, keepdims=True)
        q *= self.alpha if not isinstance(self.alpha, tuple) else layer_column(self.alpha, num_layers)
        np.ceil(q, out=q)
        if isinstance(self.beta, tuple):  # per layer; a layer without a floor gets -inf
            floors = tuple(-math.inf if b is None else -float(b) for b in self.beta)
            np.maximum(q, layer_column(floors, num_layers), out=q)
        elif self.beta is not None:
            np.maximum(q, -self.beta, out=q)
        if num_tokens == 1:
            return q  # no other tokens: popularity is 0

        # Depth d = -q >= 0 of every (token, expert); depths past float64's range share a last bin of weight 0.
        bin_weight = bin_weights(num_tokens)
        cap = bin_weight.size - 2
        depth = np.negative(q)
        np.minimum(depth, cap + 1, out=depth)
        depth = depth.astype(np.int64)
        deepest = int(min(-q.min(), cap))
        num_bins = deepest + 2
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


@cache
def bin_weights(num_tokens: int) -> np.ndarray:
    """float64 ``h`` of each depth ``d = -q`` for a batch of ``num_tokens >= 2``: ``B ** -d`` for ``d <= cap``,
    the deepest depth whose weight float64 still represents, then one last entry 0 for every deeper bin.

    One table per batch size, shared by ``vote_scores`` and the numba kernel (``selection_kernels``), so both
    weigh every bin with the same bits."""
    cap = int(_MIN_SUBNORMAL_LOG2 // math.log2(num_tokens))
    weights = np.append(float(num_tokens) ** -np.arange(cap + 1, dtype=np.float64), 0.0)
    weights.flags.writeable = False
    return weights


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"a finite number > 0, got {shown(alpha)}")
    return float(alpha)


def _check_beta(beta: Any) -> int | None:
    if beta is None:
        return None
    # beta is the floor of *integer* bins; a fractional floor would create a bin between two integers.
    if isinstance(beta, bool) or not isinstance(beta, Real) or not math.isfinite(beta):
        raise ValueError(f"a positive integer or None (no floor), got {shown(beta)}")
    value = float(beta)
    if value <= 0 or not value.is_integer():
        raise ValueError(f"a positive integer or None (no floor), got {shown(beta)}")
    return int(value)
