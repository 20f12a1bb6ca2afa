"""Routing-quality proxies: how far a selection strays from plain top-k on the same logits.

The simulator has no model outputs to score, so it reports what a selection gives up relative to the router's
own choice; the Lynx paper's accuracy cost tracks these. All four are per layer (the leading dims of the
logits minus tokens) and are means over the batch's tokens:

* ``retained_mass``: (router probability on the chosen ids) / (probability on the top-k ids), averaged over
  tokens. 1 for top-k; never above 1.
* ``top1_kept``: fraction of tokens whose highest-probability expert (ties: lower id) is still chosen.
* ``assignments_changed``: fraction of top-k (token, expert) assignments the selection does not contain.
* ``assignments_dropped``: fraction of the selection's slots left ``DROPPED``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from lynxsim.datatypes import DROPPED, Selection
from lynxsim.policies.topk import as_layer_batches, topk_ids


class QualityProxies(NamedTuple):
    """float64 arrays shaped like the logits' leading dims (0-d for one layer's ``[tokens, experts]``)."""

    retained_mass: np.ndarray
    top1_kept: np.ndarray
    assignments_changed: np.ndarray
    assignments_dropped: np.ndarray

    @classmethod
    def of_topk(cls, num_layers: int) -> QualityProxies:
        """The proxies of top-k itself, per layer, without looking at logits: top-k is the reference."""
        ones, zeros = np.ones(num_layers), np.zeros(num_layers)
        return cls(ones, ones.copy(), zeros, zeros.copy())


def quality_proxies(logits: np.ndarray, selection: Selection, top_k: int) -> QualityProxies:
    """Proxies of ``selection`` (ids ``[..., tokens, top_k]``) against top-k of ``logits`` (``[..., tokens,
    experts]``). An empty batch raises ``ValueError``: a mean over no tokens has no value, and the engine
    never scores one."""
    x, lead = as_layer_batches(logits, top_k)
    num_layers, num_tokens, num_experts = x.shape
    if num_tokens == 0:
        raise ValueError("quality proxies need at least one token")
    ids = np.asarray(selection.expert_ids)
    if ids.shape != (*lead, num_tokens, top_k) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"selection ids must be integers of shape {(*lead, num_tokens, top_k)}, got {ids.dtype} {ids.shape}"
        )
    ids = ids.reshape(num_layers, num_tokens, top_k)
    if ids.min() < DROPPED or ids.max() >= num_experts:
        raise ValueError(f"selection ids must lie in [{DROPPED}, {num_experts}), got [{ids.min()}, {ids.max()}]")

    used = ids != DROPPED
    row_max = x.max(axis=-1, keepdims=True)
    chosen = np.where(used, np.exp(np.take_along_axis(x, np.where(used, ids, 0), axis=-1) - row_max), 0.0)
    reference_ids = topk_ids(x, top_k)
    reference = np.exp(np.take_along_axis(x, reference_ids, axis=-1) - row_max)  # descending
    # Summing both in descending order compares ordered sequences term by term, so rounding cannot push the
    # ratio above 1; the softmax normalizer cancels and is never computed.
    chosen_sum = (-np.sort(-chosen, axis=-1)).sum(axis=-1)
    retained_mass = (chosen_sum / reference.sum(axis=-1)).mean(axis=-1)

    top1_kept = (ids == x.argmax(axis=-1)[..., None]).any(axis=-1).mean(axis=-1)
    kept_reference = (reference_ids[..., :, None] == ids[..., None, :]).any(axis=-1)
    assignments_changed = (~kept_reference).mean(axis=(-2, -1))
    assignments_dropped = (~used).mean(axis=(-2, -1))
    return QualityProxies(
        *(np.asarray(a, dtype=np.float64).reshape(lead) for a in (
            retained_mass, top1_kept, assignments_changed, assignments_dropped
        ))
    )
