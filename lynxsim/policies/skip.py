"""Dynamic expert skipping: a token drops a selected expert whose routing weight is far below its first one.

Source: X. Lu, Q. Liu, Y. Xu, A. Zhou, S. Huang, B. Zhang, J. Yan, H. Li, "Not All Experts are Equal:
Efficient Expert Pruning and Skipping for Mixture-of-Experts Large Language Models", ACL 2024, arXiv
2402.14800, https://arxiv.org/abs/2402.14800 ("dynamic skipping", for the top-2 Mixtral-8x7B). The rule and
its calibration, checked against the method's public implementation (as ported to FusionBench,
``fusion_bench/method/expert_sparsity/mixtral/dynamic_skipping.py`` and ``models/expert_sparsity/mixtral/
modeling_mixtral.py``): with ``w = softmax(router logits)`` over all experts and ``w0 >= w1`` the top-2,

    skip the second expert when  w1 < beta_l * w0          (strict)
    beta_l = median over calibration tokens of w1 / w0      (per MoE layer l)

and the kept weights are renormalized (``routing_weights /= routing_weights.sum()`` after zeroing w1).

Points decided here:

* k > 2 (the paper has only top-2): slots 2..k are each tested against the first, ``w_j < beta_l * w0``
  drops slot j. Weights are sorted, so the dropped slots are always a suffix and the used ones come first.
  The calibrated beta_l is still the median of w1/w0 (the paper's statistic); with k = 1 nothing is skipped.
* ``w_j / w0 = exp(L_j - L_0)`` needs no softmax normalizer, so the test is done on that ratio directly.
* ``beta``: a scalar for every layer, a list with one value per MoE layer, or ``None`` (the default): then
  the policy requires calibration, ``calibrate(logits, top_k)`` measures the medians on a sample and returns
  ``Skip(beta=(beta_0, ..., beta_{L-1}))``. beta >= 0; beta = 0 never skips, beta > 1 always skips.
* Weights: softmax over the kept ids, renormalized when the model renormalizes top-k weights (as the paper
  does for Mixtral); otherwise each kept expert keeps its raw probability (the skipped mass is lost).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lynxsim.datatypes import DROPPED, Selection
from lynxsim.policies.params import (
    layer_column,
    num_per_layer,
    parameter_error,
    real,
    require_layers,
    scalar_or_per_layer,
)
from lynxsim.policies.topk import as_layer_batches, calibration_batches, chosen_exp, selection_weights, topk_ids


@dataclass
class Skip:
    """Dynamic skipping with threshold ``beta`` (scalar, per-layer list, or ``None``: calibrated).
    Treat instances as immutable."""

    beta: float | tuple[float, ...] | None = None
    name: str = field(default="skip", init=False, repr=False)

    def __post_init__(self) -> None:
        if self.beta is None:
            return
        try:
            self.beta = scalar_or_per_layer(self.beta, _check_beta)
        except ValueError as exc:
            raise parameter_error("skip", "beta", exc) from None

    @property
    def requires_calibration(self) -> bool:
        """True while ``beta`` is to be measured on a calibration sample."""
        return self.beta is None

    def calibrate(self, logits: np.ndarray, top_k: int) -> Skip:
        """``Skip`` with beta_l = the median of w1/w0 over the sample's tokens, per layer, for calibration
        logits ``[layers, tokens, experts]`` (at least one token, at least two experts). A policy given an
        explicit beta is returned unchanged."""
        if not self.requires_calibration:
            return self
        x = calibration_batches("skip", logits, top_k)
        if x.shape[-1] < 2:
            raise ValueError("policy 'skip': calibration needs at least two experts (w1/w0 of the top-2)")
        top2 = topk_ids(x, 2)
        ratio = chosen_exp(x, top2)[..., 1]  # exp(L1 - L0) = w1 / w0 (w0's numerator is exactly 1)
        return Skip(beta=tuple(float(b) for b in np.median(ratio, axis=1)))

    def select(self, logits: np.ndarray, top_k: int, *, renormalize: bool = True) -> Selection:
        """Top-k ids with slots 2..k dropped where ``w_j < beta_l * w0`` (``DROPPED``, weight 0), strongest
        first, and float64 weights (see the module notes)."""
        if self.beta is None:
            raise ValueError(
                "policy 'skip' needs calibration: call calibrate(logits, top_k) on a calibration sample "
                "(lynxsim.policies.calibrate_if_needed), or give beta explicitly"
            )
        x, lead = as_layer_batches(logits, top_k)
        require_layers(self.name, num_per_layer(self.beta), np.shape(logits), "beta")
        ids = topk_ids(x, top_k)
        ratio = chosen_exp(x, ids)  # w_j / w0, 1 in the first slot
        skipped = ratio < layer_column(self.beta, x.shape[0])
        skipped[..., 0] = False
        ids[skipped] = DROPPED
        weights = selection_weights(x, ids, renormalize)
        out_shape = (*lead, x.shape[1], top_k)
        return Selection(ids.reshape(out_shape), weights.reshape(out_shape))


def _check_beta(beta: Any) -> float:
    return real(beta, low=0.0, low_inclusive=True)
