"""The contract every expert-selection policy keeps.

A policy is a pure function of one layer's router logits for one batch: it returns, per token, the expert ids
it will run and their combine weights. Keeping it pure (no state between calls, same output for the same input)
is what lets the simulator replay the same logits under several policies and compare them pair by pair.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import numpy as np

DROPPED = -1
"""Expert id of a slot a policy left empty (policies that drop assignments); its weight is 0."""


class Selection(NamedTuple):
    """What a policy chose for each token.

    ``expert_ids``: int64 ``[..., tokens, top_k]``, distinct per token; ``DROPPED`` (-1) marks an empty slot.
    ``weights``: float ``[..., tokens, top_k]``, positive for used slots, 0 for dropped ones.
    """

    expert_ids: np.ndarray
    weights: np.ndarray


class Policy(Protocol):
    """A selection policy. ``logits`` is ``[tokens, experts]`` or ``[layers, tokens, experts]``; the result
    keeps the leading dimensions. Each layer of a stacked call is treated as its own batch."""

    name: str

    def select(self, logits: np.ndarray, top_k: int, *, renormalize: bool = True) -> Selection: ...
