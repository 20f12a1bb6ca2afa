"""Plain top-k routing, and the batched top-k machinery the other policies and the proxies share.

Tie-breaking is deterministic: among equal logits the lower expert id wins (the order a stable sort on
``-logits`` gives). Replaying the same logits under several policies is only a fair comparison when every
policy, and the top-k reference the quality proxies compare against, breaks ties the same way.

Everything works on float64 ``[layers, tokens, experts]`` arrays (``as_layer_batches``) so that a single-layer
call and a stacked call run the same code on the same memory layout and give bit-identical results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lynxsim.datatypes import DROPPED, Selection


def as_layer_batches(logits: np.ndarray, top_k: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """Validate a ``select`` call and view its logits as C-contiguous float64 ``[layers, tokens, experts]``.

    Returns the view and the leading shape (``logits.shape[:-2]``) to restore on the outputs. Float64 because
    Lynx needs ``B ** q`` with large negative ``q`` and because weights from float32 logits would otherwise
    depend on the dtype the routing source happened to produce. Non-finite logits are refused: a NaN or an
    infinity has no place in a router's output and would silently corrupt the bin and mask arithmetic.
    """
    x = np.asarray(logits)
    if x.ndim < 2:
        raise ValueError(f"logits must be [tokens, experts] or [layers, tokens, experts], got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"logits must be real numbers, got dtype {x.dtype}")
    check_top_k(top_k, x.shape[-1])
    lead = x.shape[:-2]
    x = np.ascontiguousarray(x, dtype=np.float64).reshape(math.prod(lead), *x.shape[-2:])
    if not np.isfinite(x).all():
        raise ValueError("logits must be finite (found NaN or infinity)")
    return x, lead


def check_top_k(top_k: int, num_experts: int) -> None:
    """``ValueError`` unless ``top_k`` is an integer (not a bool) in ``[1, num_experts]``."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an integer in [1, {num_experts}] (the number of experts), got {top_k!r}")


def calibration_batches(policy: str, logits: np.ndarray, top_k: int) -> np.ndarray:
    """Validate a ``calibrate`` call: float64 ``[layers, tokens, experts]`` with at least one token (a
    statistic over no tokens has no value), checked like ``select``'s input."""
    shape = np.shape(logits)
    if len(shape) != 3 or shape[1] < 1:
        raise ValueError(
            f"policy {policy!r}: calibration logits must be [layers, tokens, experts] with at least one token, "
            f"got shape {tuple(shape)}"
        )
    x, _ = as_layer_batches(logits, top_k)
    return x


