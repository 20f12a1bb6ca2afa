"""Static expert pruning: each MoE layer keeps a fixed set of r experts, and tokens route inside it.

Sources: X. Lu et al., "Not All Experts are Equal: Efficient Expert Pruning and Skipping for
Mixture-of-Experts Large Language Models", ACL 2024, arXiv 2402.14800, https://arxiv.org/abs/2402.14800
(post-training, layer-wise expert pruning of Mixtral-8x7B to r = 6 or r = 4 of 8 experts, the router then
choosing its top-2 among the kept experts); and A. Muzio, A. Sun, C. He, "SEER-MoE: Sparse Expert Efficiency
through Regularization for Mixture-of-Experts", arXiv 2404.05089, https://arxiv.org/abs/2404.05089, whose
first stage prunes the experts with the fewest activations on a calibration set ("heavy-hitters counting").

Lu et al. choose the kept subset by enumerating subsets and minimizing the layer's output reconstruction
loss, which needs hidden states the simulator does not have; the criterion here is SEER-MoE's usage count,
which needs only router logits:

    count[l, e] = number of calibration tokens with e in their top-k at layer l
    kept[l]     = the r experts of layer l with the largest count
                  (ties: larger summed router probability over the sample, then lower expert id)
    ids[t]      = token t's top-k of L restricted to kept[l]; if r < k, its r kept experts, the rest DROPPED

Points decided here:

* Parameters: ``keep`` (r, an integer >= 1, the same for every layer) to be calibrated, or ``kept_experts``
  given explicitly: a list of expert ids shared by every layer, or a list with one list per MoE layer (no
  calibration needed then; per-layer lists need the stacked ``[layers, tokens, experts]`` input with that
  many layers). With both, each list must hold exactly ``keep`` experts. ``calibrate`` returns
  ``Prune(keep=r, kept_experts=((...), ...))``, each layer's kept ids sorted; ``keep`` above the model's
  expert count is refused (a typo such as ``keep: 20`` on 8 experts would otherwise run as plain top-k).
* Ids in ``kept_experts`` must be distinct, and lie in [0, experts) of the logits at ``select``.
* Weights: softmax over the chosen ids, renormalized when the model renormalizes top-k weights; otherwise,
  as for every policy that re-picks inside a kept set, the raw probabilities are rescaled to the token's
  original top-k mass (README.md, "Policies": the weight rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from lynxsim.datatypes import Selection
from lynxsim.policies.params import is_sequence, parameter_error, positive_int, require_layers
from lynxsim.policies.topk import (
    as_layer_batches,
    calibration_batches,
    partition_function,
    selection_weights,
    topk_mask,
    topk_within,
)


@dataclass
class Prune:
    """Static pruning to ``keep`` experts per layer (calibrated), or to explicit ``kept_experts``.
    Treat instances as immutable."""

    keep: int | None = None
    kept_experts: tuple[int, ...] | tuple[tuple[int, ...], ...] | None = None
    name: str = field(default="prune", init=False, repr=False)

    def __post_init__(self) -> None:
        if self.keep is not None:
            try:
                self.keep = positive_int(self.keep)
            except ValueError as exc:
                raise parameter_error("prune", "keep", exc) from None
        if self.kept_experts is None:
            if self.keep is None:
                raise ValueError("policy 'prune' needs keep (experts kept per layer, calibrated) or kept_experts")
            return
        try:
            self.kept_experts = _check_kept(self.kept_experts, self.keep)
        except ValueError as exc:
            raise parameter_error("prune", "kept_experts", exc) from None

    @property
    def per_layer(self) -> bool:
        """Whether ``kept_experts`` holds one list per MoE layer (rather than one list for all)."""
        return self.kept_experts is not None and isinstance(self.kept_experts[0], tuple)

    @property
    def requires_calibration(self) -> bool:
        """True while the kept experts are to be measured on a calibration sample."""
        return self.kept_experts is None

    def calibrate(self, logits: np.ndarray, top_k: int) -> Prune:
        """``Prune`` keeping, per layer, the ``keep`` experts most often in the top-``top_k`` of the calibration
        logits ``[layers, tokens, experts]``. A policy given explicit kept experts is returned unchanged."""
        if not self.requires_calibration:
            return self
        assert self.keep is not None
        x = calibration_batches(self.name, logits, top_k)
        num_experts = x.shape[-1]
        if self.keep > num_experts:
            raise parameter_error("prune", "keep", ValueError(
                f"at most the model's {num_experts} experts, got {self.keep} (keep={num_experts} is plain top-k)"))
        r = self.keep
        counts = topk_mask(x, top_k).sum(axis=1).astype(np.float64)  # [layers, experts]
        mass = (np.exp(x - x.max(axis=-1, keepdims=True)) / partition_function(x)).sum(axis=1)
        kept = topk_mask(counts, r, secondary=mass)
        return Prune(keep=r, kept_experts=tuple(tuple(np.flatnonzero(row).tolist()) for row in kept))

    def kept_mask(self, num_experts: int) -> np.ndarray:
        """bool ``[layers or 1, 1, experts]``: the kept experts (``ValueError`` for an id outside the layer);
        read-only, built once per policy and expert count (``select`` runs on every iteration)."""
        if self.kept_experts is None:
            raise _needs_calibration()
        return _kept_mask(self.kept_experts, self.per_layer, num_experts)

    def select(self, logits: np.ndarray, top_k: int, *, renormalize: bool = True) -> Selection:
        """Each token's top-k inside its layer's kept experts (strongest first; ``DROPPED`` when fewer than k
        are kept) and float64 weights (see the module notes)."""
        if self.kept_experts is None:
            raise _needs_calibration()
        x, lead = as_layer_batches(logits, top_k)
        require_layers(self.name, len(self.kept_experts) if self.per_layer else None, np.shape(logits), "kept_experts")
        ids = topk_within(x, self.kept_mask(x.shape[-1]), top_k)
        weights = selection_weights(x, ids, renormalize, keep_topk_mass=True)
        out_shape = (*lead, x.shape[1], top_k)
        return Selection(ids.reshape(out_shape), weights.reshape(out_shape))


def _needs_calibration() -> ValueError:
    return ValueError(
        "policy 'prune' needs calibration: call calibrate(logits, top_k) on a calibration sample "
        "(lynxsim.policies.calibrate_if_needed), or give kept_experts explicitly"
    )


def _check_ids(row: Any, keep: int | None) -> tuple[int, ...]:
    if not is_sequence(row) or len(row) == 0:
        raise ValueError(f"a non-empty list of expert ids, got {row!r}")
    ids = []
    for value in row:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"lists of expert ids (integers >= 0), got {value!r}")
        ids.append(int(value))
    if len(set(ids)) != len(ids):
        raise ValueError(f"lists of distinct expert ids, got {list(row)!r}")
    if keep is not None and len(ids) != keep:
        raise ValueError(f"lists of exactly keep={keep} experts, got {len(ids)} in {list(row)!r}")
    return tuple(sorted(ids))


def _check_kept(kept: Any, keep: int | None) -> tuple[int, ...] | tuple[tuple[int, ...], ...]:
    """One list shared by all layers, or one list per layer; ids sorted."""
    if not is_sequence(kept) or len(kept) == 0:
        raise ValueError(f"a non-empty list of expert ids, or one such list per MoE layer, got {kept!r}")
    if all(is_sequence(row) for row in kept):
        return tuple(_check_ids(row, keep) for row in kept)
    return _check_ids(kept, keep)


@lru_cache(maxsize=64)
def _kept_mask(kept_experts: tuple[Any, ...], per_layer: bool, num_experts: int) -> np.ndarray:
    """``Prune.kept_mask`` of these kept experts, remembered: rebuilding it from the id tuples on every call was
    a Python loop over every kept id of every layer per iteration (4,608 for Qwen3-30B-A3B keeping 96 of 128)."""
    rows: tuple[tuple[int, ...], ...] = kept_experts if per_layer else (kept_experts,)
    ids = np.fromiter((e for row in rows for e in row), dtype=np.int64)
    if ids.max() >= num_experts:
        raise ValueError(
            f"policy 'prune': kept expert id {ids.max()} is not an expert of a {num_experts}-expert layer"
        )
    layers = np.repeat(np.arange(len(rows)), [len(row) for row in rows])
    mask = np.zeros((len(rows), 1, num_experts), dtype=bool)
    mask[layers, 0, ids] = True
    mask.flags.writeable = False
    return mask
