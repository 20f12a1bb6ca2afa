"""Post-hoc top-p: each token runs the shortest prefix of its top-k whose router probability reaches p.

Source: Q. Huang, Z. An, N. Zhuang, M. Tao, C. Zhang, Y. Jin, K. Xu, L. Chen, S. Huang, Y. Feng, "Harder
Tasks Need More Experts: Dynamic Routing in MoE Models", ACL 2024, arXiv 2403.07652,
https://arxiv.org/abs/2403.07652. Their top-p (confidence-threshold) routing sorts a token's router
probabilities in descending order and activates the smallest set of experts whose cumulative probability
reaches the threshold p (their models are *trained* that way, with extra losses). Their public code
(github.com/ZhenweiAn/Dynamic_MoE, ``modeling/modeling_moe.py``, ``top_p_sampling_batched_all_sequence``)
keeps the sorted experts up to and including the first one at which ``cumsum(P) > p`` (strictly), with
``top_p_threshold = 0.4`` as the configuration default.

What this policy is: that rule applied *after the fact* to a model trained with top-k routing, and capped at
the model's k: ``P = softmax(L)`` over all experts, ``P_(1) >= ... >= P_(k)`` the token's top-k,

    n = min{ j : P_(1) + ... + P_(j) > p },  or k if the top-k mass never exceeds p
    ids = the first n of the top-k; slots n+1..k DROPPED

(strict ``>`` as in the authors' code; "reaches" and "exceeds" differ only when a prefix's mass equals p to
the last bit).

So this is not Huang et al.'s method itself (a model trained with top-p routing) but their selection rule
used training-free at inference on a top-k model: it can only remove experts from the top-k, never add one
beyond it (their trained rule may activate more experts than top-2 for hard tokens).

Points decided here:

* ``p`` in (0, 1]; default 0.4, the threshold of Huang et al.'s trained top-p models (their code's default).
  It is only a starting point for a post-hoc sweep on a model trained for top-k; p = 1 keeps the whole top-k.
* Cumulative sums are float64 over the sorted top-k probabilities. Ties in the top-k order: lower expert
  id, as in ``topk``.
* Weights: softmax over the kept ids, renormalized when the model renormalizes top-k weights; otherwise each
  kept expert keeps its raw probability (the dropped mass is lost).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lynxsim.datatypes import DROPPED, Selection
from lynxsim.policies.params import parameter_error, real
from lynxsim.policies.topk import as_layer_batches, chosen_exp, partition_function, selection_weights, topk_ids


@dataclass
class TopP:
    """Post-hoc top-p with threshold ``p`` in (0, 1]. Treat instances as immutable."""

    p: float = 0.4
    name: str = field(default="topp", init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            self.p = real(self.p, low=0.0, low_inclusive=False, high=1.0)
        except ValueError as exc:
            raise parameter_error("topp", "p", exc) from None

    def select(self, logits: np.ndarray, top_k: int, *, renormalize: bool = True) -> Selection:
        """The shortest top-k prefix reaching probability p (strongest first, the rest ``DROPPED``) and float64
        weights (see the module notes)."""
        x, lead = as_layer_batches(logits, top_k)
        ids = topk_ids(x, top_k)
        probs = chosen_exp(x, ids) / partition_function(x)
        mass_before = np.cumsum(probs, axis=-1)[..., :-1]  # mass of slots 1..j-1, for slot j >= 2
        dropped = np.zeros(ids.shape, dtype=bool)
        dropped[..., 1:] = mass_before > self.p
        ids[dropped] = DROPPED
        weights = selection_weights(x, ids, renormalize)
        out_shape = (*lead, x.shape[1], top_k)
        return Selection(ids.reshape(out_shape), weights.reshape(out_shape))
