"""``top_n``: every token keeps only its ``n`` strongest experts of the router's top-k.

A policy is a pure function of one batch's router logits (``lynxsim.policies.base.Policy``); here it starts from
lynxsim's own top-k and leaves the weaker slots ``DROPPED``, so a run shows it as ``assignments_dropped`` of
exactly ``(k - n) / k`` on the iterations it applies to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from lynxsim.datatypes import DROPPED, Selection
from lynxsim.policies import TopK


@dataclass(frozen=True)
class TopN:
    """The first ``n`` slots of top-k (strongest first), the rest dropped; weights renormalized over the kept
    slots when the model renormalizes, else each kept expert's own probability."""

    n: int = 1
    name: ClassVar[str] = "top_n"

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be a whole number >= 1, got {self.n!r}")

    def select(self, logits: np.ndarray, top_k: int, *, renormalize: bool = True) -> Selection:
        if self.n > top_k:
            raise ValueError(f"n = {self.n} exceeds the model's top-k ({top_k})")
        chosen = TopK().select(logits, top_k, renormalize=renormalize)
        ids = chosen.expert_ids.copy()
        weights = chosen.weights.copy()
        ids[..., self.n :] = DROPPED
        weights[..., self.n :] = 0.0
        if renormalize:
            weights /= weights.sum(axis=-1, keepdims=True)
        return Selection(ids, weights)
