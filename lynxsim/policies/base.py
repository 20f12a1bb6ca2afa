"""The contract every expert-selection policy keeps.

A policy is a pure function of one layer's router logits for one batch: it returns, per token, the expert ids
it will run and their combine weights. Keeping it pure (no state between calls, same output for the same input)
is what lets the simulator replay the same logits under several policies and compare them pair by pair.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from lynxsim.datatypes import Selection


class Policy(Protocol):
    """A selection policy. ``logits`` is ``[tokens, experts]`` or ``[layers, tokens, experts]``; the result
    keeps the leading dimensions. Each layer of a stacked call is treated as its own batch."""

    name: str

    def select(self, logits: np.ndarray, top_k: int, *, renormalize: bool = True) -> Selection: ...


# Calibration.
#
# Some policies take their parameters from statistics of the router on a calibration sample (the median
# second-to-first weight ratio of ``skip``, the most used experts of ``prune``). The protocol, kept small:
#
# * such a policy has a boolean ``requires_calibration`` attribute (or property) and a method
#   ``calibrate(logits, top_k) -> Policy``; ``logits`` is float ``[layers, tokens, experts]``: every MoE
#   layer's router logits for the same calibration tokens (a few thousand, from the routing source);
# * ``calibrate`` returns a NEW policy with the measured parameters written in explicitly (policies stay
#   immutable and pure); the result no longer requires calibration and equals the policy built with those
#   parameters by hand. On a policy that does not require calibration (its parameters were given
#   explicitly) ``calibrate`` returns the policy itself: explicit parameters are never overwritten;
# * ``select`` on a policy that still requires calibration raises ``ValueError`` saying so.


class CalibratablePolicy(Policy, Protocol):
    """A policy whose parameters may come from a calibration sample (see the notes above)."""

    @property
    def requires_calibration(self) -> bool: ...

    def calibrate(self, logits: np.ndarray, top_k: int) -> Policy: ...


def needs_calibration(policy: Any) -> bool:
    """Whether ``policy`` must be calibrated (``policy.calibrate(logits, top_k)``) before ``select``."""
    return bool(getattr(policy, "requires_calibration", False)) and callable(getattr(policy, "calibrate", None))


def check_policy(policy: Policy, num_layers: int, num_experts: int, top_k: int) -> None:
    """Raise ``ValueError`` now, before a simulation starts, if ``policy`` cannot run on a model with this many
    MoE layers, experts and top-k: uncalibrated, per-layer parameters of the wrong length, kept expert ids out
    of range, ``k0 > top_k``. It runs one ``select`` on a dummy ``[num_layers, 1, num_experts]`` batch, so it
    catches exactly the errors ``select`` would raise mid-simulation."""
    if needs_calibration(policy):
        raise ValueError(f"policy {policy.name!r} needs calibration before it can select experts")
    policy.select(np.zeros((num_layers, 1, num_experts)), top_k)


def calibrate_if_needed(policy: Policy, logits: np.ndarray, top_k: int) -> Policy:
    """``policy.calibrate(logits, top_k)`` when the policy needs it, else ``policy`` itself.

    ``logits``: ``[layers, tokens, experts]`` of the calibration sample (all MoE layers, in order)."""
    if needs_calibration(policy):
        calibrated: Policy = policy.calibrate(logits, top_k)  # type: ignore[attr-defined]
        return calibrated
    return policy