def topk_mask(primary: np.ndarray, k: int, secondary: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask ``[..., experts]`` with exactly ``k`` True per row: the k best experts of each row by
    ``primary`` (descending), ties by ``secondary`` (descending) when given, then by lower expert id.

    A k-th-largest threshold (``np.partition``, O(experts)) settles every expert above it; only the experts
    tied *at* it need ranking, and those are few (a handful per row), so they are ranked as one flat list
    rather than by sorting whole rows: several times faster than a full stable sort of every row.
    """
    num_experts = primary.shape[-1]
    flat = primary.reshape(-1, num_experts)
    threshold = np.partition(flat, num_experts - k, axis=-1)[:, num_experts - k, None]
    mask = flat >= threshold
    tied_rows = np.flatnonzero(np.count_nonzero(mask, axis=-1) > k)
    if tied_rows.size:
        rows = flat[tied_rows]
        above = rows > threshold[tied_rows]
        free_slots = k - np.count_nonzero(above, axis=-1)
        row, expert = np.nonzero(rows == threshold[tied_rows])  # sorted by row, then expert id
        if secondary is not None:
            # Stable: within a row, higher secondary first, equal secondary keeps expert-id order.
            order = np.lexsort((-secondary.reshape(-1, num_experts)[tied_rows[row], expert], row))
            row, expert = row[order], expert[order]
        rank = np.arange(row.size) - np.searchsorted(row, row)
        take = rank < free_slots[row]
        above[row[take], expert[take]] = True
        mask[tied_rows] = above
    return mask.reshape(primary.shape)


def mask_to_ids(mask: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """Expert ids ``[..., k]`` of a mask with exactly k True per row, ordered by ``keys`` descending, ties by
    lower id (the order ``torch.topk`` users expect: the first slot is the token's strongest expert)."""
    num_experts = mask.shape[-1]
    ids = (np.flatnonzero(mask) % num_experts).reshape(*mask.shape[:-1], k)
    order = np.argsort(-np.take_along_axis(keys, ids, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(ids, order, axis=-1)


def topk_ids(keys: np.ndarray, k: int) -> np.ndarray:
    """int64 ids ``[..., k]`` of the k largest keys per row, by key descending, ties by lower id."""
    return mask_to_ids(topk_mask(keys, k), keys, k)


def chosen_exp(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``exp(logit - row max)`` of the chosen ids, contiguous ``[..., k]``: softmax numerators with the
    normalizer left out, so that policies sharing ids share bit-identical weights."""
    numer: np.ndarray = np.exp(np.take_along_axis(x, ids, axis=-1) - x.max(axis=-1, keepdims=True))
    return numer


def partition_function(x: np.ndarray) -> np.ndarray:
    """Softmax normalizer ``sum_e exp(logit - row max)``, ``[..., 1]``; only needed for unrenormalized weights."""
    total: np.ndarray = np.exp(x - x.max(axis=-1, keepdims=True)).sum(axis=-1, keepdims=True)
    return total


def topk_within(x: np.ndarray, kept: np.ndarray, k: int) -> np.ndarray:
    """Each token's best ``k`` experts inside ``kept`` (bool, broadcastable to ``x``: ``[layers, 1, experts]``
    for a per-batch set), by logit descending, ties by lower id; int64 ``[..., k]``.

    A token whose kept set holds fewer than ``k`` experts gets all of them, strongest first, and ``DROPPED``
    in the remaining slots: used slots always come first. Shared by every policy that re-picks inside a set
    (Lynx, OEA, vote, prune).
    """
    masked = np.where(kept, x, -np.inf)
    ids = topk_ids(masked, k)
    outside = np.isneginf(np.take_along_axis(masked, ids, axis=-1))  # logits are finite: -inf means not kept
    if outside.any():
        ids[outside] = DROPPED
    return ids


def selection_weights(x: np.ndarray, ids: np.ndarray, renormalize: bool, *, keep_topk_mass: bool = False) -> np.ndarray:
    """float64 weights ``[..., k]`` of the chosen ``ids`` (``DROPPED`` slots get 0) from the softmax of ``x``.

    * ``renormalize``: ``p / sum(p)`` over the token's used ids (all 0 for a token with none);
    * else the raw ``p`` of each chosen id; with ``keep_topk_mass`` (policies that re-pick inside a kept
      set: Lynx, OEA, vote, prune) rescaled so that they sum to the token's original top-k mass,
      ``p * (top-k mass) / sum(p)`` (the weight rule of README.md, "Policies").

    The operations are those of ``TopK.select`` in the same order, so a selection equal to top-k gets
    bit-identical weights (the top-k mass is summed in descending order, like the chosen ids, and its ratio
    to the chosen mass is exactly 1.0).
    """
    used = ids != DROPPED
    any_dropped = not used.all()
    numer = chosen_exp(x, np.where(used, ids, 0) if any_dropped else ids)
    if any_dropped:
        numer[~used] = 0.0
    chosen_sum = numer.sum(axis=-1, keepdims=True)
    if any_dropped:
        chosen_sum = np.where(chosen_sum > 0, chosen_sum, 1.0)  # a token with no used slot: weights stay 0
    if renormalize:
        weights: np.ndarray = numer / chosen_sum
        return weights
    weights = numer / partition_function(x)
    if keep_topk_mass:
        # Original top-k numerators in descending order: the same values in the same order as a top-k call's.
        k = ids.shape[-1]
        num_experts = x.shape[-1]
        top = np.partition(x, num_experts - k, axis=-1)[..., num_experts - k :]
        top_numer = np.exp(-np.sort(-top, axis=-1) - x.max(axis=-1, keepdims=True))
        weights *= top_numer.sum(axis=-1, keepdims=True) / chosen_sum
    return weights


@dataclass
class TopK:
    """Every token runs its k highest-logit experts: the baseline every other policy is measured against."""

    name: str = field(default="topk", init=False, repr=False)

    def select(self, logits: np.ndarray, top_k: int, *, renormalize: bool = True) -> Selection:
        """Top-k ids by logit (ties: lower id), weights ``p / sum(p)`` over the chosen ids, or raw ``p`` when
        the model does not renormalize (``p = softmax(logits)``). ids int64, weights float64."""
        x, lead = as_layer_batches(logits, top_k)
        ids = topk_ids(x, top_k)
        numer = chosen_exp(x, ids)
        weights = numer / (numer.sum(axis=-1, keepdims=True) if renormalize else partition_function(x))
        out_shape = (*lead, x.shape[1], top_k)
        return Selection(ids.reshape(out_shape), weights.reshape(out_shape))
